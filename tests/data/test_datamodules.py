"""SyntheticDataModule and the shared dataloader behaviour, including a short Lightning run."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lit_ft.data import BaseImageDataModule, SyntheticDataModule
from lit_ft.errors import UserError


def first_batch(dm: SyntheticDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    dm.setup("fit")
    torch.manual_seed(0)
    random.seed(0)
    return next(iter(dm.train_dataloader()))


def test_synthetic_batches_and_classes():
    dm = SyntheticDataModule(num_classes=5, train_size=50, val_size=20, test_size=10, image_size=32, batch_size=8, eval_batch_size=20)
    assert dm.num_classes == 5 and dm.class_names == [f"class_{i}" for i in range(5)]
    x, y = first_batch(dm)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < 5
    assert next(iter(dm.val_dataloader()))[0].shape == (20, 3, 32, 32)  # eval_batch_size
    dm.setup("test")
    assert [len(b[1]) for b in dm.test_dataloader()] == [10]
    assert np.bincount(dm.train_dataset.targets).tolist() == [10] * 5  # "easy" is balanced


def test_synthetic_is_deterministic_in_seed():
    a = first_batch(SyntheticDataModule(image_size=32, seed=1))
    b = first_batch(SyntheticDataModule(image_size=32, seed=1))
    c = first_batch(SyntheticDataModule(image_size=32, seed=2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_shuffle_order_is_seeded_and_loader_options():
    dm = SyntheticDataModule(train_size=32, val_size=8, image_size=16, batch_size=32, augment=False)
    dm.setup("fit")
    first = next(iter(dm.train_dataloader()))[1]
    assert torch.equal(first, next(iter(dm.train_dataloader()))[1])
    assert not torch.equal(first, torch.as_tensor(dm.train_dataset.targets))  # shuffled
    loader = dm.train_dataloader()
    assert loader.persistent_workers is False and loader.drop_last is False and loader.pin_memory == torch.cuda.is_available()
    workers = SyntheticDataModule(num_workers=2, persistent_workers=True, pin_memory=False)
    workers.setup("fit")
    assert workers.train_dataloader().persistent_workers is True


def test_class_names_rename_and_zero_sizes():
    dm = SyntheticDataModule(num_classes=2, class_names=["cat", "dog"], val_size=0, test_size=0)
    assert dm.class_names == ["cat", "dog"]
    dm.setup("fit")
    assert dm.val_dataloader() == []
    with pytest.raises(UserError, match="no test data") as err:
        dm.setup("test")
    assert "test_size" in err.value.hint


def test_random_difficulty_labels_do_not_follow_images():
    easy = SyntheticDataModule(num_classes=4, train_size=400, difficulty="easy")
    rand = SyntheticDataModule(num_classes=4, train_size=400, difficulty="random")

    def colour_label_agreement(dm):
        src = dm._source("train")
        mean_colour = src.images.float().mean(dim=(1, 2))  # (N, 3)
        centroids = torch.stack([mean_colour[torch.as_tensor(src.targets) == c].mean(0) for c in range(4)])
        nearest = torch.cdist(mean_colour, centroids).argmin(1).numpy()
        return (nearest == src.targets).mean()

    assert colour_label_agreement(easy) > 0.95
    assert colour_label_agreement(rand) < 0.6


def test_base_datamodule_is_predict_only(tmp_path):
    from PIL import Image

    Image.new("RGB", (10, 10)).save(tmp_path / "x.png")
    dm = BaseImageDataModule(predict_dir=str(tmp_path), class_names=["a", "b", "c"], image_size=16)
    assert dm.num_classes == 3
    dm.setup("predict")
    images, ids = next(iter(dm.predict_dataloader()))
    assert ids == ["x.png"] and images.shape == (1, 3, 16, 16)


class TinyCNN(pl.LightningModule):
    data_config = {"input_size": (3, 16, 16), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                   "std": (0.25, 0.25, 0.25), "crop_pct": 1.0, "crop_mode": "center"}

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
        self.val_acc: list[float] = []
        self.shapes: set = set()

    def training_step(self, batch, _):
        x, y = batch
        self.shapes.add(tuple(x.shape[1:]))
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.val_acc.append((self.net(x).argmax(1) == y).float().mean().item())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.03)


def fit(dm, epochs: int = 3) -> TinyCNN:
    pl.seed_everything(0, verbose=False)
    model = TinyCNN(dm.num_classes)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return model


def test_easy_synthetic_is_learnable_and_model_config_is_used():
    dm = SyntheticDataModule(num_classes=4, train_size=256, val_size=64, batch_size=32, eval_batch_size=64)
    model = fit(dm)
    assert model.shapes == {(3, 16, 16)}  # input size came from the module's data_config
    assert dm.resolved_data_config["mean"] == (0.5, 0.5, 0.5)
    assert model.val_acc[-1] > 0.6  # chance is 0.25


def test_fit_without_validation_data():
    dm = SyntheticDataModule(num_classes=3, train_size=30, val_size=0, batch_size=10)
    model = fit(dm, epochs=1)
    assert model.val_acc == [] and model.shapes == {(3, 16, 16)}


def test_worker_processes_give_reproducible_augmented_batches():
    dm = SyntheticDataModule(train_size=16, val_size=0, image_size=16, batch_size=8, num_workers=2, color_jitter=0.4)
    dm.setup("fit")
    a = next(iter(dm.train_dataloader()))
    b = next(iter(dm.train_dataloader()))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
