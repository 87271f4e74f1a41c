"""Test sets under distribution shift: ImageNet-C-style corruptions applied on the fly.

Owns: the corruption family (:data:`CORRUPTIONS`, :func:`corrupt`), the ``shift`` data option
(:class:`Shift`) and :class:`ShiftedDataset`, the wrapper that serves a corrupted (and
optionally subsampled) test split. Must not touch: the model or the evaluation loop (the
robustness report, which evaluates a model on every corruption, is :mod:`lit_ft.robustness`).

Where the corruption happens: on the image exactly as the model receives it (after the eval
transform's resize and crop, before normalisation), as ImageNet-C corrupts its 224 px
center crops. The wrapper un-normalises the tensor to [0, 1] with the data config's mean/std,
corrupts it, clips to [0, 1] and normalises it again.

Determinism: every random draw of sample ``i`` (noise, a rotation's sign, a translation's
direction) comes from a generator seeded with ``sample_seed(shift.seed, corruption, i)``
(:mod:`lit_ft.data.seeding`), whoever loads it and in any order. The seed does not depend on the
severity, so the severities are nested: the same sample gets the same noise pattern, the same
rotation direction, ... at every severity, only stronger. ``i`` is the sample's index in the
whole test split, so a subset draws what the full split would for the same images.

The family (``s`` = severity 1..5; side = the image side in pixels):

================  ==========================================================  ==========================
name              what                                                        parameter at s = 1..5
================  ==========================================================  ==========================
gaussian_noise    add N(0, sigma^2) per pixel and channel (ImageNet-C)          sigma .08 .12 .18 .26 .38
gaussian_blur     Gaussian blur, sigma scaled to the side (Tiny-ImageNet-C      sigma = side/64 x
                  values at 64 px; ~ ImageNet-C's at 224 px)                    .5 .75 1 1.25 1.5
contrast          (x - mean) * c + mean, per image and channel (ImageNet-C)     c .4 .3 .2 .1 .05
brightness        HSV value + c, hue and saturation kept (ImageNet-C)           c .1 .2 .3 .4 .5
rotation          rotate by +-angle (random sign), bilinear, black corners      6 12 18 24 30 degrees
translation       shift by a fraction of the side in a random direction,        .04 .08 .12 .16 .20
                  black fill
jpeg_compression  JPEG encode/decode at a quality (ImageNet-C)                  25 18 15 10 7
pixelate          area-downsample to c x side, nearest-upsample (ImageNet-C)    c .6 .5 .4 .3 .25
================  ==========================================================  ==========================

``none`` leaves the images as they are: the clean baseline on the same (sub)set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from lit_ft.data.seeding import sample_seed
from lit_ft.data.splits import stratified_sample
from lit_ft.errors import UserError

#: The corruption family, in report order.
CorruptionName = Literal[
    "gaussian_noise", "gaussian_blur", "contrast", "brightness", "rotation", "translation", "jpeg_compression", "pixelate",
]
#: A shift's corruption: one of the family, or ``none`` (the clean baseline on the same images).
Corruption = Literal["none", CorruptionName]
CORRUPTIONS: tuple[str, ...] = get_args(CorruptionName)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
# A separate random stream per corruption (never per severity: severities are nested).
_STREAM = {name: 1_000 + i for i, name in enumerate(get_args(Corruption))}

_NOISE_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)
_BLUR_SIGMA_AT_64 = (0.5, 0.75, 1.0, 1.25, 1.5)
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
_ROTATION_DEG = (6.0, 12.0, 18.0, 24.0, 30.0)
_TRANSLATION = (0.04, 0.08, 0.12, 0.16, 0.20)
_JPEG_QUALITY = (25, 18, 15, 10, 7)
_PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)


@dataclass(frozen=True)
class Shift:
    """A shifted test set: the ``data.shift`` option of every lit-ft datamodule.

    ``lit-ft test ... --data.shift '{corruption: gaussian_noise, severity: 3}'`` tests on the
    test split with that corruption applied (see the table in :mod:`lit_ft.data.corruptions`).

    Args:
        corruption: which corruption (``none``: the clean images of the same subset).
        severity: 1 (mild) to 5 (strong).
        seed: seed of the corruptions' random draws; fixed by default, so every run and every
            model is tested on the very same shifted images.
        subset: test on a fixed, class-stratified sample of this many test images (from ``seed``)
            instead of all of them, to keep a grid of corruptions affordable.
    """

    corruption: Corruption = "gaussian_noise"
    severity: int = 3
    seed: int = 0
    subset: Optional[int] = None

    def __post_init__(self) -> None:
        if self.corruption not in get_args(Corruption):
            raise UserError(f"unknown corruption {self.corruption!r}", f"use one of {', '.join(get_args(Corruption))}")
        if isinstance(self.severity, bool) or self.severity not in SEVERITIES:
            raise UserError(f"shift severity must be 1, 2, 3, 4 or 5, got {self.severity!r}", "1 is mild, 5 is strong")
        if self.subset is not None and self.subset < 1:
            raise UserError(f"shift subset must be >= 1 images, got {self.subset}", "drop subset to test on every image")

    @property
    def name(self) -> str:
        """``gaussian_noise/3`` (``none`` for the clean baseline)."""
        return "none" if self.corruption == "none" else f"{self.corruption}/{self.severity}"


def corrupt(x: torch.Tensor, corruption: str, severity: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``x`` (C, H, W), values in [0, 1], with ``corruption`` at ``severity`` applied; in [0, 1].

    Random draws come from ``generator`` (a fresh unseeded one if None); with the same
    generator state the result is the same. C may be 1 or 3.
    """
    if corruption not in get_args(Corruption):
        raise UserError(f"unknown corruption {corruption!r}", f"use one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise UserError(f"severity must be in 1..5, got {severity!r}")
    if x.ndim != 3 or not x.is_floating_point():
        raise ValueError(f"corrupt() takes a float (C, H, W) tensor in [0, 1], got {x.dtype} {tuple(x.shape)}")
    g = generator if generator is not None else torch.Generator()
    k = severity - 1
    _, h, w = x.shape
    if corruption == "none":
        out = x
    elif corruption == "gaussian_noise":
        out = x + _NOISE_SIGMA[k] * torch.randn(x.shape, generator=g, dtype=x.dtype)
    elif corruption == "gaussian_blur":
        sigma = _BLUR_SIGMA_AT_64[k] * min(h, w) / 64.0
        size = 2 * math.ceil(3 * sigma) + 1  # covers +-3 sigma
        out = TF.gaussian_blur(x, [size, size], [sigma, sigma])
    elif corruption == "contrast":
        mean = x.mean(dim=(1, 2), keepdim=True)
        out = (x - mean) * _CONTRAST[k] + mean
    elif corruption == "brightness":
        # HSV value V = max over channels; with hue and saturation fixed, RGB scales with V.
        v = x.amax(dim=0, keepdim=True)  # (1, H, W)
        v_new = (v + _BRIGHTNESS[k]).clamp(max=1.0)
        out = torch.where(v > 0, x * v_new / v.clamp(min=1e-12), v_new.expand_as(x))
    elif corruption == "rotation":
        sign = 1.0 if torch.rand((), generator=g) < 0.5 else -1.0
        out = TF.rotate(x, sign * _ROTATION_DEG[k], interpolation=InterpolationMode.BILINEAR, fill=0.0)
    elif corruption == "translation":
        theta = 2 * math.pi * float(torch.rand((), generator=g))
        dx, dy = round(_TRANSLATION[k] * w * math.cos(theta)), round(_TRANSLATION[k] * h * math.sin(theta))
        out = TF.affine(x, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0], fill=0.0)
    elif corruption == "jpeg_compression":
        u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        out = decode_jpeg(encode_jpeg(u8, quality=_JPEG_QUALITY[k])).to(x.dtype) / 255.0
    else:  # pixelate
        small = (max(1, round(h * _PIXELATE[k])), max(1, round(w * _PIXELATE[k])))
        out = F.interpolate(F.interpolate(x[None], size=small, mode="area"), size=(h, w), mode="nearest")[0]
    return out.clamp(0.0, 1.0)


class ShiftedDataset(Dataset):
    """A test dataset of normalised image tensors, served corrupted by ``shift`` (and subsampled).

    Item ``i`` is ``(corrupt(image), target)`` for the ``i``-th selected image; its draws are
    seeded from ``(shift.seed, corruption, index in the whole dataset)``.

    Args:
        dataset: yields ``(image tensor (C, H, W) normalised with mean/std, target)``.
        shift: what to apply.
        mean: the normalisation mean (3 values; averaged for 1-channel images, as the transform does).
        std: the normalisation std.
        targets: class of every item of ``dataset`` (for a stratified ``shift.subset``); read from
            ``dataset.targets`` when not given.
    """

    def __init__(
        self, dataset: Dataset, shift: Shift, mean: Sequence[float], std: Sequence[float], targets: Optional[np.ndarray] = None
    ) -> None:
        self.dataset, self.shift = dataset, shift
        self.mean = torch.tensor([float(m) for m in mean])
        self.std = torch.tensor([float(s) for s in std])
        n = len(dataset)  # type: ignore[arg-type]
        if shift.subset is None or shift.subset >= n:
            self.indices = np.arange(n)
        else:
            labels = np.asarray(targets if targets is not None else dataset.targets)  # type: ignore[attr-defined]
            self.indices = stratified_sample(labels, shift.subset, shift.seed)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def targets(self) -> np.ndarray:
        """Class of every served item."""
        return np.asarray(self.dataset.targets)[self.indices]  # type: ignore[attr-defined]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        index = int(self.indices[i])
        x, y = self.dataset[index]
        if self.shift.corruption == "none":
            return x, y
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 3):
            raise UserError(
                "data.shift corrupts normalised image tensors, but the test split yields raw images "
                f"({getattr(x, 'dtype', type(x).__name__)})",
                "set data.batch_transforms: false for the shifted test",
            )
        mean, std = (self.mean, self.std) if x.shape[0] == len(self.mean) else (self.mean.mean(0, True), self.std.mean(0, True))
        mean, std = mean.to(x.dtype)[:, None, None], std.to(x.dtype)[:, None, None]
        g = torch.Generator().manual_seed(sample_seed(self.shift.seed, _STREAM[self.shift.corruption], index))
        x01 = (x * std + mean).clamp(0.0, 1.0)
        return (corrupt(x01, self.shift.corruption, self.shift.severity, g) - mean) / std, y
