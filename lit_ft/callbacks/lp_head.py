"""Keep the classifier head as it was at the end of a head-only phase, in the checkpoint.

WiSE-FT interpolates from the pretrained weights to the fine-tuned ones. A freshly initialised
head at the pretrained end ruins the interpolation (wise-ft#9); the head a linear probe trained
on the *pretrained* features is the right partner for them (LP-FT). Runs whose freeze plan has
a head-only phase (``LPFT``, ``FreezeUnfreeze``, ``Gradual``, ``LinearProbe``) train exactly
that head, then keep training it with the backbone: this callback saves a copy of it as it was
at the last head-only step, so :mod:`lit_ft.wise` can use it later.

A step is head-only when the head's parameters and no others require grad, which is what the
freeze plan sets at each step (read from the module, so any plan, in epoch or step units, with
or without cached features, works). The copy is this callback's state (``state_dict``): it is in
every full checkpoint (not in weights-only ones) and comes back on resume. Runs without a
head-only phase store nothing. On by default in the CLI (``lp_head: {enabled: false}`` turns it
off); the cost is one copy of the head per head-only step.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import lightning as L
import torch


class LinearProbeHead(L.Callback):
    """Save the head of the last head-only (linear-probe) step in the checkpoint.

    Args:
        enabled: False stores nothing.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.head: Optional[dict[str, torch.Tensor]] = None  # "model.<classifier>.<param>" -> tensor
        self.step: Optional[int] = None  # global step after the head-only step it was copied at

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.enabled:
            return
        net = pl_module.model  # the timm network of an ImageClassifier
        head = net.get_classifier()
        head_ids = {id(p) for p in head.parameters()}
        params = list(net.named_parameters())
        only_head = all(p.requires_grad == (id(p) in head_ids) for _, p in params) and bool(head_ids)
        if only_head:
            self.head = {f"model.{n}": p.detach().cpu().clone() for n, p in params if id(p) in head_ids}
            self.step = int(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.head is None else {"head": self.head, "step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.head = state_dict.get("head")
        self.step = state_dict.get("step")

    @staticmethod
    def from_checkpoint(checkpoint: Mapping[str, Any]) -> Optional[dict[str, torch.Tensor]]:
        """The saved head of a checkpoint (``{"model.<classifier>.<param>": tensor}``), or None."""
        for key, state in (checkpoint.get("callbacks") or {}).items():
            if key.split("{")[0] == LinearProbeHead.__qualname__ and isinstance(state, Mapping) and state.get("head"):
                return dict(state["head"])
        return None
