"""L2-SP (Li et al., ICML 2018): keep the backbone near its pretrained starting point."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

from lit_ft.errors import UserError
from lit_ft.regularizers.base import (
    GroupRef,
    Regularizer,
    StepOutputs,
    backbone_groups,
    check_nonnegative,
    group_indices,
    group_params,
    sum_or_zero,
)

if TYPE_CHECKING:  # pragma: no cover
    from lit_ft.models.classifier import ImageClassifier


class L2SP(Regularizer):
    """``alpha/2 * ||w - w0||^2`` over the backbone plus ``beta/2 * ||w||^2`` over the new head.

    ``w0`` is captured when the classifier is built (the pretrained weights) and kept as buffers
    (``regularizers.<i>.anchor__<param>``): on resume the checkpoint restores the original
    pretrained anchor, not the resumed weights. Frozen parameters are skipped (they cost
    nothing and sit at their anchor anyway). Prefer ``weight_decay: 0`` on the backbone: decay
    pulls toward zero, L2-SP toward the starting point.

    With ``model.peft`` the backbone's weights never train, so there is nothing to anchor: L2SP
    refuses LoRA/DoRA/(IA)^3 (their adapters have no pretrained value; weight decay on LoRA's A and
    B already pulls the update toward 0, i.e. toward the pretrained weights) and, under BitFit,
    anchors only the biases that train.

    Args:
        alpha: weight of the pull toward the pretrained weights.
        beta: weight of the plain L2 penalty on the head (0 = none).
        groups: backbone layer groups to anchor (names or indices); default every group but
            the head. The head cannot be anchored: it has no pretrained value.
    """

    name = "l2sp"

    def __init__(self, alpha: float = 0.01, beta: float = 0.01, groups: Optional[Sequence[GroupRef]] = None) -> None:
        super().__init__()
        check_nonnegative(alpha=alpha, beta=beta)
        self.alpha = alpha
        self.beta = beta
        self.groups = list(groups) if groups is not None else None
        self._anchored: list[str] = []  # timm parameter names, in model order
        self._head: list[str] = []

    @staticmethod
    def buffer_name(param_name: str) -> str:
        return "anchor__" + param_name.replace(".", "__")

    def bind(self, module: "ImageClassifier") -> None:
        head = len(module.groups) - 1
        peft = getattr(module, "peft", None)
        if peft is not None and peft.method != "bitfit":
            raise UserError(
                f"L2SP pulls the backbone's weights toward their pretrained values, but with model.peft "
                f"({peft.method}) those weights never train (only the adapters do): the penalty would be 0",
                "remove L2SP from model.regularizers; weight decay on the adapters already pulls the adapted model "
                "toward the pretrained one (it shrinks LoRA's update B A toward 0)",
            )
        indices = group_indices(module, self.groups, backbone_groups(module))
        if head in indices:
            raise UserError(
                "L2SP cannot anchor the head: it is new, it has no pretrained value",
                "leave `head`/-1 out of L2SP.groups; use beta for an L2 penalty on the head",
            )
        fixed = {n for i in indices for n in module.groups[i].fixed}  # never train (PEFT's base weights)
        for name, p in group_params(module, indices):
            if name in fixed:
                continue
            self.register_buffer(self.buffer_name(name), p.detach().clone())
            self._anchored.append(name)
        self._head = [n for n, _ in group_params(module, [head])]

    def anchor(self, param_name: str) -> torch.Tensor:
        """The pretrained value of timm parameter ``param_name``."""
        return getattr(self, self.buffer_name(param_name))

    def penalty(self, module: "ImageClassifier", out: StepOutputs) -> torch.Tensor:
        params = dict(module.model.named_parameters())
        sp = sum_or_zero(
            (((params[n] - self.anchor(n)) ** 2).sum() for n in self._anchored if params[n].requires_grad), out.loss
        )
        head = sum_or_zero(((params[n] ** 2).sum() for n in self._head if params[n].requires_grad), out.loss)
        return 0.5 * self.alpha * sp + 0.5 * self.beta * head
