"""Figures of what a model does on data: its predictions on a split's first images.

Owns the notebook-facing views of a model's behaviour (:func:`show_predictions`); the
TensorBoard figures of a run are :mod:`lit_ft.callbacks`' job. Never trains the model and
leaves its train/eval mode as it found it.
"""

from __future__ import annotations

from typing import Any

import torch
from matplotlib.figure import Figure

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
    loader = _dataset_loader(model, datamodule, split)
    xs, ys, seen = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        seen += len(x)
        if seen >= n:
            break
    x, y = torch.cat(xs)[:n], torch.cat(ys)[:n]
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


