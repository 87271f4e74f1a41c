"""What the model gets wrong on validation: confusion matrix and most confident mistakes.

Owns the ``val/confusion_matrix`` and ``val/misclassified`` TensorBoard images. The counting
and its sum over processes are torchmetrics' ``MulticlassConfusionMatrix``; the figure is ours
(:func:`lit_ft.callbacks.figures.confusion_matrix_figure`) because torchmetrics' ``plot``
(1.9) draws every tick label and cell count at fixed font sizes on a fixed 6.4x4.8 in figure:
fine for 10 classes, an unreadable blur of overlapping names and numbers at 30 (ours grows
with the class count, shades by the fraction of the true class and drops unreadable labels).
Reads only the validation batch and ``validation_step``'s output, never the module's state.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics.classification import MulticlassConfusionMatrix

from lit_ft.callbacks.figures import (
    class_name,
    confusion_matrix_figure,
    figure_to_array,
    has_tensorboard,
    image_grid_figure,
    input_stats,
    log_step,
    summary_writer,
    unnormalize,
)


class ConfusionLogger(Callback):
    """Log the validation confusion matrix and the most confident mistakes as TensorBoard images.

    Per validation batch it updates a torchmetrics ``MulticlassConfusionMatrix`` (on the
    model's device, no host sync) and keeps the ``misclassified`` most confident wrong
    predictions seen so far (a top-k over at most ``2 * misclassified`` candidates). At the end
    of the epoch the matrix is computed, which sums it over processes, and rank zero renders:

    * ``val/confusion_matrix``: true class (rows) x predicted class (columns), class names on
      the axes, colour = fraction of the true class, cells = counts;
    * ``val/misclassified``: the mistakes (rank zero's), captioned ``true`` / ``pred (prob)``.

    Predictions come from ``validation_step``'s output (``{"logits": (B, C)}`` or a ``(B, C)``
    tensor); for a module whose ``validation_step`` returns nothing the batch is run through
    the module once more.

    Args:
        every_n_epochs: log every n-th validation epoch; 0 turns the callback off.
        confusion_matrix: log the confusion matrix.
        misclassified: images in the misclassified grid; 0 for no grid.
        normalize: colour cells by the fraction of their true class (else by count).
    """

    def __init__(
        self, every_n_epochs: int = 1, confusion_matrix: bool = True, misclassified: int = 16, normalize: bool = True
    ) -> None:
        if every_n_epochs < 0 or misclassified < 0:
            raise ValueError("every_n_epochs and misclassified must be >= 0")
        self.every_n_epochs = every_n_epochs
        self.confusion_matrix = confusion_matrix
        self.misclassified = misclassified
        self.normalize = normalize
        self._active = False
        self._metric: Optional[MulticlassConfusionMatrix] = None
        self.matrix: Optional[torch.Tensor] = None  # (C, C) counts of the last drawn epoch, [true, pred]
        self._worst: Optional[tuple[torch.Tensor, ...]] = None  # (images, true, pred, prob)

    # ------------------------------------------------------------------ accumulate
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Decided identically on every rank: the epoch-end reduce is a collective.
        self._active = (
            self.every_n_epochs > 0
            and (self.confusion_matrix or self.misclassified > 0)
            and not trainer.sanity_checking
            and has_tensorboard(trainer)
            and trainer.current_epoch % self.every_n_epochs == 0
        )
        self._worst = None
        if self._active:
            # Made here, on every rank alike: a rank without validation batches must still take
            # part in the epoch-end sum. The class count comes from the logits if the module has none.
            n = getattr(pl_module, "num_classes", None)
            self._metric = self._new_metric(int(n), pl_module.device) if n else None

    @staticmethod
    def _new_metric(num_classes: int, device: torch.device) -> MulticlassConfusionMatrix:
        # validate_args=False: the checks would sync with the host at every batch; inputs are argmax indices.
        return MulticlassConfusionMatrix(num_classes, validate_args=False).to(device)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or dataloader_idx != 0:
            return
        x, y = batch[0], batch[1]
        logits = _logits(outputs)
        if logits is None:
            with torch.no_grad():
                logits = pl_module(x)
        logits = logits.detach()
        if y.ndim == 2:  # soft targets
            y = y.argmax(-1)
        num_classes = logits.shape[-1]
        probs = logits.float().softmax(-1)
        prob, pred = probs.max(-1)  # (B,), (B,)
        if self._metric is None:
            self._metric = self._new_metric(num_classes, logits.device)
        self._metric.update(pred, y)
        if self.misclassified > 0 and x.ndim == 4:  # not for cached features (B, D): no images to show
            self._keep_worst(x.detach(), y, pred, torch.where(pred != y, prob, torch.full_like(prob, -1.0)))

    def _keep_worst(self, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, score: torch.Tensor) -> None:
        # score = confidence of a wrong prediction, -1 for a right one (filtered at epoch end).
        k = min(self.misclassified, len(score))
        idx = score.topk(k).indices
        cand = (x[idx], y[idx], pred[idx], score[idx])
        if self._worst is not None:
            cand = tuple(torch.cat([a, b]) for a, b in zip(self._worst, cand))
        keep = cand[3].topk(min(self.misclassified, len(cand[3]))).indices
        self._worst = tuple(t[keep] for t in cand)

    # ------------------------------------------------------------------ render
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        if self._metric is None:  # no class count and no batches: nothing to sum or draw
            return
        cm = self._metric.compute()  # summed over processes by torchmetrics; every rank takes part
        self._metric = None
        self.matrix = cm.detach().cpu()
        writer = summary_writer(trainer)
        if writer is None:
            return
        names = _class_names(trainer, pl_module, cm.shape[0])
        step = log_step(trainer)
        if self.confusion_matrix:
            counts = cm.cpu().numpy()
            acc = np.trace(counts) / max(1, counts.sum())
            title = f"validation, epoch {trainer.current_epoch}: accuracy {acc:.1%} of {int(counts.sum())}"
            fig = confusion_matrix_figure(counts, names, title, self.normalize)
            writer.add_image("val/confusion_matrix", figure_to_array(fig), step, dataformats="HWC")
        if self._worst is not None:
            images, true, pred, score = (t.cpu() for t in self._worst)
            wrong = score >= 0
            if wrong.any():
                mean, std = input_stats(getattr(trainer, "datamodule", None), pl_module)
                pics = unnormalize(images[wrong], mean, std)
                titles = [
                    f"true: {class_name(names, int(t))}\npred: {class_name(names, int(p))} {float(s):.2f}"
                    for t, p, s in zip(true[wrong], pred[wrong], score[wrong])
                ]
                fig = image_grid_figure(pics, titles, ["tab:red"] * len(titles), ncols=min(8, len(titles)),
                                        suptitle=f"most confident mistakes, epoch {trainer.current_epoch}")
                writer.add_image("val/misclassified", figure_to_array(fig), step, dataformats="HWC")
        self._worst = None


def _logits(outputs: Any) -> Optional[torch.Tensor]:
    if isinstance(outputs, dict):
        outputs = outputs.get("logits")
    return outputs if isinstance(outputs, torch.Tensor) and outputs.ndim == 2 else None


def _class_names(trainer: L.Trainer, pl_module: L.LightningModule, n: int) -> list[str]:
    for source in (pl_module, getattr(trainer, "datamodule", None)):
        names = getattr(source, "class_names", None)
        if names is not None and len(names) == n:
            return [str(c) for c in names]
    return [str(i) for i in range(n)]
