"""Data config resolution (timm defaults < model config < user options) and transforms."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lit_ft.data import SyntheticDataModule
from lit_ft.errors import UserError

MODEL_CFG = {
    "input_size": (3, 48, 40), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25), "crop_pct": 0.9, "crop_mode": "center",
}


def test_timm_defaults_without_model_config():
    cfg = SyntheticDataModule().resolved_data_config
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == pytest.approx((0.485, 0.456, 0.406)) and cfg["crop_pct"] == 0.875


def test_set_data_config_is_used_and_user_options_win():
    dm = SyntheticDataModule(train_size=8, val_size=4, test_size=0, batch_size=8)
    dm.set_data_config(MODEL_CFG)
    dm.setup("fit")
    assert dm.resolved_data_config == MODEL_CFG
    assert next(iter(dm.train_dataloader()))[0].shape == (8, 3, 48, 40)

    dm = SyntheticDataModule(image_size=32, mean=(0.1, 0.2, 0.3), interpolation="nearest", crop_pct=1.0)
    dm.set_data_config(MODEL_CFG)
    cfg = dm.resolved_data_config
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.1, 0.2, 0.3)
    assert cfg["interpolation"] == "nearest" and cfg["crop_pct"] == 1.0
    assert cfg["std"] == (0.25, 0.25, 0.25)  # not overridden: the model's


def test_model_config_from_trainer_module():
    dm = SyntheticDataModule(train_size=4, val_size=4, test_size=0, image_size=24)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(data_config=MODEL_CFG))
    dm.setup("validate")
    assert dm.resolved_data_config["input_size"] == (3, 24, 24)  # user image_size wins
    assert dm.resolved_data_config["mean"] == (0.5, 0.5, 0.5)  # the rest from the module
    assert dm.val_dataset[0][0].shape == (3, 24, 24)


def test_eval_transform_is_deterministic_and_train_transform_is_not():
    dm = SyntheticDataModule(train_size=8, val_size=8, image_size=32)
    dm.setup("fit")
    torch.manual_seed(0)
    assert torch.equal(dm.val_dataset[3][0], dm.val_dataset[3][0])
    assert not torch.equal(dm.train_dataset[3][0], dm.train_dataset[3][0])


def test_augment_false_trains_on_the_eval_transform():
    dm = SyntheticDataModule(train_size=8, val_size=8, image_size=32, augment=False)
    dm.setup("fit")
    assert dm.train_dataset.transform is dm.val_dataset.transform
    assert torch.equal(dm.train_dataset[0][0], dm.train_dataset[0][0])


def test_augmentation_options_reach_timm():
    def ops(**kw):
        dm = SyntheticDataModule(train_size=4, val_size=0, test_size=0, image_size=32, **kw)
        dm.setup("fit")
        return [type(t).__name__ for t in dm.train_dataset.transform.rgb.transforms]

    assert "ColorJitter" not in ops()  # timm's default 0.4 jitter is not slipped in
    assert "ColorJitter" in ops(color_jitter=0.4)
    assert "RandomVerticalFlip" in ops(vflip=0.5)
    assert "RandomErasing" in ops(re_prob=0.25)
    assert "RandAugment" in ops(auto_augment="rand-m9-mstd0.5")


def test_grayscale_to_rgb_false_gives_one_channel_for_gray_images():
    from PIL import Image

    dm = SyntheticDataModule(train_size=4, val_size=4, test_size=0, image_size=16, grayscale_to_rgb=False)
    dm.setup("fit")
    transform = dm.val_dataset.transform
    assert transform(Image.new("L", (16, 16), 10)).shape == (1, 16, 16)
    assert transform(Image.new("RGB", (16, 16))).shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("option", "value"),
    [("batch_size", 0), ("val_split", 1.0), ("val_split", -1), ("train_subset", 0), ("train_subset", 1.5),
     ("hflip", 2.0), ("scale", (0.5, 0.1)), ("crop_pct", 0.0), ("std", (0.1, 0.0, 0.1)), ("auto_augment", "bogus-m9")],
)
def test_bad_options_are_user_errors_naming_the_option(option, value):
    with pytest.raises(UserError, match=option):
        SyntheticDataModule(**{option: value})
