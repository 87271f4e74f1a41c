"""lit-ft from Python: the CLI's objects in a few lines, schedule plots, predictions, evaluation.

    from lit_ft.notebook import build, plot_schedule, show_predictions, evaluate

    model, dm, trainer = build("configs/quickstart.yaml", {"trainer.max_epochs": 1})
    plot_schedule(model, steps_per_epoch=100, epochs=10)       # LR per group, frozen spans
    trainer.fit(model, datamodule=dm)
    show_predictions(model, dm, n=8)
    evaluate(trainer.checkpoint_callback.best_model_path, dm)  # {"test/acc": ..., ...}

Figures are ``matplotlib.figure.Figure`` objects built without pyplot (a notebook displays
the one a cell returns; ``fig.savefig(path)`` writes it). The numbers behind a schedule
plot come from :func:`schedule_data`, separately from the drawing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import lightning as L
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lit_ft.callbacks.figures import class_name, image_grid_figure, input_stats, unnormalize
from lit_ft.errors import UserError
from lit_ft.models import ImageClassifier
from lit_ft.schedules import warmup_factor

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


# ---------------------------------------------------------------------------- schedules
@dataclass
class ScheduleData:
    """A training run's LR and freeze plan, step by step, per layer group (stem ... head).

    Attributes:
        group_names: layer-group names, stem first, head last (``G`` of them).
        lr: ``(G, T)`` learning rate each group's optimizer step uses at step ``t`` (per-group
            scale, scheduler and unfreeze warm-up included); NaN for a group without parameters.
        trainable: ``(G, T)`` bool, whether the group trains at step ``t``.
        steps_per_epoch: optimizer steps per epoch.
        epochs: epochs.
        title: the freeze plan and scheduler, for captions.
    """

    group_names: list[str]
    lr: np.ndarray
    trainable: np.ndarray
    steps_per_epoch: int
    epochs: int
    title: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def steps(self) -> np.ndarray:
        """``(T,)`` optimizer step indices."""
        return np.arange(self.lr.shape[1])

    def frozen_spans(self, group: int) -> list[tuple[int, int]]:
        """``[start, end)`` step ranges where ``group`` is frozen."""
        return _runs(~self.trainable[group])

    def lr_while_training(self, group: int) -> np.ndarray:
        """``(T,)`` the group's lr, NaN where it is frozen (what the plot draws)."""
        return np.where(self.trainable[group], self.lr[group], np.nan)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    spans, start = [], None
    for t, on in enumerate(mask.tolist() + [False]):
        if on and start is None:
            start = t
        elif not on and start is not None:
            spans.append((start, t))
            start = None
    return spans


class _ReplayTrainer:
    """The few trainer attributes ImageClassifier's optimizer/schedule code reads."""

    def __init__(self, steps_per_epoch: int, epochs: int) -> None:
        self.max_epochs = epochs
        self.num_training_batches = steps_per_epoch
        self.accumulate_grad_batches = 1
        self.estimated_stepping_batches = steps_per_epoch * epochs
        self.log_every_n_steps = 1
        self.current_epoch = 0
        self.global_step = 0
        self.optimizers: list = []
        self.lr_scheduler_configs: list = []
        self.is_global_zero = True


@contextlib.contextmanager
def _replaying(model: ImageClassifier, steps_per_epoch: int, epochs: int) -> Iterator[_ReplayTrainer]:
    # Attach a stand-in trainer; put back everything configure_optimizers and the restart touch.
    keys = ("_trainer", "_fresh_schedule", "_restarted_at")
    saved = {k: model.__dict__[k] for k in keys if k in model.__dict__}
    disabled = logging.root.manager.disable
    logging.disable(logging.INFO)  # no "LR schedule restarted" lines from a replay
    stub = _ReplayTrainer(steps_per_epoch, epochs)
    model.__dict__["_trainer"] = stub
    model.__dict__["_restarted_at"] = None
    try:
        with warnings.catch_warnings():
            # The replay steps the scheduler of an optimizer that never steps, on purpose.
            warnings.filterwarnings("ignore", ".*lr_scheduler.step.*before.*optimizer.step.*")
            yield stub
    finally:
        logging.disable(disabled)
        for k in keys:
            if k in saved:
                model.__dict__[k] = saved[k]
            else:
                model.__dict__.pop(k, None)


def schedule_data(source: Any, steps_per_epoch: Optional[int] = None, epochs: Optional[int] = None) -> ScheduleData:
    """Replay a run's LR schedule and freeze plan without training.

    The model's own ``configure_optimizers`` builds the real optimizer and scheduler (per-group
    scales, ``layer_decay``, ``lr_range``, ``WarmupCosineLR``'s automatic length); the scheduler
    is then stepped exactly as the trainer would (per step or per epoch, LP-FT's restart) and the
    plan's ``trainable(epoch, step)`` is read at every step. Nothing is trained: the optimizer
    never steps. ``ReduceLROnPlateau`` depends on metrics and is drawn flat.

    Args:
        source: an :class:`~lit_ft.ImageClassifier`, an :class:`Experiment`, or a config for
            :func:`build` (path or dict).
        steps_per_epoch: optimizer steps per epoch; for an Experiment/config it defaults to the
            training data's batches (divided by ``accumulate_grad_batches``).
        epochs: epochs; for an Experiment/config it defaults to ``trainer.max_epochs``.

    Raises:
        UserError: the length of the run is unknown.
    """
    model, steps_per_epoch, epochs = _resolve_source(source, steps_per_epoch, epochs)
    names = [g.name for g in model.groups]
    total = steps_per_epoch * epochs
    lr = np.full((len(names), total), np.nan)
    trainable = np.zeros((len(names), total), dtype=bool)
    with _replaying(model, steps_per_epoch, epochs) as trainer:
        optimizer, scheduler, interval = _unpack(model.configure_optimizers())
        trainer.optimizers = [optimizer]
        if scheduler is not None:
            trainer.lr_scheduler_configs = [_SchedulerConfig(scheduler)]
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        first = {}  # layer group -> its first param group (decay and no-decay share the lr)
        for k, g in enumerate(optimizer.param_groups):
            first.setdefault(g.get("layer_group", 0), k)
        step = 0
        for epoch in range(epochs):
            trainer.current_epoch = epoch
            model._maybe_restart_schedule()
            for _ in range(steps_per_epoch):
                trainer.global_step = step
                groups = optimizer.param_groups
                for i, k in first.items():
                    f = warmup_factor(model.freeze, i, step, steps_per_epoch)
                    lr[i, step] = groups[k]["lr"] * f
                for i in model.freeze.trainable(epoch, step):
                    trainable[i, step] = True
                step += 1
                if scheduler is not None and interval == "step" and not plateau:
                    scheduler.step()
            if scheduler is not None and interval == "epoch" and not plateau:
                scheduler.step()
    title = f"{model.freeze!r}".split("(")[0]
    sched = type(scheduler).__name__ if scheduler is not None else "constant lr"
    return ScheduleData(names, lr, trainable, steps_per_epoch, epochs, f"{title} + {sched}")


@dataclass
class _SchedulerConfig:
    scheduler: Any


def _unpack(config: Any) -> tuple[torch.optim.Optimizer, Any, str]:
    """(optimizer, scheduler or None, interval) from what ``configure_optimizers`` returned."""
    if isinstance(config, torch.optim.Optimizer):
        return config, None, "step"
    if isinstance(config, Mapping):
        sched = config.get("lr_scheduler")
        if isinstance(sched, Mapping):
            return config["optimizer"], sched["scheduler"], sched.get("interval", "epoch")
        return config["optimizer"], sched, "epoch"
    if isinstance(config, (list, tuple)) and len(config) == 2:
        (opt, *_), scheds = config
        sched = scheds[0] if scheds else None
        if isinstance(sched, Mapping):
            return opt, sched["scheduler"], sched.get("interval", "epoch")
        return opt, sched, "epoch"
    raise TypeError(f"cannot replay configure_optimizers() output of type {type(config).__name__}")


def _resolve_source(source: Any, steps_per_epoch: Optional[int], epochs: Optional[int]) -> tuple[ImageClassifier, int, int]:
    if isinstance(source, ImageClassifier):
        model, dm, trainer = source, None, None
    elif isinstance(source, tuple) and len(source) == 3 and isinstance(source[0], ImageClassifier):
        model, dm, trainer = source  # an Experiment
    else:
        model, dm, trainer = build(source)
    if epochs is None and trainer is not None and trainer.max_epochs and trainer.max_epochs > 0:
        epochs = trainer.max_epochs
    if steps_per_epoch is None and dm is not None:
        if getattr(dm, "train_dataset", None) is None:
            if hasattr(dm, "set_data_config") and dm.trainer is None:
                dm.set_data_config(model.data_config)
            dm.setup("fit")
        batches = len(dm.train_dataloader())
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        steps_per_epoch = math.ceil(batches / accumulate)
    if not steps_per_epoch or not epochs:
        raise UserError(
            f"the length of the run is unknown (steps_per_epoch={steps_per_epoch}, epochs={epochs})",
            "pass steps_per_epoch= and epochs= (or a config with trainer.max_epochs and training data)",
        )
    return model, int(steps_per_epoch), int(epochs)


def _group_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(1, n - 1)) for i in range(n)]


def draw_schedule(data: ScheduleData, ax_lr: Any, ax_plan: Any, log: bool = False, legend: bool = True) -> None:
    """Draw ``data`` on two axes: LR per group over steps (drawn where the group trains) and a
    per-group timeline with frozen spans shaded grey.

    Artists carry ``gid`` ``lr:<group>`` (one line per group) and ``frozen:<group>`` /
    ``training:<group>`` (one bar collection each), so tests can find them.
    """
    colors = _group_colors(len(data.group_names))
    steps = data.steps
    for i, name in enumerate(data.group_names):
        ax_lr.plot(steps, data.lr_while_training(i), color=colors[i], lw=1.6, label=name, gid=f"lr:{name}")
        frozen = data.frozen_spans(i)
        training = _runs(data.trainable[i])
        ax_plan.broken_barh([(a, b - a) for a, b in frozen], (i - 0.4, 0.8), facecolors="0.85",
                            edgecolor="0.6", hatch="///", linewidth=0.0, gid=f"frozen:{name}")
        ax_plan.broken_barh([(a, b - a) for a, b in training], (i - 0.4, 0.8), facecolors=colors[i],
                            gid=f"training:{name}")
    epoch_starts = np.arange(1, data.epochs) * data.steps_per_epoch
    for ax in (ax_lr, ax_plan):
        ax.vlines(epoch_starts, 0, 1, transform=ax.get_xaxis_transform(), colors="0.8", linewidth=0.6, zorder=0)
        ax.set_xlim(0, len(steps))
    if log:
        ax_lr.set_yscale("log")
    else:
        ax_lr.set_ylim(bottom=0)
    ax_lr.set_ylabel("learning rate")
    ax_lr.tick_params(labelbottom=False)
    ax_lr.set_title(data.title, fontsize=10)
    if not log:
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if legend:
        ax_lr.legend(fontsize=7, loc="upper right", ncol=2 if len(data.group_names) > 6 else 1)
    ax_plan.set_yticks(range(len(data.group_names)), data.group_names, fontsize=7)
    ax_plan.set_ylim(-0.6, len(data.group_names) - 0.4)
    ax_plan.set_xlabel(f"optimizer step ({data.steps_per_epoch} per epoch; grey = frozen)")


def plot_schedule(
    source: Any, steps_per_epoch: Optional[int] = None, epochs: Optional[int] = None, log: bool = False
) -> Figure:
    """A figure of a run's plan before training it: LR per layer group over optimizer steps
    (top) and when each group is frozen (bottom, shaded). Arguments as :func:`schedule_data`;
    a :class:`ScheduleData` is drawn as is.

    Args:
        log: logarithmic LR axis (useful with a strong ``layer_decay``).
    """
    data = source if isinstance(source, ScheduleData) else schedule_data(source, steps_per_epoch, epochs)
    fig = Figure(figsize=(8, 3.2 + 0.22 * len(data.group_names)), dpi=100)
    FigureCanvasAgg(fig)
    ax_lr, ax_plan = fig.subplots(2, 1, sharex=True, height_ratios=[3, 0.4 + 0.18 * len(data.group_names)])
    draw_schedule(data, ax_lr, ax_plan, log=log)
    fig.tight_layout()
    return fig


def plot_schedules(
    sources: Mapping[str, Any],
    steps_per_epoch: Optional[int] = None,
    epochs: Optional[int] = None,
    ncols: int = 4,
    log: bool = False,
) -> Figure:
    """Several plans side by side (``{"caption": model, config or ScheduleData}``), one panel pair each."""
    datas = {
        name: s if isinstance(s, ScheduleData) else schedule_data(s, steps_per_epoch, epochs) for name, s in sources.items()
    }
    n = len(datas)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    groups = max(len(d.group_names) for d in datas.values())
    fig = Figure(figsize=(4.3 * ncols, (3.0 + 0.2 * groups) * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    subfigs = np.atleast_1d(fig.subfigures(nrows, ncols)).ravel()
    for sub, (name, data) in zip(subfigs, datas.items()):
        ax_lr, ax_plan = sub.subplots(2, 1, sharex=True, height_ratios=[3, 0.4 + 0.18 * len(data.group_names)])
        draw_schedule(data, ax_lr, ax_plan, log=log, legend=False)
        ax_lr.set_title(name, fontsize=11)
        ax_plan.set_xlabel("optimizer step", fontsize=8)
    for sub in subfigs[n:]:
        sub.set_visible(False)
    handles, labels = subfigs[0].axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(8, len(labels)), fontsize=9,
               title="LR per layer group (lines drawn while the group trains; grey hatched = frozen)")
    return fig


# ---------------------------------------------------------------------------- predictions
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
