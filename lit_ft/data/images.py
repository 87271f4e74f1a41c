"""Decoding image files and normalising PIL modes to what timm backbones expect.

Every image that reaches a transform goes through :func:`to_rgb` (or :func:`to_model_mode`),
so grayscale, palette, alpha and 16-bit files from one folder all become the same 8-bit
mode and stack into one batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Transparent pixels carry arbitrary (often black) colour; compositing on white gives them a
# defined value, and white is what such images (icons, scans, cut-outs) are shown on.
_BACKGROUND = (255, 255, 255, 255)

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SINGLE_CHANNEL_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an 8-bit ``"RGB"`` image, whatever its mode.

    * ``L``/``1``: the gray value is repeated in the three channels.
    * ``P``: the palette is applied (with its transparency, if any, composited on white).
    * ``RGBA``/``LA``/``PA``: composited on a white background.
    * ``I;16*`` / ``I``: 16-bit values are scaled to 8 bits over the full 16-bit range
      (65535 -> 255), so intensity keeps its absolute meaning; 32-bit ``I`` data outside
      0..65535 and ``F`` data are min-max scaled (``F`` in [0, 1] is scaled by 255).
    * ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``: converted by PIL.

    Args:
        img: any PIL image.

    Returns:
        A new ``"RGB"`` image (or ``img`` itself when it already is one).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img.convert("RGBA"))
    if mode.startswith("I") or mode == "F":
        return _wide_to_8bit(img).convert("RGB")
    return img.convert("RGB")


def to_gray(img: Image.Image) -> Image.Image:
    """Return a single-channel image as 8-bit ``"L"`` (alpha composited on white, 16-bit scaled).

    Args:
        img: an image whose mode is single-channel (see :func:`is_single_channel`).
    """
    mode = img.mode
    if mode == "L":
        return img
    if mode in ("LA", "La"):
        return _composite_on_white(img.convert("RGBA")).convert("L")
    if mode.startswith("I") or mode == "F":
        return _wide_to_8bit(img)
    return img.convert("L")


def is_single_channel(img: Image.Image) -> bool:
    """Whether ``img`` holds one intensity channel (plus, possibly, alpha)."""
    return img.mode in _SINGLE_CHANNEL_MODES


def to_model_mode(img: Image.Image, grayscale_to_rgb: bool = True) -> Image.Image:
    """``to_rgb(img)``, or keep single-channel images single-channel (as ``"L"``).

    Args:
        img: any PIL image.
        grayscale_to_rgb: repeat single-channel images to three channels.
    """
    if not grayscale_to_rgb and is_single_channel(img):
        return to_gray(img)
    return to_rgb(img)


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _BACKGROUND)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float image to an 8-bit ``"L"`` image."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = arr.astype(np.float64) / 257.0  # 65535 / 257 == 255 exactly
    elif img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = arr * 255.0 if lo >= 0.0 and hi <= 1.0 else _min_max(arr, lo, hi)
    else:  # "I": 16-bit PNG/TIFF data decoded into 32 bits by older decoders, or true 32-bit
        lo, hi = int(arr.min()), int(arr.max())
        scaled = arr.astype(np.float64) / 257.0 if lo >= 0 and hi <= 65535 else _min_max(arr, lo, hi)
    out = np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def _min_max(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float64)
    return (arr.astype(np.float64) - lo) * (255.0 / (hi - lo))


def open_image(path: Union[str, Path]) -> Image.Image:
    """Fully decode the image at ``path`` (the file is closed on return).

    EXIF orientation is applied, because phone photos store pixels sideways and rely on the
    viewer to rotate them; a model should see what the user saw.

    Raises:
        OSError, SyntaxError, ValueError, ...: whatever PIL raises for unreadable files.
    """
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img)


def check_image(path: Union[str, Path]) -> Optional[str]:
    """Return why the file at ``path`` cannot be used as an image, or ``None`` if it can.

    This decodes the whole file: ``Image.verify()`` alone misses truncated files, which only
    fail when the pixel data runs out.
    """
    try:
        if Path(path).stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            if img.format == "JPEG":
                # DCT-domain downscaling still reads the whole stream (so truncation is caught)
                # but skips most of the work of a full-size decode.
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as err:  # PIL decoders raise many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None
