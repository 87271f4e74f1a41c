"""Figures for TensorBoard and notebooks: confusion matrices and labelled image grids.

Pure functions of arrays/tensors. Figures are built on matplotlib's object API with the Agg
canvas (no pyplot, no global backend state), so they render the same in a training process,
a DataLoader worker or a notebook. :func:`figure_to_array` turns one into the ``(H, W, 3)``
uint8 image that ``SummaryWriter.add_image(..., dataformats="HWC")`` takes. Also the small
helpers the figure callbacks share: the TensorBoard writer, the step to log at, and the logits
and labels of an evaluation batch (:func:`eval_logits_and_labels`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_LABELLED_CLASSES = 40  # beyond this, tick labels and cell counts would be unreadable


def summary_writer(trainer) -> Optional["torch.utils.tensorboard.SummaryWriter"]:
    """The trainer's TensorBoard ``SummaryWriter`` on rank zero, else ``None``.

    ``None`` as well under ``fast_dev_run`` (a dummy logger) or without a TensorBoardLogger, so
    callbacks skip rendering figures that would go nowhere.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def log_step(trainer) -> int:
    """The step Lightning gives the scalars logged now, so images line up with them in
    TensorBoard (epoch-end metrics are logged at the last batch's step, ``global_step - 1``)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def has_tensorboard(trainer) -> bool:
    """True on every rank when a TensorBoardLogger is attached (safe to branch collectives on)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers)


def input_stats(datamodule=None, module=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the inputs were normalised with: the datamodule's resolved data config,
    else the model's timm data config, else timm's ImageNet defaults."""
    for source in (getattr(datamodule, "resolved_data_config", None), getattr(module, "data_config", None)):
        if isinstance(source, dict) and source.get("mean") is not None and source.get("std") is not None:
            return tuple(source["mean"]), tuple(source["std"])
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


def unnormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Model inputs ``(B, C, H, W)`` normalised with ``mean``/``std`` -> ``(B, H, W, C)`` floats in [0, 1]."""
    x = images.detach().float().cpu()
    c = x.shape[1]
    m = torch.tensor(list(mean)[:c] if len(mean) >= c else [mean[0]] * c).view(1, c, 1, 1)
    s = torch.tensor(list(std)[:c] if len(std) >= c else [std[0]] * c).view(1, c, 1, 1)
    return (x * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` -> ``(H, W, 3)`` uint8 RGB."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_matrix_figure(
    cm: np.ndarray, class_names: Sequence[str], title: str = "", normalize: bool = True
) -> Figure:
    """A confusion-matrix heat map: true classes on rows (y), predictions on columns (x).

    Args:
        cm: ``(C, C)`` counts, ``cm[true, pred]``.
        class_names: ``C`` names for the axes.
        title: figure title.
        normalize: colour by the row fraction (recall per class) instead of raw counts;
            the cells show counts either way.
    """
    cm = np.asarray(cm)
    n = cm.shape[0]
    rows = cm.sum(1, keepdims=True)
    shade = cm / np.maximum(rows, 1) if normalize else cm
    side = float(np.clip(2.0 + 0.45 * n, 4.0, 16.0))
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shade, cmap="Blues", vmin=0, vmax=1 if normalize else max(1, shade.max()))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= MAX_LABELLED_CLASSES:
        names = [_short(str(c), 16) for c in class_names]
        ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        if n <= 25:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        dark = shade[i, j] > (0.5 if normalize else shade.max() / 2)
                        ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                                color="white" if dark else "black")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def image_grid_figure(
    images: np.ndarray,
    titles: Optional[Sequence[str]] = None,
    colors: Optional[Sequence[str]] = None,
    ncols: Optional[int] = None,
    suptitle: str = "",
) -> Figure:
    """A grid of images with a (possibly multi-line) title under each.

    Args:
        images: ``(N, H, W, C)`` floats in [0, 1] (C = 1 or 3), e.g. from :func:`unnormalize`.
        titles: one caption per image.
        colors: caption colours (e.g. green for right, red for wrong predictions).
        ncols: images per row; default up to 8.
        suptitle: title of the whole grid.
    """
    n = len(images)
    ncols = ncols or min(max(n, 1), 8)
    nrows = max(1, -(-n // ncols))
    lines = max((t.count("\n") + 1 for t in titles), default=0) if titles else 0
    fig = Figure(figsize=(1.9 * ncols, 1.9 * nrows + 0.25 * lines * nrows + (0.4 if suptitle else 0)), dpi=100)
    FigureCanvasAgg(fig)
    for i in range(nrows * ncols):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.axis("off")
        if i >= n:
            continue
        img = images[i]
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img)
        if titles:
            ax.set_title(titles[i], fontsize=8, color=(colors[i] if colors else "black"))
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def class_name(names: Sequence[str], index: int) -> str:
    """``names[index]`` shortened for a caption (the index itself if there is no such name)."""
    return _short(str(names[index]), 14) if 0 <= index < len(names) else str(index)


def eval_logits_and_labels(outputs: Any, batch: Any, dataloader_idx: int = 0) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The logits a validation/test step returned (``{"logits": ...}``) and the batch's hard
    labels (soft targets argmax-ed), detached; None for a step without logits or another
    dataloader than the first."""
    logits = outputs.get("logits") if isinstance(outputs, dict) else None
    if dataloader_idx != 0 or logits is None:
        return None
    y = batch[1]
    return logits.detach(), (y.argmax(-1) if y.ndim == 2 else y)
