"""What the training plan does at each step, in TensorBoard: each layer group's learning rate
(``lr/<group>``) and the number of parameters that train (``trainable_params``, and as a fraction
of the model's, ``trainable_fraction``: a PEFT run's adapter share, a gradual unfreezing's steps).

Owns those tags. It reads the optimizer's param groups (their ``name``, ``layer_group``
and ``lr``, as :func:`lit_ft.optim.build_param_groups` made them) and ``requires_grad``;
it never changes an LR or a freeze state and never reads the module's private state.

Why not Lightning's ``LearningRateMonitor`` (2.6): it names the tags after the optimizer
class when there is no scheduler (``lr-AdamW/head``, so runs with SGD and AdamW do not
overlay in TensorBoard), logs every param group (``head`` and ``head/no_decay``: two equal
curves per layer group) and offers no way to rename or filter them.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_ft.optim import NO_DECAY_SUFFIX


class PlanMonitor(Callback):
    """Log ``lr/<layer group>`` (one curve per layer group) and ``trainable_params`` per step.

    Logged right before each optimizer step, so the values are the ones that step uses (after
    the module applied the plan's freezing and LR factors for it); Lightning writes them at
    the trainer's ``log_every_n_steps``, at the same steps as ``train/loss``.

    Args:
        enabled: log at all.
        trainable_params: also log the number of parameters that require grad, and their fraction
            of all the model's parameters.
    """

    def __init__(self, enabled: bool = True, trainable_params: bool = True) -> None:
        self.enabled = enabled
        self.trainable_params = trainable_params

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self.enabled:
            return
        for name, lr in layer_group_lrs(optimizer.param_groups).items():
            pl_module.log(f"lr/{name}", lr, on_step=True, on_epoch=False, batch_size=1)
        if self.trainable_params:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            count = sum(p.numel() for p in params if p.requires_grad)
            pl_module.log("trainable_params", float(count), on_step=True, on_epoch=False, batch_size=1)
            total = sum(p.numel() for p in params)
            pl_module.log("trainable_fraction", count / max(total, 1), on_step=True, on_epoch=False, batch_size=1)


def layer_group_lrs(param_groups: list[dict]) -> dict[str, float]:
    """``{layer group name: lr}`` from optimizer param groups, one entry per layer group.

    A layer group's decay and no-decay param groups share their lr; the first one seen
    speaks for both. Groups without a ``name`` are called ``pg<i>`` (as Lightning does).
    """
    out: dict[str, float] = {}
    seen: set = set()
    for i, g in enumerate(param_groups):
        name = str(g.get("name", f"pg{i}")).removesuffix(NO_DECAY_SUFFIX)
        key = g.get("layer_group", name)
        if key in seen:
            continue
        seen.add(key)
        out[name] = float(g["lr"])
    return out
