"""Experiments from Python: the CLI's own objects from a config, and finished runs back.

Owns :func:`build` (model, datamodule and trainer exactly as ``lit-ft fit --config`` would
make them), :func:`load_run`/:func:`find_checkpoint` (a run's trained model),
:func:`run_datamodule` and :func:`evaluate`. Drawing lives in :mod:`lit_ft.schedule_plot`
and :mod:`lit_ft.show`; :mod:`lit_ft.notebook` gathers all of them for notebooks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import lightning as L
import torch

from lit_ft.errors import UserError
from lit_ft.models import ImageClassifier

ConfigLike = Union[str, Path, Mapping[str, Any]]


class Experiment(NamedTuple):
    """What :func:`build` returns: unpack as ``model, datamodule, trainer = build(...)``."""

    model: ImageClassifier
    datamodule: L.LightningDataModule
    trainer: L.Trainer


# ---------------------------------------------------------------------------- build
def build(
    config: Union[ConfigLike, Sequence[ConfigLike], None] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> Experiment:
    """The model, datamodule and trainer that ``lit-ft fit --config ...`` would run, unrun.

    Args:
        config: a YAML path, a dict shaped like one (``{"model": {...}, "data": {"class_path":
            ..., "init_args": {...}}, "trainer": {...}}``), or a list of them composed in order
            (like repeated ``-c``).
        overrides: dotted keys as on the command line, applied last, e.g.
            ``{"trainer.max_epochs": 1, "data.train_subset": 512, "model.freeze":
            "lit_ft.schedules.Gradual"}``.

    Returns:
        ``Experiment(model, datamodule, trainer)``; ``trainer.fit(model, datamodule=datamodule)``
        trains exactly as the CLI would (same callbacks, logger under ``runs/``, config.yaml).

    Raises:
        UserError: a configuration lit-ft rejects, with a hint for the fix.
    """
    from lit_ft.cli import _find_user_error, make_cli

    configs = [] if config is None else list(config) if isinstance(config, (list, tuple)) else [config]
    args: list[str] = []
    for c in configs:
        if isinstance(c, Mapping):
            args += [_arg(key, value) for key, value in c.items()]
        else:
            args += ["--config", str(c)]
    args += [_arg(key, value) for key, value in (overrides or {}).items()]
    argv, sys.argv = sys.argv, sys.argv[:1]  # a kernel's own argv is not CLI input
    try:
        cli = make_cli(args, run=False, parser_kwargs={"exit_on_error": False})
    except Exception as err:
        user_error = _find_user_error(err)
        if user_error is not None:
            raise user_error from None
        raise
    finally:
        sys.argv = argv
    return Experiment(cli.model, cli.datamodule, cli.trainer)


def _arg(key: str, value: Any) -> str:
    # Strings go as typed on a command line; anything else as JSON, which the parser reads as YAML.
    text = str(value) if isinstance(value, (str, Path)) else json.dumps(_plain(value))
    return f"--{key}={text}"


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------- finished runs
def find_checkpoint(path: Union[str, Path], which: str = "best") -> Path:
    """A ``.ckpt`` file itself, or the ``best``/``last`` checkpoint of a run directory
    (``runs/<experiment>/version_N``).

    Raises:
        UserError: no checkpoint there.
    """
    path = Path(path)
    if path.is_file():
        return path
    last = path / "checkpoints" / "last.ckpt"
    if which == "best" and last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
        for value in state.values():  # ModelCheckpoint's state (or a subclass's)
            if isinstance(value, dict) and value.get("best_model_path"):
                best = Path(value["best_model_path"])
                for candidate in (best, path / "checkpoints" / best.name):
                    if candidate.is_file():
                        return candidate
    if last.is_file():
        return last
    found = sorted((path / "checkpoints").glob("*.ckpt")) if path.is_dir() else []
    if found:
        return found[-1]
    raise UserError(f"no checkpoint at {path}", "pass a .ckpt file or a run directory runs/<experiment>/version_N")


def load_run(path: Union[str, Path], which: str = "best", map_location: Any = "cpu") -> ImageClassifier:
    """The trained classifier of a finished run, ready for ``model(x)`` or :func:`evaluate`.

    Args:
        path: a ``.ckpt`` file or a run directory (then its ``best`` or ``last`` checkpoint).
        which: ``"best"`` or ``"last"`` for a run directory.
        map_location: device for the weights.

    The checkpoint is read with ``weights_only=True``; the model is rebuilt from its saved
    arguments with ``pretrained=False`` (the checkpoint holds every weight, no download).
    """
    ckpt = find_checkpoint(path, which)
    model = ImageClassifier.load_from_checkpoint(ckpt, map_location=map_location, weights_only=True, pretrained=False)
    model.eval()
    return model


def run_datamodule(path: Union[str, Path]) -> L.LightningDataModule:
    """The datamodule of a finished run, from the ``config.yaml`` saved in its directory."""
    path = Path(path)
    run = path.parent.parent if path.is_file() else path
    config = run / "config.yaml"
    if not config.is_file():
        raise UserError(f"no config.yaml in {run}", "pass the datamodule to evaluate(...)")
    import yaml

    saved = yaml.safe_load(config.read_text()) or {}
    # Subcommand options (ckpt_path, ...) and callbacks play no part in building the data.
    cfg = {k: saved[k] for k in ("seed_everything", "model", "data") if k in saved}
    cfg.setdefault("model", {})["pretrained"] = False  # only the data is wanted: no weight download
    return build(cfg).datamodule


def evaluate(
    source: Union[str, Path, ImageClassifier], datamodule: Optional[Any] = None, split: str = "test", **trainer_kwargs: Any
) -> dict[str, float]:
    """Test (or validate) a model or a finished run's checkpoint; returns ``{"test/acc": ...}``.

    Args:
        source: a classifier, a ``.ckpt`` file or a run directory (its best checkpoint).
        datamodule: the data; default: the run's own, rebuilt from its saved ``config.yaml``.
        split: ``"test"`` or ``"val"``.
        **trainer_kwargs: options of the quiet evaluation ``Trainer`` (e.g. ``accelerator``).
    """
    if split not in ("test", "val"):
        raise UserError(f"split must be 'test' or 'val', got {split!r}")
    model = source if isinstance(source, ImageClassifier) else load_run(source)
    if datamodule is None:
        if isinstance(source, ImageClassifier):
            raise UserError("evaluate(model) needs the data", "pass datamodule=...")
        datamodule = run_datamodule(find_checkpoint(source))
    options = dict(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                   enable_model_summary=False, enable_progress_bar=False)
    options.update(trainer_kwargs)
    trainer = L.Trainer(**options)
    run = trainer.test if split == "test" else trainer.validate
    results = run(model, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def evaluation_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``accelerator`` and ``precision`` of a parsed CLI config, for :func:`evaluate`'s quiet
    trainers (lit-ft's own commands evaluate on one device, whatever the config's strategy)."""
    trainer = config.get("trainer") or {}
    return {k: trainer[k] for k in ("accelerator", "precision") if trainer.get(k) is not None}
