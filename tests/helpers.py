"""Small builders shared by the training tests: tiny models, synthetic data, quiet trainers."""

from __future__ import annotations

import lightning as L
import torch

from lit_ft import ImageClassifier
from lit_ft.data import SyntheticDataModule


def tiny_data(**kw) -> SyntheticDataModule:
    args = dict(num_classes=4, train_size=64, val_size=32, test_size=32, image_size=32, batch_size=16, augment=False, seed=0)
    args.update(kw)
    return SyntheticDataModule(**args)


def tiny_model(backbone: str = "test_resnet", **kw) -> ImageClassifier:
    args = dict(num_classes=4, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4))
    args.update(kw)
    return ImageClassifier(backbone, **args)


def trainer(root, **kw) -> L.Trainer:
    args = dict(
        default_root_dir=str(root),
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return L.Trainer(**args)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class StopAfter(L.Callback):
    """Interrupt a run after ``epochs`` epochs, keeping its config (for resume tests)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True
