"""What the model gets wrong on validation: confusion matrix and most confident mistakes."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

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

    Per validation batch it adds a ``bincount`` to a ``(C, C)`` tensor and keeps the
    ``misclassified`` most confident wrong predictions seen so far (a top-k over at most
    ``2 * misclassified`` candidates), all on the model's device and without a host sync. At
    the end of the epoch the matrix is summed over ranks and rank zero renders:

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
        self._cm: Optional[torch.Tensor] = None  # (C, C) counts, cm[true, pred]
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
        self._cm = None
        self._worst = None

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
        if self._cm is None:
            self._cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=logits.device)
        self._cm += torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
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
        if self._cm is None:  # no batches on this rank: still take part in the reduce
            n = getattr(pl_module, "num_classes", None)
            if not n:
                return
            self._cm = torch.zeros(n, n, dtype=torch.long, device=pl_module.device)
        cm = trainer.strategy.reduce(self._cm, reduce_op="sum")  # every rank takes part
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
        self._cm = None
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
