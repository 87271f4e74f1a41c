"""Data config resolution (model config + user overrides) and timm transforms built from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import timm.data
import torch
from PIL import Image

from lit_ft.data.images import to_model_mode
from lit_ft.errors import UserError

DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def default_data_config() -> dict[str, Any]:
    """What timm resolves for a model that has no pretrained config (224 px, bicubic, ImageNet stats)."""
    return dict(timm.data.resolve_data_config(args={"in_chans": 3}))


def resolve_data_config(
    model_config: Optional[Mapping[str, Any]] = None,
    image_size: Optional[int] = None,
    mean: Optional[tuple[float, ...]] = None,
    std: Optional[tuple[float, ...]] = None,
    interpolation: Optional[str] = None,
    crop_pct: Optional[float] = None,
) -> dict[str, Any]:
    """Merge timm defaults, the model's data config and the user's overrides (in that order).

    Args:
        model_config: timm data config of the model (keys as in ``DATA_CONFIG_KEYS``); missing
            or ``None`` entries fall back to timm's defaults.
        image_size: square input size that replaces the model's.
        mean: normalisation mean that replaces the model's.
        std: normalisation std that replaces the model's.
        interpolation: resize interpolation that replaces the model's.
        crop_pct: eval center-crop fraction that replaces the model's.

    Returns:
        A full data config dict with ``input_size`` as ``(C, H, W)``.
    """
    cfg = default_data_config()
    for key, value in (model_config or {}).items():
        if key in DATA_CONFIG_KEYS and value is not None:
            cfg[key] = value
    cfg["input_size"] = _input_size(cfg["input_size"])
    overrides = {"mean": mean, "std": std, "interpolation": interpolation, "crop_pct": crop_pct}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if image_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], image_size, image_size)
    cfg["mean"] = tuple(float(m) for m in cfg["mean"])
    cfg["std"] = tuple(float(s) for s in cfg["std"])
    return cfg


def _input_size(size: Any) -> tuple[int, int, int]:
    if isinstance(size, int):
        return (3, size, size)
    size = tuple(int(s) for s in size)
    if len(size) == 2:
        return (3, *size)
    if len(size) == 3:
        return size  # type: ignore[return-value]
    raise ValueError(f"data config input_size must be int, (H, W) or (C, H, W), got {size!r}")


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation options (see :class:`~lit_ft.data.base.BaseImageDataModule`)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    auto_augment: Optional[str] = None
    color_jitter: float = 0.0
    re_prob: float = 0.0


def timm_transform(cfg: Mapping[str, Any], aug: Optional[Augmentation], channels: int = 3) -> Callable[[Image.Image], torch.Tensor]:
    """timm's train transform (``aug`` given) or its deterministic eval transform (``aug=None``).

    Args:
        cfg: resolved data config.
        aug: augmentation options, or ``None`` for the eval transform (resize, center crop).
        channels: 1 builds the transform for single-channel images (mean/std averaged to one
            value); 3 for RGB.
    """
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if channels == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    common = dict(input_size=cfg["input_size"], interpolation=cfg["interpolation"], mean=mean, std=std)
    if aug is None:
        return timm.data.create_transform(
            **common, is_training=False, crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode")
        )
    return timm.data.create_transform(
        **common,
        is_training=True,
        scale=aug.scale,
        ratio=aug.ratio,
        hflip=aug.hflip,
        vflip=aug.vflip,
        auto_augment=aug.auto_augment,
        # timm defaults to 0.4 jitter; ours is opt-in. None leaves out a no-op ColorJitter.
        color_jitter=aug.color_jitter or None,
        re_prob=aug.re_prob,
    )


def check_auto_augment(policy: str) -> None:
    """Raise a :class:`UserError` if timm cannot parse the auto-augment string ``policy``."""
    try:
        timm.data.create_transform(32, is_training=True, auto_augment=policy)
    except Exception as err:  # timm's parser fails with AssertionError/KeyError/ValueError
        raise UserError(
            f"auto_augment={policy!r} is not a timm auto-augment policy ({type(err).__name__}: {err})",
            "use e.g. 'rand-m9-mstd0.5', 'rand-m9-mstd0.5-inc1', 'augmix-m5-w3', 'original' or 'v0'",
        ) from err


class ImageTransform:
    """PIL image in any mode -> normalised tensor.

    Converts the image with :func:`~lit_ft.data.images.to_model_mode` first, so 16-bit,
    palette and alpha images are handled before timm's transform sees them.

    Args:
        cfg: resolved data config.
        aug: augmentation options for training, ``None`` for evaluation.
        grayscale_to_rgb: repeat single-channel images to 3 channels; when False they stay
            1-channel (for backbones created with ``in_chans=1``).
    """

    def __init__(self, cfg: Mapping[str, Any], aug: Optional[Augmentation], grayscale_to_rgb: bool = True) -> None:
        self.grayscale_to_rgb = grayscale_to_rgb
        self.rgb = timm_transform(cfg, aug, channels=3)
        self.gray = None if grayscale_to_rgb else timm_transform(cfg, aug, channels=1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_model_mode(img, self.grayscale_to_rgb)
        if img.mode == "L" and self.gray is not None:
            return self.gray(img)
        return self.rgb(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(grayscale_to_rgb={self.grayscale_to_rgb}, rgb={self.rgb!r})"
