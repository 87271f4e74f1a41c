"""The measuring probe that runs inside every peer's process: test accuracy at fixed points of
training, on a clock that leaves the probe's own evaluation out.

Owns: the run spec handed from the runner to a child (one JSON value in the environment variable
``LIT_FT_PEERS_SPEC``), the clock, the test-set evaluation and the result file. Peers call it
from their own hook: :class:`LightningProbe` for lit-ft and the Lightning peer, a fastai callback
in ``fastai_ft.py``, plain calls in the timm loop. Must not change training: it evaluates under
``torch.no_grad`` in eval mode and restores every module's own train/eval flag afterwards (frozen
BatchNorm layers of lit-ft and Lightning are in eval mode during training and must stay so).

The clock starts when the runner launches the process (imports, data loading, model creation and
each tool's own validation all count, as a user would wait for them) and subtracts the time spent
in the probe. Test points are taken every ``eval_every`` training images (the same marks for every
peer) and once more when training ends.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch import nn

from benchmarks.peers import data as D

SPEC_ENV = "LIT_FT_PEERS_SPEC"


def read_spec() -> dict[str, Any]:
    """The run spec the runner put in the environment (see :mod:`benchmarks.peers.runner`)."""
    raw = os.environ.get(SPEC_ENV)
    if not raw:
        raise RuntimeError(f"{SPEC_ENV} is not set: this module runs as a child of `python -m benchmarks.peers`")
    return json.loads(raw)


class Probe:
    """Clock + test-set evaluation at fixed marks (training images seen).

    Args:
        spec: the run spec (``launch``: the runner's ``time.time()`` at launch; ``eval_every``:
            training images between test points; ``test_images``; ``out``: result JSON path).
        rank, world: this process's rank and the number of processes (lit-ft's DDP recipe);
            each evaluates its share of the test set and ``reduce`` sums the counts.
        reduce: sums a tensor over processes (``trainer.strategy.reduce``); ``None`` for one process.
    """

    def __init__(self, spec: dict[str, Any], rank: int = 0, world: int = 1,
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.spec, self.rank, self.world, self.reduce = spec, rank, world, reduce
        self.launch = float(spec["launch"])
        self.excluded = 0.0  # seconds spent in the probe, left off the clock
        self.every = int(spec["eval_every"])
        self.next_mark = self.every
        self.images = 0
        self.points: list[list[float]] = []  # [seconds, images seen, test accuracy]
        self.train_start: Optional[float] = None
        dspec = D.DataSpec.from_json(spec["data"])
        images, labels = D.load_split("test")
        idx = D.test_indices(labels, int(spec["test_images"]))[rank::world]
        self.test = torch.utils.data.DataLoader(
            D.FashionMNIST(images, labels, idx, D.eval_transform(dspec)), batch_size=256, shuffle=False
        )

    def elapsed(self) -> float:
        return time.time() - self.launch - self.excluded

    def started(self) -> None:
        """The tool's training loop begins (the first optimizer step follows)."""
        if self.train_start is None:
            self.train_start = self.elapsed()

    def after_batch(self, batch_images: int, model: nn.Module) -> None:
        """Count a training batch (all processes' images); evaluate when a mark is passed."""
        self.images += batch_images
        if self.images >= self.next_mark:
            self.evaluate(model)
            while self.next_mark <= self.images:
                self.next_mark += self.every

    def evaluate(self, model: nn.Module) -> float:
        at = self.elapsed()
        t0 = time.time()
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        correct = torch.zeros(2, dtype=torch.float64)  # (correct, seen)
        try:
            with torch.no_grad():
                for x, y in self.test:
                    correct += torch.tensor([(model(x).argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
        finally:
            for m, was_training in flags:
                m.training = was_training
        if self.reduce is not None:
            correct = self.reduce(correct)
        acc = float(correct[0] / correct[1])
        self.points.append([round(at, 3), self.images, acc])
        self.excluded += time.time() - t0
        if self.rank == 0:
            print(f"[peers] {self.spec['peer']} {self.spec['setting']} seed {self.spec['seed']}: "
                  f"{self.images} images, {at / 60:.2f} min, test acc {acc:.4f}", flush=True)
        return acc

    def finish(self, model: nn.Module, extra: Optional[dict[str, Any]] = None) -> None:
        """Evaluate the final weights and write the result file (rank 0)."""
        if not self.points or self.points[-1][1] != self.images:
            self.evaluate(model)
        if self.rank != 0:
            return
        result = {
            "points": self.points,
            "setup_seconds": round(self.train_start, 3) if self.train_start is not None else None,
            "threads": torch.get_num_threads(),
            "processes": self.world,
            "probe_seconds": round(self.excluded, 3),
            **(extra or {}),
        }
        out = Path(self.spec["out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result) + "\n")


class LightningProbe(L.Callback):
    """The probe as a Lightning callback, for ``lit-ft fit --trainer.callbacks+ ...`` and the
    Lightning peer. Takes no arguments: the spec comes from the environment, so the same class
    path works from the command line and in every DDP process."""

    def __init__(self) -> None:
        self.probe: Optional[Probe] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.probe is None:
            self.probe = Probe(read_spec(), trainer.global_rank, trainer.world_size,
                               reduce=(lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probe.started()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.probe.after_batch(len(batch[1]) * trainer.world_size, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probe.finish(pl_module, {"epochs_run": trainer.current_epoch})
