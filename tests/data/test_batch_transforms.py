"""On-device batch transforms for in-memory datasets."""

import pytest
import torch

from lit_ft.data import SyntheticDataModule
from lit_ft.data.batch_transforms import BatchTransform
from lit_ft.data.transforms import Augmentation
from lit_ft.errors import UserError

CFG = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear", "crop_pct": 1.0}


def test_eval_batch_transform_matches_plain_resize_and_normalise():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = BatchTransform(CFG, None)(x)
    ref = torch.nn.functional.interpolate(x.float() / 255, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, (ref - 0.5) / 0.25, atol=1e-5, rtol=0)


def test_grayscale_is_repeated_and_train_crops_differ_per_sample():
    x = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(8, 1, 1, 1)  # 8 identical gray images
    torch.manual_seed(0)
    out = BatchTransform(CFG, Augmentation(scale=(0.2, 0.6), hflip=0.5))(x)
    assert out.shape == (8, 3, 16, 16)
    assert torch.equal(out[:, 0], out[:, 1])
    assert len({tuple(o.flatten()[:20].tolist()) for o in out}) == 8  # each sample its own crop


def test_hflip_only_flips():
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    cfg = dict(CFG, input_size=(3, 16, 16))
    out = BatchTransform(cfg, Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0))(x)
    ref = BatchTransform(cfg, None)(x)
    torch.testing.assert_close(out, ref.flip(-1), atol=1e-5, rtol=0)


def test_datamodule_ships_uint8_and_transforms_after_transfer():
    dm = SyntheticDataModule(image_size=24, batch_size=8, batch_transforms=True)
    dm.setup("fit")
    x, y, uniforms = next(iter(dm.train_dataloader()))  # augmenting: each sample's draws come along
    assert x.dtype == torch.uint8 and x.shape[-1] == 32  # raw, native size
    assert uniforms.shape == (8, BatchTransform.UNIFORMS) and 0 <= uniforms.min() and uniforms.max() < 1
    out, y2 = dm.on_after_batch_transfer((x, y, uniforms), 0)
    assert out.dtype == torch.float32 and out.shape == (8, 3, 24, 24) and torch.equal(y, y2)
    x, y = next(iter(dm.val_dataloader()))
    out, y2 = dm.on_after_batch_transfer((x, y), 0)
    assert out.shape == (x.shape[0], 3, 24, 24) and torch.equal(y, y2)


def test_given_uniforms_fix_the_crop_and_flip():
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    tf = BatchTransform(CFG, Augmentation(scale=(0.2, 1.0), hflip=0.5))
    u = torch.tensor([[0.3, 0.5, 0.2, 0.9, 0.1, 0.7], [0.9, 0.1, 0.5, 0.5, 0.8, 0.2]])
    torch.manual_seed(0)
    a = tf(x, u)
    torch.manual_seed(1)
    assert torch.equal(a, tf(x, u))  # the global RNG plays no part
    full = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.9, 0.9]]).expand(2, 6)  # whole image, square, centred, no flip
    torch.testing.assert_close(tf(x, full), BatchTransform(CFG, None)(x), atol=1e-5, rtol=0)
    flipped = full.clone()
    flipped[:, 4] = 0.0  # u < hflip: flip
    torch.testing.assert_close(tf(x, flipped), BatchTransform(CFG, None)(x).flip(-1), atol=1e-5, rtol=0)


def test_batch_transforms_refuse_unsupported_augmentations():
    with pytest.raises(UserError, match="batch_transforms supports"):
        SyntheticDataModule(batch_transforms=True, auto_augment="rand-m9-mstd0.5")
