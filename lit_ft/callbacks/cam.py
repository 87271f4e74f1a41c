"""Grad-CAM panels in TensorBoard during fit (and test on request), and CAM overlays from predict.

Owns when and on which images a CAM is drawn; the CAM pass itself (target layer, ViT reshape,
gradients with a frozen backbone, inference mode) is :func:`lit_ft.cam.compute_cams`.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any, Literal, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_ft.callbacks.figures import figure_to_array, input_stats, log_step, summary_writer, unnormalize
from lit_ft.errors import UserError


class GradCAMLogger(Callback):
    """Class activation maps of a fixed panel of images: the first ``num_images`` of rank zero's
    validation loader (the same images every epoch, so the maps can be compared over training),
    captioned with the prediction, its (calibrated) probability and the true class.

    Logged as ``val/gradcam`` every ``every_n_epochs`` validation epochs, at the end of the
    validation epoch, and as ``test/gradcam`` with ``on_test``. With ``predict_dir``, ``predict``
    saves one overlay PNG per image there (named after the image, or its index).

    The pass turns gradients on only for itself and only from the target layer on, so it works
    inside validation and while the backbone is frozen (see :mod:`lit_ft.cam`). Only rank zero
    computes panels; nothing is kept between epochs.

    Args:
        every_n_epochs: validation epochs between panels; 0 turns the validation panel off.
        num_images: images in the panel.
        target_layer: module of the timm model whose output is explained, e.g. ``layer3``
            (a finer map than the last stage at small image sizes) or ``blocks.-1.norm1``;
            ``features`` = the final feature map. Default: ``features`` for CNNs,
            ``blocks.-1.norm1`` for ViTs.
        method: ``gradcam``, ``gradcam++``, ``hirescam``, ``xgradcam``, ``layercam`` or ``eigencam``.
        target: explain the ``predicted`` class or the ``true`` one.
        on_test: also log a panel of test images at ``test``.
        predict_dir: folder for the overlays of ``predict`` (one PNG per image); None: none.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 8,
        target_layer: Optional[str] = None,
        method: Literal["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam"] = "gradcam",
        target: Literal["predicted", "true"] = "predicted",
        on_test: bool = False,
        predict_dir: Optional[str] = None,
    ) -> None:
        from lit_ft.cam import METHODS

        if every_n_epochs < 0 or num_images < 0:
            raise UserError(f"cam: every_n_epochs={every_n_epochs} and num_images={num_images} must be >= 0")
        if method not in METHODS:
            raise UserError(f"cam.method {method!r} is unknown", f"use one of {', '.join(METHODS)}")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.target_layer = target_layer
        self.method = method
        self.target = target
        self.on_test = on_test
        self.predict_dir = predict_dir
        self._enabled = True  # off (with one warning) when grad-cam is missing and nothing asked for it explicitly
        self._active = False
        self._images: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    # ------------------------------------------------------------------ checks up front
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        wanted = {"fit": self.every_n_epochs > 0 and self.num_images > 0, "validate": False,
                  "test": self.on_test and self.num_images > 0, "predict": self.predict_dir is not None}.get(stage, False)
        if not wanted:
            return
        from lit_ft.cam import FEATURES, default_target_layer, require_grad_cam, resolve_layer

        explicit = stage != "fit"  # asked for on the command line, not a default
        try:
            require_grad_cam()
        except UserError:
            if explicit:
                raise
            self._enabled = False
            rank_zero_warn("lit-ft: grad-cam is not installed, so no Grad-CAM panels (pip install 'lit-ft[trust]')")
            return
        if not all(hasattr(pl_module, a) for a in ("features", "head", "model")):
            raise UserError(f"Grad-CAM panels need an ImageClassifier, got {type(pl_module).__name__}", "set cam.every_n_epochs: 0")
        # A wrong layer name fails now, not after the first training epoch.
        name = self.target_layer or default_target_layer(pl_module.model)
        if name != FEATURES:
            resolve_layer(pl_module.model, name)

    # ------------------------------------------------------------------ panels: validation and test
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, self.every_n_epochs > 0 and not trainer.sanity_checking
                    and trainer.current_epoch % self.every_n_epochs == 0 and trainer.state.fn == "fit")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, self.on_test)

    def _start(self, trainer: L.Trainer, due: bool) -> None:
        self._active = due and self._enabled and self.num_images > 0 and summary_writer(trainer) is not None  # rank zero
        self._images, self._labels = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep(batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep(batch, dataloader_idx)

    def _keep(self, batch: Any, dataloader_idx: int) -> None:
        have = sum(len(x) for x in self._images)
        if not self._active or dataloader_idx != 0 or have >= self.num_images:
            return
        x, y = batch[0], batch[1]
        if x.ndim != 4:  # cached features (B, D) of a cached linear probe: no images this epoch
            return
        # Copies, not views: a view would keep the whole batch alive until the epoch ends.
        self._images.append(x[: self.num_images - have].detach().clone())
        self._labels.append((y.argmax(-1) if y.ndim == 2 else y)[: self.num_images - have].detach().clone())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._panel(trainer, pl_module, "val", f"epoch {trainer.current_epoch}")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._panel(trainer, pl_module, "test", "test")

    def _panel(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, when: str) -> None:
        if not self._active or not self._images:
            self._active = False
            return
        from lit_ft.cam import cam_panel, compute_cams

        self._active = False
        x, y = torch.cat(self._images), torch.cat(self._labels)
        self._images, self._labels = [], []
        targets = y.tolist() if self.target == "true" else None
        cams, logits = compute_cams(pl_module, x, targets, self.target_layer, self.method)
        probs = (logits / float(getattr(pl_module, "temperature", 1.0))).softmax(-1)  # calibrated, as predict reports
        mean, std = input_stats(getattr(trainer, "datamodule", None), pl_module)
        layer = self.target_layer or "default layer"
        fig = cam_panel(unnormalize(x, mean, std), cams, probs, getattr(pl_module, "class_names", []), y.tolist(),
                        suptitle=f"{self.method} ({layer}, {self.target} class), {when}")
        summary_writer(trainer).add_image(f"{stage}/gradcam", figure_to_array(fig), log_step(trainer), dataformats="HWC")

    # ------------------------------------------------------------------ predict: one overlay per image
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.predict_dir is None or not self._enabled:
            return
        from PIL import Image

        from lit_ft.cam import compute_cams, overlay

        x, ids = batch[0], batch[1]
        cams, _ = compute_cams(pl_module, x, None, self.target_layer, self.method)
        mean, std = input_stats(getattr(trainer, "datamodule", None), pl_module)
        root = Path(self.predict_dir)
        for image_id, pic in zip(ids, overlay(unnormalize(x, mean, std), cams)):
            path = root / overlay_name(image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pic).save(path)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.predict_dir is not None and self._enabled:
            rank_zero_info(f"lit-ft: CAM overlays ({self.method}) in {self.predict_dir}")

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing carries over between epochs or runs


def overlay_name(image_id: Any) -> str:
    """File name (relative to ``predict_dir``) of an image's overlay: its relative path plus
    ``.png`` unless it is one (sub-folders kept, ``..`` and absolute parts dropped), or a
    zero-padded index."""
    if isinstance(image_id, torch.Tensor):
        image_id = image_id.item()
    if isinstance(image_id, (int, np.integer)):
        return f"{int(image_id):06d}.png"
    parts = [p for p in PurePath(str(image_id)).parts if p not in ("..", ".") and not PurePath(p).anchor]
    if not parts:
        return "image.png"
    name = str(PurePath(*parts))
    return name if name.lower().endswith(".png") else name + ".png"  # cat.jpg -> cat.jpg.png: no clash with cat.png

