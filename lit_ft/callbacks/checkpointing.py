"""Checkpoint files that survive crashes, a ``last.ckpt`` that is the latest epoch, and a check
that a checkpoint fits the model.

Lightning's ``TorchCheckpointIO`` serialises to memory and then writes through an fsspec
transaction whose temporary file lives in the system temp folder; committing it is a
``shutil.move``, which degrades to a plain copy over the old file when that folder is on another
filesystem (a crash then leaves a truncated ``last.ckpt``), and nothing is fsynced.
:class:`AtomicCheckpointIO` writes a temporary file next to the target, fsyncs it and
``os.replace``-s it over the target: at every instant the target is either the complete old
checkpoint or the complete new one.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_ft import weights as W
from lit_ft.errors import UserError

PathLike = Union[str, Path]


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` such that ``path`` is never left half-written.

    The data goes to a hidden temporary file in the same folder (same filesystem, so the final
    rename is atomic), is flushed to disk, and then replaces ``path`` in one ``os.replace``.
    On any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; match a normal open()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through :func:`atomic_save`.

    Remote paths (``s3://``, ...) keep Lightning's fsspec transaction. A failed write (disk
    full, permissions) becomes a :class:`UserError` saying the previous checkpoint is intact.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            atomic_save(checkpoint, path)
        except OSError as err:
            raise UserError(
                f"cannot write checkpoint {path}: {err.strerror or err}",
                "free disk space or point --checkpoint.dirpath elsewhere; any earlier checkpoint file is unchanged",
            ) from err


# ModelCheckpoint settings of the file that is always the latest epoch (see last_epoch_checkpoint).
LAST_EPOCH_CHECKPOINT = {
    "filename": ModelCheckpoint.CHECKPOINT_NAME_LAST,
    "monitor": None,
    "save_top_k": 1,
    "every_n_epochs": 1,
    "enable_version_counter": False,
}


def last_epoch_checkpoint(dirpath: Optional[PathLike] = None) -> ModelCheckpoint:
    """A stock ``ModelCheckpoint`` that keeps ``last.ckpt`` = the latest epoch.

    Needed next to the "best" one because since Lightning 2.6 ``save_last=True`` copies only
    what was just saved as a top-k checkpoint, so with ``save_top_k=1`` ``last.ckpt`` would be
    the *best* epoch and resuming from it (or after a crash) loses every epoch since the
    metric last improved. No monitor, one file named ``last``, overwritten in place (no
    ``last-v1.ckpt``) through the trainer's CheckpointIO, so writes stay atomic.
    The CLI registers the same settings as its ``last_checkpoint`` section.
    """
    return ModelCheckpoint(dirpath=dirpath, **LAST_EPOCH_CHECKPOINT)


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Make ``trainer`` write checkpoints atomically, unless it was given a custom CheckpointIO."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` of this run goes: the ModelCheckpoint's folder, else ``<log_dir>/checkpoints``."""
    cb = trainer.checkpoint_callback
    if isinstance(cb, ModelCheckpoint) and cb.dirpath:
        candidates = {"epoch": torch.tensor(trainer.current_epoch), "step": torch.tensor(trainer.global_step)}
        return Path(cb.format_checkpoint_name(candidates, cb.CHECKPOINT_NAME_LAST))
    root = trainer.log_dir or trainer.default_root_dir
    return Path(root) / "checkpoints" / "last.ckpt"


def save_last_checkpoint(trainer: L.Trainer) -> Path:
    """Save the full training state (resumable) as this run's ``last.ckpt``; every rank must call it."""
    path = last_checkpoint_path(trainer)
    cb = trainer.checkpoint_callback
    if isinstance(cb, ModelCheckpoint):
        # Part of the saved state: a resumed run then overwrites this file instead of writing last-v1.ckpt.
        cb.last_model_path = str(path)
    trainer.save_checkpoint(path, weights_only=False)  # the full training state, resumable
    return path


def describe_last_good(trainer: L.Trainer) -> str:
    """A sentence naming the newest checkpoint on disk of this run, for messages."""
    paths = [
        p
        for cb in trainer.checkpoint_callbacks
        if isinstance(cb, ModelCheckpoint)
        for p in (cb.last_model_path, cb.best_model_path)
        if p and os.path.isfile(p)
    ]
    if not paths:
        return "no checkpoint was written before that"
    newest = max(paths, key=os.path.getmtime)
    return f"the last good checkpoint is {newest}"


# --------------------------------------------------------------------------- compatibility


def check_checkpoint_fits(path: PathLike, model: torch.nn.Module) -> None:
    """Raise a :class:`UserError` if checkpoint ``path`` cannot be loaded into ``model``.

    Compares the classes stored by lit-ft (names, in label order) and every tensor's shape,
    so a mismatch is reported in the user's terms instead of as a ``load_state_dict`` trace.
    The file is read with ``weights_only=True`` (memory-mapped when possible).
    """
    ckpt = _load(path)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a Lightning checkpoint (no state_dict)", "pass a .ckpt written by lit-ft fit")
    names = (ckpt.get("hyper_parameters") or {}).get("class_names") or (ckpt.get("lit_ft") or {}).get("class_names")
    ours = getattr(model, "class_names", None)
    if names and ours and list(names) != list(ours):
        raise UserError(
            f"checkpoint {path} was trained on {len(names)} classes ({_short(names)}) "
            f"but the data has {len(ours)} classes ({_short(ours)})",
            "use data with the checkpoint's classes (same class folders), or start a new run that "
            "fine-tunes its weights on these classes with --model.pretrained <checkpoint> (new head) and no --ckpt_path",
        )
    target = model.state_dict()
    wrong = [k for k, v in state.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if wrong or missing or unexpected:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} tensor(s) of another shape, e.g. {k}: checkpoint {tuple(state[k].shape)} "
                f"vs model {tuple(target[k].shape)}"
            )
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise UserError(
            f"checkpoint {path} does not fit the model: " + "; ".join(parts),
            "it was written for another backbone or number of classes: use the config it was trained with, "
            "or fine-tune from it with --model.pretrained <checkpoint> instead of --ckpt_path",
        )


def _load(path: PathLike) -> Any:
    """Read a checkpoint with ``weights_only=True``, naming what the file is if it is not one."""
    W.check_checkpoint_file(path)
    try:  # mmap: checking shapes must not read a multi-GB file into memory
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise refuse_code_pickle(path, err) from err
    except RuntimeError:  # legacy (non-zip) format cannot be mapped
        return W.torch_load(path, what="checkpoint")


def refuse_code_pickle(path: PathLike, err: BaseException) -> UserError:
    """The error for a file that ``weights_only=True`` refuses (it would run code to unpickle)."""
    first = str(err).strip().splitlines()
    return UserError(
        f"refusing to load {path}: it needs arbitrary code to unpickle ({first[0] if first else type(err).__name__})",
        "only tensors and plain data are loaded (weights_only=True). If you trust the file, re-save its "
        "state_dict with torch.save or as .safetensors in the environment that wrote it",
    )


def _short(names: list, n: int = 6) -> str:
    return ", ".join(map(str, names[:n])) + (", ..." if len(names) > n else "")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def restore_weights(model: torch.nn.Module, path: PathLike) -> None:
    """Load a lit-ft checkpoint's weights (and the state its hooks keep: regularizer anchors,
    the trained preprocessing) into ``model``, outside a Trainer (for lit-ft's own commands).

    The file is read with ``weights_only=True``; call :func:`check_checkpoint_fits` first for
    a readable message when it does not fit.
    """
    ckpt = _load(path)
    if hasattr(model, "on_load_checkpoint"):
        model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"])
