"""One grid of training inputs, as the model sees them (augmented), at the start of training."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_ft.callbacks.figures import (
    class_name,
    figure_to_array,
    image_grid_figure,
    input_stats,
    log_step,
    summary_writer,
    unnormalize,
)


class TrainSamplesLogger(Callback):
    """Log the first ``num_images`` images of the first training batch as ``train/inputs``.

    The batch is taken after the device transfer hooks, i.e. with the training augmentation
    applied and un-normalised with the datamodule's mean/std, so what you see is what the
    model trains on: check crops, flips and colour handling before spending compute.
    Captions are the class names (``mix`` for soft targets, e.g. mixup).

    Args:
        num_images: images in the grid; 0 turns the callback off.
    """

    def __init__(self, num_images: int = 16) -> None:
        if num_images < 0:
            raise ValueError("num_images must be >= 0")
        self.num_images = num_images
        self._done = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._done = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._done or self.num_images == 0:
            return
        self._done = True
        writer = summary_writer(trainer)
        if writer is None or not isinstance(batch, (tuple, list)) or not isinstance(batch[0], torch.Tensor):
            return
        if batch[0].ndim != 4:  # cached features (B, D) during a cached linear probe: no images to show
            self._done = False
            return
        x, y = batch[0][: self.num_images], batch[1][: self.num_images]
        names = getattr(pl_module, "class_names", None) or getattr(trainer.datamodule, "class_names", None) or []
        titles = [
            (f"{class_name(names, int(t.argmax()))} (mix {float(t.max()):.2f})" if t.ndim == 1 else class_name(names, int(t)))
            for t in y
        ]
        mean, std = input_stats(getattr(trainer, "datamodule", None), pl_module)
        fig = image_grid_figure(unnormalize(x, mean, std), titles,
                                suptitle=f"training inputs as the model sees them (after augmentation), {x.shape[-2]}x{x.shape[-1]} px")
        writer.add_image("train/inputs", figure_to_array(fig), log_step(trainer), dataformats="HWC")
