"""Plain L1 / L2 penalties on chosen layer groups, on top of the optimizer's weight decay."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

from lit_ft.optim import is_no_decay
from lit_ft.regularizers.base import GroupRef, Regularizer, StepOutputs, check_nonnegative, group_indices, group_params, sum_or_zero

if TYPE_CHECKING:  # pragma: no cover
    from lit_ft.models.classifier import ImageClassifier


class _NormPenalty(Regularizer):
    def __init__(self, weight: float, groups: Optional[Sequence[GroupRef]], skip_norm_bias: bool) -> None:
        super().__init__()
        check_nonnegative(weight=weight)
        self.weight = weight
        self.groups = list(groups) if groups is not None else None
        self.skip_norm_bias = skip_norm_bias
        self._names: list[str] = []

    def bind(self, module: "ImageClassifier") -> None:
        indices = group_indices(module, self.groups, range(len(module.groups)))
        self._names = [
            n for n, p in group_params(module, indices) if not (self.skip_norm_bias and is_no_decay(n, p.shape))
        ]

    def _term(self, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def penalty(self, module: "ImageClassifier", out: StepOutputs) -> torch.Tensor:
        params = dict(module.model.named_parameters())
        total = sum_or_zero((self._term(params[n]) for n in self._names if params[n].requires_grad), out.loss)
        return self.weight * total


class L2(_NormPenalty):
    """``weight/2 * ||w||^2`` over the chosen groups (frozen parameters skipped).

    Args:
        weight: penalty weight.
        groups: layer groups (names or indices, ``-1`` = head); default all.
        skip_norm_bias: leave biases, norm weights and tokens out (as weight decay does).
    """

    name = "l2"

    def __init__(self, weight: float = 1e-4, groups: Optional[Sequence[GroupRef]] = None, skip_norm_bias: bool = True) -> None:
        super().__init__(weight, groups, skip_norm_bias)

    def _term(self, p: torch.Tensor) -> torch.Tensor:
        return 0.5 * (p**2).sum()


class L1(_NormPenalty):
    """``weight * ||w||_1`` over the chosen groups (frozen parameters skipped); favours sparse weights.

    Args:
        weight: penalty weight.
        groups: layer groups (names or indices, ``-1`` = head); default all.
        skip_norm_bias: leave biases, norm weights and tokens out.
    """

    name = "l1"

    def __init__(self, weight: float = 1e-5, groups: Optional[Sequence[GroupRef]] = None, skip_norm_bias: bool = True) -> None:
        super().__init__(weight, groups, skip_norm_bias)

    def _term(self, p: torch.Tensor) -> torch.Tensor:
        return p.abs().sum()
