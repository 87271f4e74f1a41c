"""The contract every loss-side regularizer follows, and the helpers they share.

A regularizer is an ``nn.Module`` owned by the :class:`~lit_ft.models.ImageClassifier`
(``model.regularizers``), so whatever it keeps (pretrained anchors, a frozen teacher, channel
weights) is a buffer or parameter of the classifier: it moves with ``.to()``, is saved in every
checkpoint and restored on resume. Life cycle:

1. ``bind(module)``: once, at the end of the classifier's ``__init__``, when the backbone holds
   its *pretrained* weights. Capture starting points here. On resume the checkpoint then
   overwrites them with the values captured in the original run, never with resumed weights.
2. ``capture(module)``: a context manager around the training forward (e.g. to hook feature maps).
3. ``penalty(module, out)``: the term added to the training loss, logged as ``reg/<name>``.

Parameters that do not require grad (frozen by the freeze plan) must cost nothing: skip them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from lit_ft.backbones import resolve_group
from lit_ft.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from lit_ft.models.classifier import ImageClassifier

GroupRef = Union[str, int]


@dataclass
class StepOutputs:
    """What one training step computed, handed to every regularizer.

    Attributes:
        x: the input batch after mixup/cutmix, (B, 3, H, W).
        y: targets as given to the loss: (B,) class indices or (B, C) soft targets.
        feats: backbone features before pooling (``forward_features``): (B, C, h, w) or (B, N, D).
        logits: (B, num_classes).
        loss: the task (cross-entropy) loss, before any regularizer is added.
    """

    x: torch.Tensor
    y: torch.Tensor
    feats: torch.Tensor
    logits: torch.Tensor
    loss: torch.Tensor


class Regularizer(nn.Module):
    """Base class of loss-side regularizers (see the module docstring for the life cycle).

    Subclasses set ``name`` (the TensorBoard tag is ``reg/<name>``) and implement ``penalty``.
    """

    name: str = "reg"

    def bind(self, module: "ImageClassifier") -> None:
        """Capture whatever the penalty needs from the freshly built, pretrained ``module``."""

    def capture(self, module: "ImageClassifier") -> contextlib.AbstractContextManager:
        """A context manager entered around the training forward pass."""
        return contextlib.nullcontext()

    def penalty(self, module: "ImageClassifier", out: StepOutputs) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        args = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "training"}
        return ", ".join(f"{k}={v!r}" for k, v in args.items())


def group_indices(module: "ImageClassifier", refs: Optional[Sequence[GroupRef]], default: Sequence[int]) -> list[int]:
    """Layer-group indices from names/indices (``-1`` = head); ``default`` when ``refs`` is None."""
    names = [g.name for g in module.groups]
    if refs is None:
        return sorted(set(default))
    if isinstance(refs, (str, int)):
        raise UserError(f"groups must be a list, got {refs!r}", f"write groups: [{refs}]")
    return sorted({resolve_group(r, names) for r in refs})


def group_params(module: "ImageClassifier", indices: Sequence[int]) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the timm model in the given layer groups, in model order."""
    wanted = {n for i in indices for n in module.groups[i].param_names}
    return [(n, p) for n, p in module.model.named_parameters() if n in wanted]


def backbone_groups(module: "ImageClassifier") -> list[int]:
    """Every layer group except the head (the last one)."""
    return list(range(len(module.groups) - 1))


def check_nonnegative(**values: float) -> None:
    for key, value in values.items():
        if value < 0:
            raise UserError(f"{key} must be >= 0, got {value}", f"set {key} to 0 (off) or a positive weight")


def sum_or_zero(terms: Iterator[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Sum of scalar tensors; a zero that still belongs to ``like``'s device/dtype when empty."""
    total: Optional[torch.Tensor] = None
    for t in terms:
        total = t if total is None else total + t
    return total if total is not None else like.new_zeros(())


def unique_names(names: Sequence[str]) -> list[str]:
    """``[l2, l2, bss]`` -> ``[l2, l2_1, bss]``: one TensorBoard tag per regularizer."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        out.append(n if k == 0 else f"{n}_{k}")
        seen[n] = k + 1
    return out


def match_checkpoint_state(own: dict[str, torch.Tensor], checkpoint_state: dict[str, torch.Tensor]) -> list[str]:
    """Make a checkpoint's regularizer tensors (``regularizers.*``: anchors, DELTA's teacher)
    fit the regularizers of the module loading it, in place.

    Entries of regularizers the module does not have are dropped (they only matter while
    training with them). Entries it needs but the checkpoint lacks get ``own``'s values (those
    captured when the module was built) and are returned, so the caller can warn: on resume
    those anchors are then this build's weights, not the original run's pretrained ones.
    """
    for k in [k for k in checkpoint_state if k.startswith("regularizers.") and k not in own]:
        del checkpoint_state[k]
    missing = [k for k in own if k not in checkpoint_state]
    checkpoint_state.update({k: own[k] for k in missing})
    return missing
