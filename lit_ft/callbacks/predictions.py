"""Write ``predict`` results to a CSV: id (path or index), class name, class index, probability;
with ``top_k`` > 1 also the next classes and their probabilities (``class_2``, ``prob_2``, ...).
Probabilities are the model's calibrated ones (its ``temperature``, see ``lit-ft calibrate``).

The CSV is UTF-8. A file name that is not valid UTF-8 (Linux allows any bytes; Python keeps
the undecodable ones as lone surrogates) is written with those bytes as ``\\xNN`` escapes,
e.g. ``b"bad\\xff.png"`` as ``bad\\xff.png``, and counted in a warning: writing the surrogates
failed after all inference was done, and writing the raw bytes would make the whole file
unreadable as UTF-8 for pandas and spreadsheets.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.errors import UserError

log = logging.getLogger(__name__)


def csv_text(value: Any) -> Any:
    """``value`` made encodable as UTF-8: undecodable file-name bytes become ``\\xNN`` escapes."""
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        raw = os.fsencode(value)  # back to the name's bytes (surrogateescape)
    except UnicodeError:  # a lone surrogate that is no escaped byte
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


class PredictionWriter(BasePredictionWriter):
    """Collects ``predict_step`` outputs and writes them as CSV at the end of ``predict``.

    Args:
        output: CSV path; default ``<log_dir>/predictions.csv``. Under DDP each rank writes
            ``predictions.rank<N>.csv``.
        top_k: classes per image (at most the number of classes). An option of the writer, not
            of the model: it only shapes the CSV, from the probabilities ``predict_step`` returns.
    """

    def __init__(self, output: Optional[str] = None, top_k: int = 1) -> None:
        super().__init__(write_interval="batch")
        if top_k < 1:
            raise UserError(f"prediction_writer.top_k={top_k}", "use top_k >= 1")
        self.output = output
        self.top_k = top_k
        self._rows: list[tuple] = []
        self._more: list[list] = []  # per row: class_2, prob_2, ..., class_k, prob_k

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self._more = [], []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if not isinstance(prediction, dict) or "id" not in prediction:
            return
        self._rows.extend(zip(prediction["id"], prediction["class"], prediction["index"], prediction["prob"]))
        self._more.extend(_next_classes(prediction.get("probs"), self.top_k, getattr(pl_module, "class_names", None),
                                        len(prediction["id"])))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.output or os.path.join(trainer.log_dir or ".", "predictions.csv"))
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        ids = [csv_text(i) for i, *_ in self._rows]
        escaped = [(i, e) for (i, *_), e in zip(self._rows, ids) if e is not i]
        # utf-8 explicitly: the locale's encoding (ASCII under LANG=C) would fail on "café.png".
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            ranks = max((len(m) // 2 for m in self._more), default=0) + 1
            writer.writerow(["id", "class", "index", "prob", *(f"{c}_{r}" for r in range(2, ranks + 1) for c in ("class", "prob"))])
            writer.writerows((i, c, k, f"{p:.6f}", *more) for i, (_, c, k, p), more in zip(ids, self._rows, self._more))
        os.replace(tmp, path)  # never leave a half-written file under the final name
        if escaped:
            log.warning(
                "%d file name(s) are not valid UTF-8; %s writes their undecodable bytes as \\xNN escapes, e.g. %s",
                len(escaped), path, escaped[0][1],
            )
        self.last_path = path
        rank_zero_info(f"lit-ft: wrote {len(self._rows)} predictions to {path}")

    def state_dict(self) -> dict[str, Any]:
        return {}


def _next_classes(probs: Any, top_k: int, names: Optional[list[str]], n: int) -> list[list]:
    """Per row ``[class_2, prob_2, ..., class_k, prob_k]`` from ``(B, C)`` probabilities."""
    if top_k == 1 or probs is None:
        return [[] for _ in range(n)]
    p, idx = probs.float().topk(min(top_k, probs.shape[-1]), dim=-1)
    label = (lambda i: names[i]) if names else str
    return [[v for j, q in zip(i[1:], r[1:]) for v in (label(j), f"{q:.6f}")] for i, r in zip(idx.tolist(), p.tolist())]
