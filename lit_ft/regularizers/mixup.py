"""Mixup / CutMix for the training step, on top of timm's implementation."""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import timm.data
import torch

from lit_ft.errors import UserError


class Mixup:
    """Mix pairs of training images (mixup) or paste a patch of one into another (CutMix);
    targets become the matching soft (B, C) label mixtures.

    The model's ``label_smoothing`` also smooths the mixed targets (cross-entropy applies it to
    soft targets), so there is no second smoothing knob here. Training accuracy is still computed
    on the original hard labels; validation and test never see mixing. The randomness is a pure
    function of ``(seed, epoch, batch index, rank)``, so a resumed run mixes exactly as an uninterrupted one.

    Args:
        mixup_alpha: Beta(alpha, alpha) for the mixup ratio; 0 disables mixup.
        cutmix_alpha: Beta(alpha, alpha) for the CutMix area; 0 disables CutMix.
        prob: probability of mixing a batch (or element, see ``mode``).
        switch_prob: with both on, probability of CutMix instead of mixup.
        mode: draw the parameters per ``batch``, per ``pair`` of elements, or per ``elem``.
        off_epoch: no mixing from this epoch on (fine-tune the last epochs on clean images).
        seed: seed of the mixing randomness.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.2,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: Literal["batch", "pair", "elem"] = "batch",
        off_epoch: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or (mixup_alpha == 0 and cutmix_alpha == 0):
            raise UserError(
                f"Mixup needs mixup_alpha > 0 or cutmix_alpha > 0 (got {mixup_alpha}, {cutmix_alpha})",
                "typical: mixup_alpha 0.2, or cutmix_alpha 1.0; remove `mixup` to train without mixing",
            )
        if not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
            raise UserError(f"Mixup prob/switch_prob must be in [0, 1], got {prob}, {switch_prob}")
        if mode not in ("batch", "pair", "elem"):
            raise UserError(f"Mixup mode {mode!r} is invalid", "use batch, pair or elem")
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.mode = mode
        self.off_epoch = off_epoch
        self.seed = seed

    def active(self, epoch: int) -> bool:
        return self.off_epoch is None or epoch < self.off_epoch

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, epoch: int = 0, batch: int = 0, rank: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images (a new tensor; ``x`` is untouched) and soft targets (B, C).

        Args:
            x: images (B, 3, H, W).
            y: class indices (B,).
            num_classes: width of the targets.
            epoch, batch, rank: where in training this batch is; with ``seed`` they fix the draw.
        """
        mix = timm.data.Mixup(
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            prob=self.prob,
            switch_prob=self.switch_prob,
            mode=self.mode,
            label_smoothing=0.0,
            num_classes=num_classes,
        )
        x = x.clone()  # timm mixes in place; the batch may be a cached tensor
        even = x.shape[0] - x.shape[0] % 2  # timm pairs images: an odd last one stays unmixed
        targets = torch.nn.functional.one_hot(y, num_classes).to(x.dtype)
        if even < 2:
            return x, targets
        state = np.random.get_state()  # timm draws from numpy's global RNG: borrow it, put it back
        try:
            np.random.seed(np.random.SeedSequence([self.seed, epoch, batch, rank]).generate_state(1)[0])
            x[:even], targets[:even] = mix(x[:even], y[:even])
        finally:
            np.random.set_state(state)
        return x, targets.to(x.dtype)

    def __repr__(self) -> str:
        return f"Mixup({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"
