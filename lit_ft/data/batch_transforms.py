"""Resize, random-resized-crop, flips and normalisation on whole uint8 batches, on the device.

For datasets held in memory (Fashion-MNIST, CIFAR, ...), decoding is free and the per-image
PIL pipeline on the CPU is what limits throughput on a fast GPU. With
``batch_transforms: true`` the loader ships raw uint8 tensors and these transforms run on
the batch where the model runs: a random resized crop with flips is one affine
``grid_sample`` per batch (each sample with its own crop).

The random numbers of each sample's crop and flips come with the batch (``UNIFORMS`` draws
per sample, made by :class:`~lit_ft.data.seeding.EpochSeededDataset` from ``(seed, epoch,
sample index)``): drawing them here from the device's RNG would tie the augmentation to the
batch composition, the rank and the device type (CPU and CUDA generators differ), and a
resumed run would not repeat it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from lit_ft.data.transforms import Augmentation

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


class RawUint8:
    """Marker transform: the dataset yields the stored uint8 image as a (C, H, W) tensor."""

    raw = True

    def __repr__(self) -> str:
        return "RawUint8()"


class BatchTransform:
    """uint8 (B, C, H, W) -> normalised float (B, 3, S, S), on the batch's device.

    Args:
        cfg: resolved data config (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``).
        aug: training augmentation (``scale``, ``ratio``, ``hflip``, ``vflip`` are supported), or
            ``None`` for the deterministic eval transform (resize + centre crop by ``crop_pct``).
        grayscale_to_rgb: repeat 1-channel batches to 3 channels.
    """

    #: U[0, 1) draws one sample's augmentation needs: crop area, log aspect, x and y shift, h and v flip.
    UNIFORMS = 6

    def __init__(self, cfg: Mapping[str, Any], aug: Optional[Augmentation], grayscale_to_rgb: bool = True) -> None:
        _, h, w = cfg["input_size"]
        self.size = (int(h), int(w))
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.mode = _MODES.get(cfg.get("interpolation", "bilinear"), "bilinear")
        self.crop_pct = float(cfg.get("crop_pct") or 1.0)
        self.aug = aug
        self.grayscale_to_rgb = grayscale_to_rgb

    def __call__(self, x: torch.Tensor, uniforms: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Transform ``x``; ``uniforms`` (B, UNIFORMS) in [0, 1) fix each sample's augmentation.

        Without ``uniforms`` a training transform draws them from torch's global RNG (for
        callers that seed it themselves); eval transforms ignore them.
        """
        if x.dtype != torch.uint8:
            return x  # already transformed (e.g. cached features)
        x = x.float().div_(255.0)  # (B, C, H, W) in [0, 1]
        if x.shape[1] == 1 and self.grayscale_to_rgb:
            x = x.expand(-1, 3, -1, -1)
        theta = self._random_theta(x, uniforms) if self.aug is not None else self._center_theta(x)
        grid = F.affine_grid(theta, [x.shape[0], x.shape[1], *self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode=self.mode, padding_mode="border", align_corners=False)
        if self.mode == "bicubic":
            x = x.clamp_(0.0, 1.0)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        if x.shape[1] != mean.shape[1]:
            mean, std = mean.mean(1, keepdim=True), std.mean(1, keepdim=True)
        return (x - mean) / std

    def _center_theta(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0] = self.crop_pct
        theta[:, 1, 1] = self.crop_pct
        return theta

    def _random_theta(self, x: torch.Tensor, uniforms: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-sample crop (area fraction in ``scale``, aspect in ``ratio``), shift and flips."""
        aug = self.aug
        b, dev = x.shape[0], x.device
        u = torch.rand(b, self.UNIFORMS, device=dev) if uniforms is None else uniforms.to(dev, torch.float32)
        if u.shape != (b, self.UNIFORMS):
            raise ValueError(f"uniforms must be ({b}, {self.UNIFORMS}), got {tuple(u.shape)}")
        lo, hi = aug.scale
        area = lo + u[:, 0] * (hi - lo)
        log_lo, log_hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
        r = (log_lo + u[:, 1] * (log_hi - log_lo)).exp()
        sw = (area * r).sqrt().clamp(max=1.0)  # crop width as a fraction of the image
        sh = (area / r).sqrt().clamp(max=1.0)
        cx = (u[:, 2] * 2 - 1) * (1 - sw)  # centre, normalised coords
        cy = (u[:, 3] * 2 - 1) * (1 - sh)
        fx = torch.where(u[:, 4] < aug.hflip, -1.0, 1.0)
        fy = torch.where(u[:, 5] < aug.vflip, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = sw * fx
        theta[:, 1, 1] = sh * fy
        theta[:, 0, 2] = cx
        theta[:, 1, 2] = cy
        return theta

    def __repr__(self) -> str:
        return f"BatchTransform(size={self.size}, mode={self.mode}, crop_pct={self.crop_pct}, aug={self.aug})"
