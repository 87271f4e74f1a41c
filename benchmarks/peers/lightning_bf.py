"""Peer: a LightningModule around the timm model, fine-tuned with Lightning's BackboneFinetuning.

Written as Lightning's documentation shows it (the class docstring's example, the page
https://lightning.ai/docs/pytorch/stable/api/lightning.pytorch.callbacks.BackboneFinetuning.html):
a module with a ``backbone`` attribute and a ``head`` (Linear 512, ReLU, Linear), an optimizer
over the head only (``Adam(self.head.parameters(), lr=1e-3)``), and
``BackboneFinetuning(unfreeze_backbone_at_epoch, lambda_func=lambda epoch: 1.5,
backbone_initial_ratio_lr=0.1)``, which adds the backbone to the optimizer at that epoch with 10%
of the head's LR and raises it 1.5x per epoch. Departures from the example, each to fit this
budget or this CPU: unfreeze after 1 epoch instead of 10 (runs here last 2 to 4 epochs); the
backbone is timm's ``efficientnet_lite0`` with ImageNet weights and ``num_classes=0`` (pooled
features), the usual way to use a timm model as a backbone; channels_last memory format, which
PyTorch recommends for convolutions on CPUs. Everything else is the callback's defaults
(``train_bn=True``: BatchNorm layers of the frozen backbone keep training).

Run as a child of ``python -m benchmarks.peers``; the run spec comes from the environment.
"""

from __future__ import annotations

import lightning as L
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn

from benchmarks.peers import data as D
from benchmarks.peers.probe import LightningProbe, read_spec


class TransferLearningModel(L.LightningModule):
    def __init__(self, weights_file: str, num_classes: int = D.NUM_CLASSES, lr: float = 1e-3) -> None:
        super().__init__()
        # REQUIRED by BackboneFinetuning: a `backbone` attribute.
        self.backbone = timm.create_model(D.ARCH, pretrained=True, num_classes=0,
                                          pretrained_cfg_overlay=dict(file=weights_file))
        self.head = nn.Sequential(nn.Linear(self.backbone.num_features, 512), nn.ReLU(), nn.Linear(512, num_classes))
        self.lr = lr
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x.contiguous(memory_format=torch.channels_last)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        # Initially only optimize the head - the backbone is added by the callback.
        return torch.optim.Adam(self.head.parameters(), lr=self.lr)


def main() -> None:
    spec = read_spec()
    dspec = D.DataSpec.from_json(spec["data"])
    L.seed_everything(dspec.seed)
    train, val = D.loaders(dspec)
    model = TransferLearningModel(spec["weights"])
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.5, backbone_initial_ratio_lr=0.1)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=spec["epochs"], callbacks=[finetuning, LightningProbe()],
        default_root_dir=spec["run_dir"], enable_progress_bar=False, log_every_n_steps=20,
    )
    trainer.fit(model, train, val)


if __name__ == "__main__":
    main()
