"""Reliability diagrams of validation and test in TensorBoard (``<stage>/reliability``).

Owns only the accumulation over batches and ranks and the logging; the bins, the ECE and the
drawing are :mod:`lit_ft.calibration`'s. The scalar ``<stage>/ece`` is logged by the model's
metrics (torchmetrics); the diagram's title repeats it from the same bins.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_ft.calibration import DEFAULT_BINS, reliability_bins, reliability_figure
from lit_ft.callbacks.figures import eval_logits_and_labels, figure_to_array, has_tensorboard, log_step, summary_writer


class ReliabilityLogger(Callback):
    """Log a reliability diagram (accuracy against confidence, per confidence bin) of the
    calibrated probabilities (the model's ``temperature`` applied) at validation and test.

    Per batch it adds ``(3, n_bins + 1)`` sums (count, confidence, correct) on the model's device;
    at the epoch end they are summed over ranks and rank zero draws the figure. Constant memory.

    Args:
        every_n_epochs: validation epochs between diagrams; 0 turns validation diagrams off.
        n_bins: equal-width confidence bins (15 as in Guo et al. 2017 and torchmetrics).
        on_test: also draw one at ``test``.
    """

    def __init__(self, every_n_epochs: int = 1, n_bins: int = DEFAULT_BINS, on_test: bool = True) -> None:
        if every_n_epochs < 0 or n_bins < 1:
            raise ValueError("every_n_epochs must be >= 0 and n_bins >= 1")
        self.every_n_epochs = every_n_epochs
        self.n_bins = n_bins
        self.on_test = on_test
        self._bins: Optional[torch.Tensor] = None
        self._active = False

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The same on every rank: the epoch-end reduce is a collective.
        self._active = (self.every_n_epochs > 0 and not trainer.sanity_checking and has_tensorboard(trainer)
                        and trainer.current_epoch % self.every_n_epochs == 0)
        self._bins = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = self.on_test and has_tensorboard(trainer)
        self._bins = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(outputs, batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(outputs, batch, dataloader_idx)

    def _update(self, outputs: Any, batch: Any, dataloader_idx: int) -> None:
        got = eval_logits_and_labels(outputs, batch, dataloader_idx) if self._active else None
        if got is None:
            return
        logits, y = got
        bins = reliability_bins(logits.float().softmax(-1), y, self.n_bins)
        self._bins = bins if self._bins is None else self._bins + bins

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "val", f"validation, epoch {trainer.current_epoch}")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test", "test")

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, title: str) -> None:
        if not self._active:
            return
        self._active = False
        bins = self._bins
        if bins is None:  # no batch on this rank: still take part in the reduce
            bins = torch.zeros(3, self.n_bins + 1, dtype=torch.float64, device=pl_module.device)
        bins = trainer.strategy.reduce(bins, reduce_op="sum")
        self._bins = None
        writer = summary_writer(trainer)
        if writer is None or float(bins[0].sum()) == 0:
            return
        t = float(getattr(pl_module, "temperature", 1.0))
        label = f"{title}, T={t:.2f}" if t != 1.0 else title
        writer.add_image(f"{stage}/reliability", figure_to_array(reliability_figure(bins.cpu(), label)), log_step(trainer),
                         dataformats="HWC")
