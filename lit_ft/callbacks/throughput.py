"""Training throughput in images per second, in TensorBoard and in the progress bar."""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

TAG = "throughput/images_per_sec"


class ThroughputLogger(Callback):
    """Log ``throughput/images_per_sec``: training images per second over the last
    ``log_every_n_steps`` batches (the logging interval), summed over ranks.

    The clock runs from the end of one training batch to the end of the next, so data
    loading, forward, backward and the optimizer step all count; validation and the gaps
    between epochs do not. The cost per batch is one ``perf_counter()`` and a ``log`` call.

    Args:
        enabled: log throughput at all.
        prog_bar: also show it in the progress bar.
        window: batches to average over; default the trainer's ``log_every_n_steps``.
    """

    def __init__(self, enabled: bool = True, prog_bar: bool = True, window: Optional[int] = None) -> None:
        if window is not None and window < 1:
            raise ValueError("window must be >= 1")
        self.enabled = enabled
        self.prog_bar = prog_bar
        self.window = window
        self._last: Optional[float] = None
        self._samples: deque[tuple[float, int]] = deque()

    def _restart(self) -> None:
        self._last = None
        self._samples.clear()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart()  # validation time is not training throughput

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.enabled and self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or self._last is None:
            return
        now = time.perf_counter()
        self._samples.append((now - self._last, batch_size(batch)))
        self._last = now
        window = self.window or max(1, trainer.log_every_n_steps)
        while len(self._samples) > window:
            self._samples.popleft()
        seconds = sum(dt for dt, _ in self._samples)
        if seconds > 0:
            rate = sum(n for _, n in self._samples) / seconds * trainer.world_size
            pl_module.log(TAG, rate, on_step=True, on_epoch=False, prog_bar=self.prog_bar, batch_size=1)


def batch_size(batch: Any) -> int:
    """Images in a batch: ``len`` of its first tensor (``(images, targets)`` batches)."""
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(first, torch.Tensor):
        return int(first.shape[0]) if first.ndim else 1
    if isinstance(first, dict) and first:
        return batch_size(next(iter(first.values())))
    return len(first) if hasattr(first, "__len__") else 1
