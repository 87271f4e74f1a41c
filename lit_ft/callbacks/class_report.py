"""Which classes fail: per-class precision, recall, F1 and support, and the most confused pairs.

Owns the per-class view of validation and test (TensorBoard text table ``<stage>/per_class``,
bar figure ``<stage>/per_class``, the most confused pairs printed at the end of fit and of
test). The counts come from torchmetrics' ``MulticlassConfusionMatrix`` (summed over DDP ranks
by its ``compute``); the per-class numbers are plain functions of that matrix
(:func:`per_class_stats`, same zero-division rule as torchmetrics: 0) so they are testable
without a Trainer. The confusion-matrix *image* is :mod:`lit_ft.callbacks.confusion`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics.classification import MulticlassConfusionMatrix

from lit_ft.callbacks.figures import (
    MAX_LABELLED_CLASSES, eval_logits_and_labels, figure_to_array, has_tensorboard, log_step, summary_writer,
)


@dataclass
class ClassStats:
    """Per-class numbers from a confusion matrix ``cm[true, pred]``, each an array of C."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray  # images of the class (row sums)


def per_class_stats(cm: np.ndarray) -> ClassStats:
    """Precision, recall, F1 and support per class from counts ``cm[true, pred]``.

    A class never predicted has precision 0, one never present recall 0 (torchmetrics'
    ``zero_division=0``), so the numbers equal ``MulticlassPrecision(average=None)`` & co.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    predicted, support = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return ClassStats(precision, recall, f1, support.astype(np.int64))


def most_confused(cm: np.ndarray, k: int = 5) -> list[tuple[int, int, int, float]]:
    """The ``k`` largest off-diagonal counts as ``(true, predicted, count, fraction of true)``,
    largest count first (ties: lower true, then predicted index first); zero counts left out."""
    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(1)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = off.ravel()
    order = np.lexsort((np.arange(flat.size), -flat))[:k]  # count descending, then row-major (true, predicted)
    pairs = [divmod(int(i), cm.shape[1]) for i in order if flat[i] > 0]
    return [(t, p, int(cm[t, p]), float(cm[t, p] / rows[t])) for t, p in pairs]


def format_pairs(pairs: Sequence[tuple[int, int, int, float]], names: Sequence[str]) -> str:
    """``"shirt -> t-shirt 14.2% (142), ..."`` for :func:`most_confused`'s pairs."""
    return ", ".join(f"{_name(names, t)} -> {_name(names, p)} {f:.1%} ({n})" for t, p, n, f in pairs) or "none"


def per_class_table(stats: ClassStats, names: Sequence[str], markdown: bool = True) -> str:
    """The per-class numbers as a markdown table (TensorBoard renders it) or aligned text."""
    rows = [
        (_name(names, i), f"{stats.precision[i]:.3f}", f"{stats.recall[i]:.3f}", f"{stats.f1[i]:.3f}", str(stats.support[i]))
        for i in range(len(stats.support))
    ]
    header = ("class", "precision", "recall", "F1", "support")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    width = max(len(header[0]), *(len(r[0]) for r in rows))
    fmt = f"{{:<{width}}}  {{:>9}}  {{:>6}}  {{:>5}}  {{:>7}}"
    return "\n".join([fmt.format(*header), *(fmt.format(*r) for r in rows)])


def per_class_figure(stats: ClassStats, names: Sequence[str], title: str = "") -> Figure:
    """Grouped bars of precision, recall and F1 per class, the support under each class name."""
    n = len(stats.support)
    fig = Figure(figsize=(float(np.clip(1.5 + 0.6 * n, 6.0, 24.0)), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n)
    for offset, (label, values, color) in zip(
        (-0.27, 0.0, 0.27),
        (("precision", stats.precision, "tab:blue"), ("recall", stats.recall, "tab:orange"), ("F1", stats.f1, "tab:green")),
    ):
        ax.bar(x + offset, values, width=0.27, label=label, color=color)
    ax.set_ylim(0, 1.2)  # room for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("score")
    if n <= MAX_LABELLED_CLASSES:
        ax.set_xticks(x, [f"{_name(names, i)}\nn={stats.support[i]}" for i in range(n)], rotation=45 if n > 10 else 0,
                      ha="right" if n > 10 else "center", fontsize=8)
    else:
        ax.set_xticks([])
    ax.legend(loc="upper center", fontsize=8, ncols=3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


class ClassReport(Callback):
    """Per-class precision/recall/F1/support and the most confused class pairs, at validation
    and test.

    Logs to TensorBoard ``<stage>/per_class`` as a text table (with the confused pairs under it)
    and as a bar figure; prints the last validation's most confused pairs at the end of fit, and
    the whole table at the end of test. Predictions come from the step's ``{"logits": (B, C)}``
    output.

    Args:
        every_n_epochs: validation epochs between reports; 0 turns validation reports off.
        top_pairs: how many confused pairs to list.
        on_test: also report at ``test``.
    """

    def __init__(self, every_n_epochs: int = 1, top_pairs: int = 5, on_test: bool = True) -> None:
        if every_n_epochs < 0 or top_pairs < 0:
            raise ValueError("every_n_epochs and top_pairs must be >= 0")
        self.every_n_epochs = every_n_epochs
        self.top_pairs = top_pairs
        self.on_test = on_test
        self.last_pairs: list[tuple[int, int, int, float]] = []  # of the last validation report
        self.last_epoch: Optional[int] = None
        self._cm: Optional[MulticlassConfusionMatrix] = None
        self._active = False

    # ------------------------------------------------------------------ accumulate
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_pairs, self.last_epoch = [], None  # a second fit reports its own epochs

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The same on every rank: compute() at the epoch end is a collective.
        self._active = (self.every_n_epochs > 0 and not trainer.sanity_checking
                        and trainer.current_epoch % self.every_n_epochs == 0)
        self._cm = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = self.on_test
        self._cm = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(outputs, batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(outputs, batch, dataloader_idx)

    def _update(self, outputs: Any, batch: Any, dataloader_idx: int) -> None:
        got = eval_logits_and_labels(outputs, batch, dataloader_idx) if self._active else None
        if got is None:
            return
        logits, y = got
        if self._cm is None:
            self._cm = MulticlassConfusionMatrix(logits.shape[-1]).to(logits.device)
        self._cm.update(logits.argmax(-1), y)

    # ------------------------------------------------------------------ report
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cm = self._compute(pl_module)
        if cm is None:
            return
        self.last_pairs = most_confused(cm, self.top_pairs)
        self.last_epoch = trainer.current_epoch
        self._log(trainer, pl_module, cm, "val", f"validation, epoch {trainer.current_epoch}")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cm = self._compute(pl_module)
        if cm is None:
            return
        names = _names(pl_module, cm.shape[0])
        stats = per_class_stats(cm)
        if trainer.is_global_zero:  # printed like the CLI's closing summary (stdout, not the log)
            print(f"lit-ft: per-class test results\n{per_class_table(stats, names, markdown=False)}\n"
                  f"lit-ft: most confused on test: {format_pairs(most_confused(cm, self.top_pairs), names)}", flush=True)
        self._log(trainer, pl_module, cm, "test", "test")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_epoch is not None and self.top_pairs and trainer.is_global_zero:
            names = _names(pl_module, getattr(pl_module, "num_classes", 0))
            print(f"lit-ft: most confused on validation (epoch {self.last_epoch}): {format_pairs(self.last_pairs, names)}",
                  flush=True)

    def _compute(self, pl_module: L.LightningModule) -> Optional[np.ndarray]:
        if not self._active:
            return None
        if self._cm is None:  # no batch on this rank: still take part in the sum over ranks
            n = getattr(pl_module, "num_classes", None)
            if not n:
                return None
            self._cm = MulticlassConfusionMatrix(n).to(pl_module.device)
        cm = self._cm.compute().cpu().numpy()  # summed over ranks
        self._cm = None
        self._active = False
        return cm

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, cm: np.ndarray, stage: str, title: str) -> None:
        writer = summary_writer(trainer) if has_tensorboard(trainer) else None
        if writer is None:
            return
        names = _names(pl_module, cm.shape[0])
        stats = per_class_stats(cm)
        step = log_step(trainer)
        pairs = format_pairs(most_confused(cm, self.top_pairs), names)
        writer.add_text(f"{stage}/per_class", f"{per_class_table(stats, names)}\n\nmost confused: {pairs}", step)
        fig = per_class_figure(stats, names, f"per class, {title}")
        writer.add_image(f"{stage}/per_class", figure_to_array(fig), step, dataformats="HWC")


def _name(names: Sequence[str], i: int) -> str:
    return str(names[i]) if 0 <= i < len(names) else str(i)


def _names(pl_module: L.LightningModule, n: int) -> list[str]:
    names = getattr(pl_module, "class_names", None)
    return [str(c) for c in names] if names is not None and len(names) == n else [str(i) for i in range(n)]
