"""Shifted test sets: each corruption does what its table row says, by a bounded amount, the same
way every time for the same (seed, sample), and the ``data.shift`` option serves it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_ft.data import SyntheticDataModule
from tests.cli_args import synthetic_run
from lit_ft.data.corruptions import CORRUPTIONS, SEVERITIES, Shift, ShiftedDataset, corrupt
from lit_ft.errors import UserError

RANDOM = ("gaussian_noise", "rotation", "translation")  # the corruptions that draw random numbers


def blob(side: int = 64, channels: int = 3) -> torch.Tensor:
    """A Fashion-MNIST-like image: a textured bright object on a dark background, (C, H, W) in [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(side) / side - 0.5, torch.arange(side) / side - 0.5, indexing="ij")
    body = ((yy / 0.35) ** 2 + (xx / 0.2) ** 2 < 1).float() * (0.7 + 0.2 * torch.sin(25 * yy))
    return (body + 0.05 * torch.arange(channels)[:, None, None]).clamp(0, 1).contiguous()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_corruption_is_deterministic_keeps_shape_and_range_and_changes_the_image(name, channels):
    x = blob(48, channels)
    for s in SEVERITIES:
        a, b = corrupt(x, name, s, gen(7)), corrupt(x, name, s, gen(7))
        assert torch.equal(a, b)
        assert a.shape == x.shape and a.dtype == x.dtype
        assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
        assert float((a - x).abs().mean()) > 1e-3, f"{name} at severity {s} left the image unchanged"
    if name in RANDOM:
        draws = [corrupt(x, name, 3, gen(seed)) for seed in range(8)]
        assert any(not torch.equal(draws[0], d) for d in draws[1:])  # the seed matters


def test_gaussian_noise_has_the_documented_standard_deviation():
    x = torch.full((3, 64, 64), 0.5)
    for s, sigma in zip((1, 2, 3), (0.08, 0.12, 0.18)):  # no clipping at 0.5 +- 2.8 sigma
        d = corrupt(x, "gaussian_noise", s, gen(0)) - x
        assert float(d.std()) == pytest.approx(sigma, rel=0.05)
        assert abs(float(d.mean())) < 0.01


def test_blur_keeps_the_mean_and_smooths_more_at_each_severity():
    x = blob(64)
    tv = lambda t: float((t[:, 1:] - t[:, :-1]).abs().sum() + (t[:, :, 1:] - t[:, :, :-1]).abs().sum())
    variations = [tv(corrupt(x, "gaussian_blur", s)) for s in SEVERITIES]
    assert all(a > b for a, b in zip([tv(x)] + variations, variations))
    for s in SEVERITIES:
        assert float(corrupt(x, "gaussian_blur", s).mean()) == pytest.approx(float(x.mean()), abs=2e-3)


def test_contrast_moves_each_pixel_towards_the_mean_by_the_documented_factor():
    x = blob(32)
    mean = x.mean(dim=(1, 2), keepdim=True)
    for s, c in zip(SEVERITIES, (0.4, 0.3, 0.2, 0.1, 0.05)):
        out = corrupt(x, "contrast", s)
        torch.testing.assert_close(out - mean, (x - mean) * c)
        torch.testing.assert_close(out.mean(dim=(1, 2), keepdim=True), mean)


def test_brightness_raises_pixels_by_at_most_c_and_keeps_hue():
    x = blob(32) * 0.5  # dark enough that nothing saturates
    for s, c in zip(SEVERITIES, (0.1, 0.2, 0.3, 0.4, 0.5)):
        d = corrupt(x, "brightness", s) - x
        assert float(d.min()) >= -1e-6 and float(d.max()) <= c + 1e-6
        # HSV value (the channel maximum) goes up by exactly c where nothing clips
        torch.testing.assert_close((x + d).amax(0), x.amax(0) + c)
    bright = corrupt(x, "brightness", 3)
    inside = x.amax(0) > 0.1
    ratio = bright[:, inside] / x[:, inside]
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))  # one factor per pixel: hue and saturation kept


def test_rotation_turns_about_the_centre():
    side = 65
    yy, xx = torch.meshgrid(torch.arange(side) - 32.0, torch.arange(side) - 32.0, indexing="ij")
    round_bump = torch.exp(-(xx**2 + yy**2) / 150.0).expand(3, side, side).contiguous()
    bar = ((xx.abs() < 3) & (yy.abs() < 25)).float().expand(3, side, side).contiguous()
    for s in SEVERITIES:  # an isotropic image hardly changes; a bar does
        assert float((corrupt(round_bump, "rotation", s, gen(0)) - round_bump).abs().max()) < 0.02
        assert float((corrupt(bar, "rotation", s, gen(0)) - bar).abs().mean()) > 0.01


@pytest.mark.parametrize("severity,fraction", list(zip(SEVERITIES, (0.04, 0.08, 0.12, 0.16, 0.20))))
def test_translation_shifts_by_the_documented_fraction_of_the_side(severity, fraction):
    x = blob(50)
    out = corrupt(x, "translation", severity, gen(3))
    n = 50
    found = None
    for dy in range(-12, 13):
        for dx in range(-12, 13):
            shifted = torch.zeros_like(x)
            shifted[:, max(dy, 0): n + min(dy, 0), max(dx, 0): n + min(dx, 0)] = x[:, max(-dy, 0): n - max(dy, 0), max(-dx, 0): n - max(dx, 0)]
            if torch.allclose(out, shifted, atol=1e-5):
                found = (dx, dy)
    assert found is not None, "the output is not a pure integer shift of the input"
    assert math.hypot(*found) == pytest.approx(fraction * n, abs=1.0)


def test_jpeg_lands_on_8_bit_values_and_loses_more_at_each_severity():
    x = blob(64)
    errors = []
    for s in SEVERITIES:
        out = corrupt(x, "jpeg_compression", s)
        torch.testing.assert_close(out * 255, (out * 255).round())
        errors.append(float(((out - x) ** 2).mean()))
    psnr = [10 * math.log10(1 / e) for e in errors]
    assert all(p > 20 for p in psnr)  # still the same picture
    assert psnr[-1] < psnr[0]


def test_pixelate_leaves_blocks_of_the_documented_size():
    x = blob(64)
    for s, c in zip(SEVERITIES, (0.6, 0.5, 0.4, 0.3, 0.25)):
        out = corrupt(x, "pixelate", s)
        rows = torch.unique(out[0], dim=0)
        assert len(rows) <= round(64 * c)
        assert float(out.mean()) == pytest.approx(float(x.mean()), abs=0.02)


def test_unknown_corruption_and_severity_are_clear_errors():
    with pytest.raises(UserError, match="unknown corruption 'fog'"):
        Shift("fog", 1)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="severity must be 1, 2, 3, 4 or 5, got 6"):
        Shift("contrast", 6)


# ----------------------------------------------------------------------- the shifted dataset


class Images(torch.utils.data.Dataset):
    """Normalised tensors, as a test split yields them."""

    def __init__(self, n: int = 40, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)) -> None:
        g = torch.Generator().manual_seed(0)
        self.raw = torch.rand(n, 3, 16, 16, generator=g)
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
        self.targets = np.arange(n) % 4

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i):
        return (self.raw[i] - self.mean) / self.std, int(self.targets[i])


def test_a_shifted_sample_depends_only_on_seed_corruption_and_its_index():
    data = Images()
    full = ShiftedDataset(data, Shift("gaussian_noise", 2), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    sub = ShiftedDataset(data, Shift("gaussian_noise", 2, subset=8), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    assert len(sub) == 8 and sorted(np.bincount(sub.targets)) == [2, 2, 2, 2]  # stratified
    backwards = [sub[i][0] for i in reversed(range(8))][::-1]  # order of access does not matter
    for i, index in enumerate(sub.indices):
        assert torch.equal(sub[i][0], full[int(index)][0]) and torch.equal(backwards[i], sub[i][0])
    other_seed = ShiftedDataset(data, Shift("gaussian_noise", 2, seed=1), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    assert not torch.equal(other_seed[0][0], full[0][0])


def test_the_shifted_dataset_corrupts_the_image_in_pixel_space():
    data = Images()
    mean, std = torch.tensor((0.4, 0.5, 0.6))[:, None, None], torch.tensor((0.2, 0.25, 0.3))[:, None, None]
    shifted = ShiftedDataset(data, Shift("contrast", 4), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    x, y = shifted[3]
    assert y == int(data.targets[3])
    expected = corrupt(data.raw[3], "contrast", 4)
    torch.testing.assert_close(x * std + mean, expected, atol=1e-5, rtol=0)
    clean = ShiftedDataset(data, Shift("none"), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    assert torch.equal(clean[3][0], data[3][0])


def test_the_data_shift_option_corrupts_only_the_test_split():
    def loaders(shift):
        dm = SyntheticDataModule(train_size=16, val_size=16, test_size=24, image_size=32, batch_size=8, augment=False, shift=shift)
        dm.setup()
        return dm

    clean, noisy = loaders(None), loaders(Shift("gaussian_noise", 5, subset=12))
    cx, _ = next(iter(clean.test_dataloader()))
    nx, ny = next(iter(noisy.test_dataloader()))
    assert len(noisy.test_dataloader().dataset) == 12
    index = noisy.test_dataloader().dataset.indices[0]
    assert int(ny[0]) == int(clean.test_dataset[int(index)][1])
    assert not torch.allclose(nx[0], clean.test_dataset[int(index)][0], atol=0.1)
    for split in ("train", "val"):
        a = next(iter(getattr(clean, f"{split}_dataloader")()))[0]
        b = next(iter(getattr(noisy, f"{split}_dataloader")()))[0]
        assert torch.equal(a, b)
    noisy.shift = None  # read at each test dataloader: the same datamodule serves clean data again
    assert torch.equal(next(iter(noisy.test_dataloader()))[0], cx)


def test_lit_ft_test_takes_a_shift_from_the_command_line_and_explains_a_bad_one(capsys):
    from lit_ft.cli import main

    tiny = synthetic_run("test_vit", test_size=32, trainer={"logger": False})
    cli = main(["test", *tiny, "--data.shift", "{corruption: pixelate, severity: 4, subset: 20}"], return_cli=True)
    assert cli.datamodule.shift == Shift("pixelate", 4, subset=20)
    assert "test/acc" in cli.trainer.callback_metrics
    with pytest.raises(SystemExit) as exit:
        main(["test", *tiny, "--data.shift", "{corruption: pixelate, severity: 9}"])
    assert exit.value.code == 2
    assert "severity must be 1, 2, 3, 4 or 5, got 9" in capsys.readouterr().err
