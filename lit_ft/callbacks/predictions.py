"""Write ``predict`` results to a CSV: id (path or index), class name, class index, probability."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """Collects ``predict_step`` outputs and writes them as CSV at the end of ``predict``.

    Args:
        output: CSV path; default ``<log_dir>/predictions.csv``. Under DDP each rank writes
            ``predictions.rank<N>.csv``.
    """

    def __init__(self, output: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self._rows: list[tuple] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if not isinstance(prediction, dict) or "id" not in prediction:
            return
        self._rows.extend(zip(prediction["id"], prediction["class"], prediction["index"], prediction["prob"]))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.output or os.path.join(trainer.log_dir or ".", "predictions.csv"))
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "class", "index", "prob"])
            writer.writerows((i, c, k, f"{p:.6f}") for i, c, k, p in self._rows)
        os.replace(tmp, path)  # never leave a half-written file under the final name
        self.last_path = path
        rank_zero_info(f"lit-ft: wrote {len(self._rows)} predictions to {path}")

    def state_dict(self) -> dict[str, Any]:
        return {}
