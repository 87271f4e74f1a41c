"""to_rgb / to_model_mode on every PIL mode, and check_image on broken files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lit_ft.data.images import check_image, open_image, to_model_mode, to_rgb


def pixel(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(np.atleast_1d(np.asarray(img)[xy[1], xy[0]]).tolist())


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
        (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
        (lambda: Image.new("RGB", (4, 4), (1, 2, 3)), (1, 2, 3)),
        (lambda: Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (lambda: Image.new("YCbCr", (4, 4), (255, 128, 128)), (255, 255, 255)),
        # alpha 0 composites to the white background whatever the stored colour
        (lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (255, 255, 255)),
        (lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 255)), (10, 20, 30)),
        (lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        (lambda: Image.new("LA", (4, 4), (40, 255)), (40, 40, 40)),
        # 16-bit: full-range scaling, 65535 -> 255 and 257*k -> k (not clipped, not wrapped)
        (lambda: Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),
        (lambda: Image.fromarray(np.full((4, 4), 257 * 100, np.uint16)), (100, 100, 100)),
        (lambda: Image.fromarray(np.full((4, 4), 65535, np.int32)), (255, 255, 255)),  # mode "I"
        (lambda: Image.fromarray(np.full((4, 4), 1.0, np.float32)), (255, 255, 255)),  # mode "F" in [0, 1]
    ],
)
def test_to_rgb_gives_8bit_rgb_with_right_values(make, expected):
    img = make()
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert out.size == img.size
    assert pixel(out) == expected


def test_to_rgb_16bit_keeps_gradient_order_and_range():
    ramp = np.linspace(0, 65535, 16).astype(np.uint16).reshape(4, 4)
    out = np.asarray(to_rgb(Image.fromarray(ramp)))[..., 0].ravel()
    assert out[0] == 0 and out[-1] == 255
    assert np.all(np.diff(out.astype(int)) > 0)  # no clipping plateau


def test_to_rgb_palette_with_and_without_transparency():
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    assert pixel(to_rgb(pal)) == (255, 0, 0)
    pal.info["transparency"] = 0
    assert pixel(to_rgb(pal)) == (255, 255, 255)


def test_to_model_mode_keeps_single_channel_when_asked():
    sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    gray = to_model_mode(sixteen, grayscale_to_rgb=False)
    assert gray.mode == "L" and pixel(gray) == (255,)
    assert to_model_mode(Image.new("RGBA", (2, 2)), grayscale_to_rgb=False).mode == "RGB"
    assert to_model_mode(Image.new("L", (2, 2)), grayscale_to_rgb=True).mode == "RGB"


def test_16bit_png_file_round_trip(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(path)
    img = open_image(path)
    assert img.mode.startswith("I")
    assert pixel(to_rgb(img)) == (255, 255, 255)


def test_check_image_finds_each_kind_of_bad_file(tmp_path, noise_png):
    good = tmp_path / "good.png"
    good.write_bytes(noise_png())
    jpg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpg, "JPEG")
    files = {
        "empty.png": b"",
        "text.jpg": b"this is not an image",
        "truncated.png": noise_png()[:-600],
        "truncated.jpg": jpg.getvalue()[: len(jpg.getvalue()) // 2],
        "corrupt.png": noise_png()[:40] + b"\x00" * 2000,
    }
    assert check_image(good) is None
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert check_image(tmp_path / name) is not None, name
    assert "0 bytes" in check_image(tmp_path / "empty.png")
