"""The compute a run has spent, counted across interruptions and resumes.

Owns ``budget/images_seen`` (training images through the loop, all processes together) and
``budget/train_seconds`` (wall-clock seconds inside ``fit``, earlier runs of a resumed run
included), logged at every training epoch end; ``benchmarks/experiments.py`` reads them back
to compare strategies at equal cost. Both live in this callback's ``state_dict``, so every
checkpoint carries them and ``--ckpt_path last`` continues counting. It reads the batch and
the trainer's public counters only, never the module's state.

Why not Lightning's ``ThroughputMonitor`` alone (used for images per second, see
:mod:`lit_ft.callbacks.throughput`): its totals are per process, restart at every fit and are
not checkpointed.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_ft.callbacks.throughput import batch_size


class BudgetCounter(Callback):
    """Count training images and seconds; log them as ``budget/*`` at each training epoch end.

    Images are counted when a training batch starts, so a checkpoint written at the end of
    that batch (by an interrupt or a step-interval ``ModelCheckpoint``, in their
    ``on_train_batch_end``, which may run before ours) already includes it.
    Under DDP each process gets an equal share of every step (Lightning's distributed sampler
    pads the last one), so a batch counts ``batch size x world size`` images. Seconds run from
    ``on_fit_start`` (sanity check and validation included: the cost of the run as a user waits
    for it) and add up over resumes.

    Args:
        enabled: count and log at all.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.images_seen = 0
        self._seconds_before = 0.0  # spent by earlier runs of a resumed run, and finished fits
        self._started: Optional[float] = None  # perf_counter() at this fit's start, while it runs

    @property
    def train_seconds(self) -> float:
        """Seconds inside ``fit`` so far, earlier runs of a resumed run included."""
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self._seconds_before + running

    # ------------------------------------------------------------------ counting
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit counts from zero; a resumed one gets its counts back next
            self.images_seen, self._seconds_before, self._started = 0, 0.0, None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.enabled:
            self.images_seen += batch_size(batch) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        # Equal on every rank except for timing noise: the max is what the run cost.
        for tag, value in (("budget/images_seen", float(self.images_seen)), ("budget/train_seconds", self.train_seconds)):
            pl_module.log(tag, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._started is not None:  # stop the clock, keep the total
            self._seconds_before, self._started = self.train_seconds, None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"images_seen": self.images_seen, "train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.images_seen = int(state_dict.get("images_seen", 0))
        self._seconds_before = float(state_dict.get("train_seconds", 0.0))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before this callback existed kept the counts in the module's
        # "lit_ft" entry; load_state_dict (called after this) overrides them when ours is there.
        legacy = checkpoint.get("lit_ft") or {}
        if "images_seen" in legacy:
            self.load_state_dict(legacy)
