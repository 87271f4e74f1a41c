"""BSS, batch spectral shrinkage (Chen et al., NeurIPS 2019): suppress the feature directions
with the smallest singular values, which carry the least transferable (most negatively
transferred) information."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lit_ft.errors import UserError
from lit_ft.regularizers.base import Regularizer, StepOutputs, check_nonnegative

if TYPE_CHECKING:  # pragma: no cover
    from lit_ft.models.classifier import ImageClassifier


def smallest_singular_values(features: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest singular values of a (B, D) feature matrix, smallest first."""
    s = torch.linalg.svdvals(features.float())  # (min(B, D),), descending
    return s.flip(0)[:k]


class BSS(Regularizer):
    """``eta * sum_{i<=k} sigma_{-i}^2``: the k smallest singular values of the batch's pooled
    features (``forward_head(pre_logits=True)``, (B, D)).

    Costs nothing while the whole backbone is frozen (the features carry no gradient then).

    Args:
        eta: penalty weight (the paper uses 0.001).
        k: how many of the smallest singular values to shrink; must be smaller than the batch.
    """

    name = "bss"

    def __init__(self, eta: float = 0.001, k: int = 1) -> None:
        super().__init__()
        check_nonnegative(eta=eta)
        if k < 1:
            raise UserError(f"BSS.k must be >= 1, got {k}", "k=1 is the paper's choice")
        self.eta = eta
        self.k = k

    def penalty(self, module: "ImageClassifier", out: StepOutputs) -> torch.Tensor:
        if not out.feats.requires_grad:  # backbone frozen: nothing this term could change
            return out.loss.new_zeros(())
        pooled = module.model.forward_head(out.feats, pre_logits=True)  # (B, D)
        pooled = pooled.flatten(1)
        if pooled.shape[0] <= self.k:
            return out.loss.new_zeros(())  # a tiny last batch: every direction is "smallest"
        return self.eta * (smallest_singular_values(pooled, self.k) ** 2).sum().to(out.loss.dtype)
