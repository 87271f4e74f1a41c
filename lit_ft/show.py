"""Figures of what a model does on data: its predictions on a split's first images, where it
looks (:func:`show_cam`) and how far its probabilities can be trusted (:func:`reliability_diagram`).

Owns the notebook-facing views of a model's behaviour; the TensorBoard figures of a run are
:mod:`lit_ft.callbacks`' job, the CAM pass :mod:`lit_ft.cam`'s and the calibration numbers
:mod:`lit_ft.calibration`'s. Never trains the model and leaves its train/eval mode as it found it.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from matplotlib.figure import Figure

from lit_ft.calibration import DEFAULT_BINS, reliability_bins, reliability_figure
from lit_ft.callbacks.figures import class_name, image_grid_figure, input_stats, unnormalize
from lit_ft.errors import UserError
from lit_ft.models import ImageClassifier

_STAGE = {"train": "fit", "val": "validate", "test": "test"}


def _dataset_loader(model: ImageClassifier, datamodule: Any, split: str) -> Any:
    if split not in _STAGE:
        raise UserError(f"split must be one of {sorted(_STAGE)}, got {split!r}")
    if getattr(datamodule, f"{split}_dataset", None) is None:
        if hasattr(datamodule, "set_data_config") and datamodule.trainer is None:
            datamodule.set_data_config(model.data_config)
        datamodule.setup(_STAGE[split])
    return getattr(datamodule, f"{split}_dataloader")()


def show_predictions(model: ImageClassifier, datamodule: Any, n: int = 8, split: str = "val", ncols: int = 8) -> Figure:
    """The first ``n`` images of a split with the model's prediction, its probability and the
    true class (green caption: right, red: wrong).

    Args:
        model: the classifier (any device; switched to eval mode for the call and back).
        datamodule: a lit-ft datamodule (set up on demand with the model's data config).
        n: number of images.
        split: ``"val"``, ``"test"`` or ``"train"`` (training images are augmented).
        ncols: images per row.
    """
    x, y = _first(_dataset_loader(model, datamodule, split), n)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = model(x.to(device)).float().softmax(-1).cpu()
    finally:
        model.train(was_training)
    prob, pred = probs.max(-1)
    names = model.class_names
    titles = [
        f"{class_name(names, int(p))} {float(q):.2f}\ntrue: {class_name(names, int(t))}" for p, q, t in zip(pred, prob, y)
    ]
    colors = ["tab:green" if int(p) == int(t) else "tab:red" for p, t in zip(pred, y)]
    mean, std = input_stats(datamodule, model)
    right = int((pred == y).sum())
    return image_grid_figure(unnormalize(x, mean, std), titles, colors, ncols=min(ncols, len(x)),
                             suptitle=f"{split}: {right}/{len(x)} right")


def _first(loader: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images and labels the loader yields."""
    xs, ys, seen = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        seen += len(x)
        if seen >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def show_cam(
    model: ImageClassifier,
    images: Union[torch.Tensor, Any],
    labels: Optional[Sequence[int]] = None,
    n: int = 8,
    split: str = "val",
    target_layer: Optional[str] = None,
    method: str = "gradcam",
    target: str = "predicted",
    ncols: int = 8,
) -> Figure:
    """Class activation maps over images, captioned with the (calibrated) prediction and,
    when known, the true class (green: right, red: wrong).

    Args:
        model: the classifier (any device; its mode, ``requires_grad`` flags and gradients are
            left as they were, a frozen backbone is fine).
        images: ``(B, C, H, W)`` model inputs (normalised as the model expects), or a lit-ft
            datamodule (then its first ``n`` images of ``split``, with their labels).
        labels: true classes of ``images`` (tensor input).
        n: images taken from a datamodule.
        split: ``"val"``, ``"test"`` or ``"train"`` for a datamodule.
        target_layer: module name of the timm model (``layer3``, ``blocks.-1.norm1``,
            ``features``); default per family (:func:`lit_ft.cam.default_target_layer`).
        method: ``gradcam``, ``gradcam++``, ``hirescam``, ``xgradcam``, ``layercam``, ``eigencam``.
        target: explain the ``predicted`` class or the ``true`` one (needs labels).
        ncols: images per row.
    """
    from lit_ft.cam import cam_panel, compute_cams

    datamodule = None
    if isinstance(images, torch.Tensor):
        x = images
        y = torch.as_tensor(list(labels)) if labels is not None else None
    else:
        datamodule = images
        x, y = _first(_dataset_loader(model, datamodule, split), n)
    if target not in ("predicted", "true") or (target == "true" and y is None):
        raise UserError(f"target={target!r} needs {'labels' if target == 'true' else 'predicted or true'}",
                        "pass labels=..., or target='predicted'")
    device = next(model.parameters()).device
    targets = y.tolist() if target == "true" else None
    cams, logits = compute_cams(model, x.to(device), targets, target_layer, method)
    probs = (logits / float(model.temperature)).softmax(-1)  # calibrated, as predict reports
    mean, std = input_stats(datamodule, model)
    return cam_panel(unnormalize(x, mean, std), cams, probs, model.class_names, y.tolist() if y is not None else None,
                     suptitle=f"{method} ({target_layer or 'default layer'}, {target} class)", ncols=ncols)


def reliability_diagram(
    source: Union[ImageClassifier, torch.Tensor],
    data: Any,
    split: str = "val",
    n_bins: int = DEFAULT_BINS,
    title: str = "",
) -> Figure:
    """Reliability diagram (accuracy per confidence bin against the diagonal) with its ECE.

    Args:
        source: a classifier (its calibrated probabilities on ``data``'s ``split``), or
            ``(N, C)`` logits.
        data: a lit-ft datamodule for a classifier, the ``(N,)`` labels for logits.
        split: ``"val"`` or ``"test"`` for a datamodule.
        n_bins: confidence bins.
        title: figure title; default the split (and temperature).
    """
    if isinstance(source, torch.Tensor):
        probs, labels = source.float().softmax(-1), torch.as_tensor(data)
        label = title
    else:
        model = source
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        chunks, ys = [], []
        try:
            with torch.no_grad():
                for x, y in _dataset_loader(model, data, split):
                    chunks.append((model(x.to(device)) / model.temperature).float().softmax(-1).cpu())
                    ys.append(y)
        finally:
            model.train(was_training)
        probs, labels = torch.cat(chunks), torch.cat(ys)
        t = float(model.temperature)
        label = title or (f"{split}, T={t:.2f}" if t != 1.0 else split)
    return reliability_figure(reliability_bins(probs, labels, n_bins), label)
