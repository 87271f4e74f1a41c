"""Callbacks that the multi-process tests add to a real ``lit-ft fit`` (``--trainer.callbacks+``).

Not a test module: launched processes (torchrun workers, SLURM-like tasks) import it from the
repository root on PYTHONPATH, as ``tests.rank_probe.RankRecord``.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch

from lit_ft.callbacks import BudgetCounter

from lit_ft.callbacks import GracefulInterrupt


class RankRecord(L.Callback):
    """At the end of fit, save what this rank ended with to ``<out>/rank<global rank>.pt``.

    The record holds the model's state_dict at the start of training and at the end, the step, the images counted, and which cluster
    environment and place in the world Lightning gave this process (so a test can check that
    torchrun and SLURM are recognised by Lightning's own environments, not guessed).
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.before: dict[str, torch.Tensor] = {}
        self.bn: dict[str, tuple[str, bool]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = _snapshot(trainer)  # as initialised (or as restored, when resuming)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # BatchNorm layers as the strategy left them (SyncBatchNorm with sync_batchnorm) and
        # whether each was in training mode for this step.
        self.bn = {n: (type(m).__name__, m.training) for n, m in pl_module.named_modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = getattr(trainer.strategy, "cluster_environment", None)  # none on a single device
        record = {
            "before": self.before,
            "state_dict": _snapshot(trainer),
            "global_step": trainer.global_step,
            "images_seen": next((c.images_seen for c in trainer.callbacks if isinstance(c, BudgetCounter)), None),
            "environment": type(env).__name__ if env is not None else None,
            "world_size": trainer.world_size,
            "node_rank": trainer.node_rank,
            "log_dir": trainer.log_dir,
            "strategy": type(trainer.strategy).__name__,
            "bn": self.bn,
        }
        Path(self.out).mkdir(parents=True, exist_ok=True)
        torch.save(record, Path(self.out) / f"rank{trainer.global_rank}.pt")


class HoldForSignal(L.Callback):
    """On rank ``rank``, after training step ``step``: write ``marker`` and wait until this process
    got SIGTERM (as seen by lit-ft's interrupt callback), so a test can signal at a known batch.

    Runs before lit-ft's own interrupt callback at the same batch end (the CLI appends its
    callbacks after the configured ones), so the run stops after exactly ``step`` steps.
    """

    def __init__(self, step: int, marker: str, rank: int = 1) -> None:
        self.step, self.marker, self.rank = step, marker, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        interrupt = next(c for c in trainer.callbacks if isinstance(c, GracefulInterrupt))
        Path(self.marker).touch()
        deadline = time.monotonic() + 300
        while interrupt.requested is None and not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)


def _snapshot(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    # Through the strategy: under FSDP it gathers the whole weights (on rank 0; every rank calls
    # it), under DDP it is the module's own state_dict.
    return {k: v.detach().cpu().clone() for k, v in trainer.strategy.lightning_module_state_dict().items()}
