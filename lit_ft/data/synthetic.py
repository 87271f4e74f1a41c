"""Generated images for tests, smoke runs and benchmarks (no files, no network)."""

from __future__ import annotations

import colorsys
from typing import Any, Literal, Optional

import numpy as np
import torch

from lit_ft.data.base import BaseImageDataModule, Split
from lit_ft.data.datasets import ArraySource
from lit_ft.errors import UserError

NATIVE_SIZE = 32  # generated resolution; the transforms resize to the model's input size
_STREAMS = {"train": 10, "val": 11, "test": 12}  # one random stream per split, all from `seed`


class SyntheticDataModule(BaseImageDataModule):
    """Random 32x32 RGB images with labels, generated from ``seed``.

    ``"easy"`` data gives each class its own colour and stripe pattern under pixel noise, so
    even a tiny CNN learns it well above chance in a couple of epochs (colour survives crops
    and flips). ``"random"`` data draws labels independently of the images (nothing to learn:
    a check for leaks and for memorisation). Images go through the same PIL + timm transform
    path as real data.

    Args:
        num_classes: number of classes (named ``class_0``, ``class_1``, ...).
        train_size: training images.
        val_size: validation images (0: no validation).
        test_size: test images (0: no test split).
        difficulty: ``"easy"`` (learnable) or ``"random"`` (labels independent of images).
        **kwargs: options of :class:`~lit_ft.data.base.BaseImageDataModule`.
    """

    def __init__(
        self,
        num_classes: int = 4,
        train_size: int = 256,
        val_size: int = 64,
        test_size: int = 64,
        difficulty: Literal["easy", "random"] = "easy",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise UserError(f"num_classes={num_classes} is invalid", "use num_classes >= 1")
        for option, size in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if size < 0:
                raise UserError(f"{option}={size} is negative", f"use {option} >= 0")
        if difficulty not in ("easy", "random"):
            raise UserError(f"difficulty={difficulty!r} is invalid", "use 'easy' or 'random'")
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.difficulty = difficulty
        self._set_classes([f"class_{i}" for i in range(num_classes)])

    # The validation split is generated, so val_size=0 means "none", not "hold out val_split".
    _val_from_train = False

    def _missing_hint(self, split: str) -> str:
        return f"set {split}_size > 0"

    def _load_source(self, split: Split) -> Optional[ArraySource]:
        n = self.sizes[split]
        if n == 0:
            return None
        images, labels = generate(n, len(self._classes or ()), self.difficulty, self.seed, _STREAMS[split])
        return ArraySource(torch.from_numpy(images), labels)


def class_colours(num_classes: int) -> np.ndarray:
    """A fixed, distinct RGB colour per class (hues around the wheel, three brightness levels)."""
    colours = [
        colorsys.hsv_to_rgb(c / num_classes, 0.8, (0.9, 0.65, 0.4)[c % 3] if num_classes > 6 else 0.85)
        for c in range(num_classes)
    ]
    return np.round(np.array(colours) * 255.0)


def generate(n: int, num_classes: int, difficulty: str, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images ``(n, 32, 32, 3)`` and their labels, deterministic in (seed, stream).

    Args:
        n: number of images.
        num_classes: number of classes.
        difficulty: ``"easy"`` (image depends on label) or ``"random"`` (independent).
        seed: random seed.
        stream: independent stream of ``seed`` (one per split).
    """
    rng = np.random.default_rng([seed, stream])
    if difficulty == "easy":
        labels = rng.permutation(np.arange(n) % num_classes)  # balanced
        look = labels
    else:
        labels = rng.integers(0, num_classes, n)
        look = rng.integers(0, num_classes, n)  # what the image shows, unrelated to its label
    coords = np.arange(NATIVE_SIZE, dtype=np.float64)
    period = 4.0 + (look % 5)[:, None, None]  # class-specific stripe frequency ...
    along = np.where((look % 2 == 0)[:, None, None], coords[None, :, None], coords[None, None, :])  # ... and direction
    stripes = 30.0 * np.sin(2 * np.pi * along / period)
    images = class_colours(num_classes)[look][:, None, None, :] + stripes[..., None]
    images = images + rng.normal(0.0, 20.0, size=(n, NATIVE_SIZE, NATIVE_SIZE, 3))
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels.astype(np.int64)
