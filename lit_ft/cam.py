"""What does the model look at? Class activation maps (Grad-CAM and friends) of an ImageClassifier.

Owns: choosing the target layer per model family, the token-grid reshape for ViTs, and one
CAM pass that is safe anywhere: inside Lightning's validation/predict loops (which run under
``torch.inference_mode``) and with a frozen backbone. The maps themselves come from the
``grad-cam`` package (pytorch-grad-cam, the optional extra ``lit-ft[trust]``), imported only
when a CAM is asked for.

Why each step of :func:`compute_cams` is there (the library's known traps):

* Lightning evaluates under ``inference_mode``: tensors made there can never join autograd
  ("element 0 of tensors does not require grad", pytorch-grad-cam #381). The pass runs under
  ``inference_mode(False)`` + ``enable_grad`` on a normal copy of the images.
* A frozen backbone has no gradients (#254). No parameter is made trainable: every
  ``requires_grad`` is switched *off* for the pass and a hook makes the target layer's output a
  fresh leaf that requires grad, so the backward pass runs from the logits to that layer only,
  writes no ``.grad`` anywhere, and works whatever the freeze plan froze. grad-cam's
  ``model.zero_grad()`` is kept from wiping a training step's accumulated gradients.
* ViTs (#76, #257): the default target is the last block's ``norm1`` (with class-token pooling
  the patch tokens of the last block's *output* get no gradient), and the ``(B, N, D)`` tokens
  are reshaped to a ``(B, D, h, w)`` grid without the class/register tokens
  (timm's ``num_prefix_tokens``, ``patch_embed.patch_size``).
* CAM objects hold forward hooks and activations until released (#132): always used as a
  context manager; every hook and flag is restored in ``finally``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from lit_ft.errors import UserError

# lit-ft's names -> pytorch_grad_cam classes (all take model, target_layers, reshape_transform).
METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
}
CamMethod = Literal["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam"]
FEATURES = "features"  # target name of the backbone's final feature map (forward_features output)


def require_grad_cam() -> Any:
    """The ``pytorch_grad_cam`` module, or a :class:`UserError` saying how to install it."""
    try:
        import pytorch_grad_cam
    except ImportError as err:
        raise UserError(
            "class activation maps need the grad-cam package", "pip install 'lit-ft[trust]' (make install includes it)"
        ) from err
    return pytorch_grad_cam


def is_token_model(backbone: nn.Module) -> bool:
    """A ViT-like timm model: patch embedding + a list of blocks, features as ``(B, N, D)`` tokens."""
    return hasattr(backbone, "patch_embed") and isinstance(getattr(backbone, "blocks", None), nn.Sequential | nn.ModuleList)


def default_target_layer(backbone: nn.Module) -> str:
    """The target layer a CAM uses unless one is configured: ``"features"`` (the final feature
    map, i.e. the last conv stage with its head conv/norm, for CNNs) or ``"blocks.-1.norm1"``
    (ViT-like token models)."""
    if is_token_model(backbone):
        last = backbone.blocks[-1]
        if hasattr(last, "norm1"):
            return "blocks.-1.norm1"
        raise UserError(
            f"no default CAM target layer for {type(backbone).__name__} (its last block has no norm1)",
            "set the target layer by name, e.g. cam.target_layer: blocks.-1",
        )
    return FEATURES


def resolve_layer(backbone: nn.Module, name: str) -> nn.Module:
    """The submodule of ``backbone`` (the timm model) at dotted ``name``; negative indices count
    from the end of a Sequential/ModuleList (``blocks.-1.norm1``)."""
    module = backbone
    for i, part in enumerate(name.split(".")):
        try:
            if part.lstrip("-").isdigit() and isinstance(module, (nn.Sequential, nn.ModuleList)):
                module = module[int(part)]
            else:
                module = getattr(module, part)
        except (AttributeError, IndexError):
            module = None
        if not isinstance(module, nn.Module):
            prefix = ".".join(name.split(".")[:i])
            parent = backbone.get_submodule(prefix) if prefix else backbone
            children = [n for n, _ in parent.named_children()]
            raise UserError(
                f"CAM target layer {name!r}: {type(parent).__name__} {prefix or '(the backbone)'} has no {part!r}",
                f"use a module name of the timm model: {', '.join(children[:12])}{', ...' if len(children) > 12 else ''} "
                f"(or {FEATURES!r} for the final feature map)",
            )
    return module


class _CamNet(nn.Module):
    """The classifier as grad-cam sees it: ``head(tap(features(x)))``; ``tap`` (an identity)
    is the target layer ``"features"``."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.tap = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.head(self.tap(self.classifier.features(x)))

    def zero_grad(self, set_to_none: bool = True) -> None:
        # grad-cam calls it before its backward. The pass writes no parameter .grad (all
        # requires_grad are off), and a training step's accumulated gradients must survive.
        return None


def _leaf_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    # The gradient starts here: nothing before the target layer needs (or gets) one.
    return output.detach().requires_grad_(True)


def _reshape(backbone: nn.Module, image_hw: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """grad-cam's ``reshape_transform``: token ``(B, N, D)`` -> ``(B, D, h, w)``; NHWC -> NCHW."""
    prefix = int(getattr(backbone, "num_prefix_tokens", 1 if hasattr(backbone, "cls_token") else 0))
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    nhwc = getattr(backbone, "output_fmt", "NCHW") == "NHWC"

    def reshape(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 4:
            return t.permute(0, 3, 1, 2) if nhwc else t
        if t.ndim != 3:
            raise UserError(f"CAM target layer output has shape {tuple(t.shape)}", "choose a layer with a (B, C, h, w) or (B, N, D) output")
        n = t.shape[1] - prefix
        h, w = (image_hw[0] // patch[0], image_hw[1] // patch[1]) if patch else (0, 0)
        if h * w != n:
            h = w = math.isqrt(n)
            if h * w != n:
                raise UserError(f"CAM: cannot arrange {n} tokens of {tuple(t.shape)} in a grid", "choose another target layer")
        return t[:, prefix:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)  # (B, D, h, w)

    return reshape


def compute_cams(
    classifier: nn.Module,
    images: torch.Tensor,
    targets: Optional[Sequence[int]] = None,
    target_layer: Optional[str] = None,
    method: CamMethod = "gradcam",
) -> tuple[np.ndarray, torch.Tensor]:
    """Class activation maps of ``images`` for ``targets`` (default: the predicted classes).

    Safe inside Lightning's evaluation and prediction loops and with a frozen backbone (see the
    module docstring); leaves every module's train/eval mode, every ``requires_grad`` and every
    ``.grad`` as it found them.

    Args:
        classifier: an :class:`~lit_ft.models.ImageClassifier` (``features``/``head``/``model``).
        images: ``(B, C, H, W)`` model inputs (normalised), on the model's device.
        targets: the class each map explains; ``None``: the model's prediction.
        target_layer: a module name of the timm model (``layer3``, ``blocks.-1.norm1``) or
            ``"features"``; ``None``: :func:`default_target_layer`.
        method: one of :data:`METHODS`.

    Returns:
        ``(cams, logits)``: ``(B, H, W)`` float32 maps scaled to [0, 1] per image, and the
        ``(B, num_classes)`` logits of the same pass (uncalibrated: divide by the model's
        ``temperature`` for the probabilities ``predict`` reports).
    """
    pgc = require_grad_cam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in METHODS:
        raise UserError(f"unknown CAM method {method!r}", f"use one of {', '.join(METHODS)}")
    if images.ndim != 4:
        raise UserError(f"CAM needs images (B, C, H, W), got {tuple(images.shape)}", "pass model inputs, not cached features")
    backbone = classifier.model
    name = target_layer or default_target_layer(backbone)
    net = _CamNet(classifier)
    layer = net.tap if name == FEATURES else resolve_layer(backbone, name)
    modes = [(m, m.training) for m in classifier.modules()]
    flags = [(p, p.requires_grad) for p in classifier.parameters()]
    with torch.inference_mode(False), torch.enable_grad():
        x = images.detach().clone()  # a normal tensor: images from an inference-mode loop cannot enter autograd
        handle = layer.register_forward_hook(_leaf_output)  # before grad-cam's hooks, so they see the leaf
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            cam_class = getattr(pgc, METHODS[method])
            with cam_class(model=net, target_layers=[layer], reshape_transform=_reshape(backbone, tuple(x.shape[-2:]))) as cam:
                wanted = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
                maps = cam(input_tensor=x, targets=wanted)
                logits = cam.outputs.detach().float()
        finally:
            handle.remove()
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode
    return np.asarray(maps, dtype=np.float32), logits


def overlay(images: np.ndarray, cams: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """Heat maps over images: ``(B, H, W, C)`` floats in [0, 1] (C = 1 or 3) and ``(B, H, W)``
    maps -> ``(B, H, W, 3)`` uint8 (grad-cam's ``show_cam_on_image``, jet colour map)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    out = []
    for img, cam in zip(images, cams):
        rgb = np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img
        out.append(show_cam_on_image(np.ascontiguousarray(rgb, dtype=np.float32), cam, use_rgb=True, image_weight=image_weight))
    return np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def cam_panel(
    images: np.ndarray,
    cams: np.ndarray,
    probs: torch.Tensor,
    class_names: Sequence[str],
    labels: Optional[Sequence[int]] = None,
    suptitle: str = "",
    ncols: int = 8,
) -> Figure:
    """A grid of CAM overlays captioned with the prediction and its probability, and the true
    class when ``labels`` are given (green caption: right, red: wrong).

    Args:
        images: ``(B, H, W, C)`` floats in [0, 1] (e.g. :func:`lit_ft.callbacks.figures.unnormalize`).
        cams: ``(B, H, W)`` maps from :func:`compute_cams`.
        probs: ``(B, num_classes)`` probabilities (calibrated ones, if the caption should show them).
        class_names: names for the captions.
        labels: true classes, if known.
        suptitle: title of the grid.
        ncols: images per row.
    """
    from lit_ft.callbacks.figures import class_name, image_grid_figure

    conf, pred = probs.float().cpu().max(-1)
    titles, colors = [], []
    for i in range(len(images)):
        line = f"{class_name(class_names, int(pred[i]))} {float(conf[i]):.2f}"
        if labels is not None:
            line += f"\ntrue: {class_name(class_names, int(labels[i]))}"
            colors.append("tab:green" if int(pred[i]) == int(labels[i]) else "tab:red")
        else:
            colors.append("black")
        titles.append(line)
    pics = overlay(images, cams).astype(np.float32) / 255.0
    return image_grid_figure(pics, titles, colors, ncols=min(ncols, max(1, len(images))), suptitle=suptitle)
