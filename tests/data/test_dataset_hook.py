"""The datamodule's public surface for other components: ``eval_batch_size`` and the one hook
that swaps a split's dataset (what the feature cache uses instead of the data calling the model)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lit_ft.data import SyntheticDataModule

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_batch_size_is_public_and_follows_batch_size_unless_set():
    dm = SyntheticDataModule(batch_size=8)
    assert dm.eval_batch_size == 8
    dm.batch_size = 16  # e.g. a batch-size tuner
    assert dm.eval_batch_size == 16
    fixed = SyntheticDataModule(batch_size=8, eval_batch_size=20, val_size=40)
    assert fixed.eval_batch_size == 20
    fixed.setup("fit")
    assert fixed.val_dataloader().batch_size == 20


def test_a_dataset_hook_swaps_the_train_and_val_datasets_and_none_keeps_them():
    dm = SyntheticDataModule(train_size=24, val_size=10, image_size=16, batch_size=8)
    dm.setup("fit")
    seen = []
    features = TensorDataset(torch.randn(24, 5), torch.zeros(24, dtype=torch.long))

    def hook(split, dataset):
        seen.append((split, dataset))
        return features if split == "train" else None

    dm.set_dataset_hook(hook)
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert seen == [("train", dm.train_dataset), ("val", dm.val_dataset)]
    assert train.dataset is features and [x.shape for x, _ in train] == [(8, 5)] * 3
    assert val.dataset is dm.val_dataset  # None kept it
    dm.set_dataset_hook(None)
    assert next(iter(dm.train_dataloader()))[0].shape == (8, 3, 16, 16)
    assert len(seen) == 2  # removed: not asked again
    with pytest.raises(TypeError, match="callable"):
        dm.set_dataset_hook("features")


class Recorder(pl.LightningModule):
    """Records training inputs; its ``cached_dataset`` must never be asked once a hook is set."""

    data_config = {"input_size": (3, 16, 16), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3,
                   "crop_pct": 1.0, "crop_mode": "center"}

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.LazyLinear(2)
        self.shapes: set = set()

    def training_step(self, batch, _):
        x, y = batch
        self.shapes.add(tuple(x.shape[1:]))
        return nn.functional.cross_entropy(self.head(x.flatten(1)), y)

    def cached_dataset(self, split, dataset, datamodule):  # the pre-hook protocol
        raise AssertionError("the datamodule called into the model")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_in_a_fit_the_hook_decides_and_the_model_is_not_called():
    dm = SyntheticDataModule(num_classes=2, train_size=16, val_size=0, batch_size=8)
    splits = []

    def hook(split, dataset):
        splits.append((split, dm.trainer.current_epoch))
        return TensorDataset(torch.randn(len(dataset), 7), torch.as_tensor(dataset.targets))

    dm.set_dataset_hook(hook)
    model = Recorder()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, reload_dataloaders_every_n_epochs=1)
    trainer.fit(model, datamodule=dm)
    assert model.shapes == {(7,)}  # trained on what the hook served
    assert splits == [("train", 0), ("train", 1)]  # asked each time the loader was (re)built
