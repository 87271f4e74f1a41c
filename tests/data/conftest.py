"""Fixtures that write small image datasets to disk."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, colour)


def png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def make_folder() -> Callable[..., Path]:
    """``make_folder(root, {"cat": 5, "dog": 3})`` writes solid-colour PNGs per class folder."""

    def make(root: Path, counts: dict[str, int], size: tuple[int, int] = (16, 16), ext: str = ".png") -> Path:
        for c, (name, n) in enumerate(sorted(counts.items())):
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                solid(COLOURS[c % len(COLOURS)], size).save(folder / f"{name}_{i:03d}{ext}")
        return root

    return make


@pytest.fixture
def noise_png() -> Callable[[int], bytes]:
    """PNG bytes of a noisy (hardly compressible) image, so truncating it cuts pixel data."""

    def make(seed: int = 0) -> bytes:
        rng = np.random.default_rng(seed)
        return png_bytes(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))

    return make
