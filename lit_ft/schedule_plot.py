"""A run's LR schedule and freeze plan, replayed step by step without training, and drawn.

Owns :class:`ScheduleData` (the numbers: LR per layer group per optimizer step, and which
groups train), :func:`schedule_data` (the replay) and the figures. The replay drives the
same objects a fit uses (:class:`lit_ft.plan.TrainingPlan`, the optimizer from
:func:`lit_ft.optim.build_optimizer`, :class:`lit_ft.lr_schedule.PlannedLR`) with explicit
numbers, so it needs no Trainer and cannot drift from training (a test compares it with a
real run's logged LRs). It never trains or changes the model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lit_ft import optim as O
from lit_ft.errors import UserError
from lit_ft.lr_schedule import PlannedLR
from lit_ft.models import ImageClassifier
from lit_ft.plan import TrainingPlan


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


def schedule_data(source: Any, steps_per_epoch: Optional[int] = None, epochs: Optional[int] = None) -> ScheduleData:
    """Replay a run's LR schedule and freeze plan without training.

    The optimizer is built as ``fit`` builds it (per-group scales, ``layer_decay``,
    ``lr_range``), and the schedule is the one ``fit`` steps (:class:`PlannedLR`: automatic
    lengths, LP-FT's restart, the unfreeze warm-up); the plan's ``trainable(epoch, step)``
    is read at every step. Nothing is trained: the optimizer never steps.
    ``ReduceLROnPlateau`` depends on metrics and is drawn flat.

    Args:
        source: an :class:`~lit_ft.ImageClassifier`, an :class:`~lit_ft.experiment.Experiment`,
            or a config for :func:`~lit_ft.experiment.build` (path or dict).
        steps_per_epoch: optimizer steps per epoch; for an Experiment/config it defaults to the
            training data's batches (divided by ``accumulate_grad_batches``).
        epochs: epochs; for an Experiment/config it defaults to ``trainer.max_epochs``.

    Raises:
        UserError: the length of the run is unknown.
    """
    model, steps_per_epoch, epochs = _resolve_source(source, steps_per_epoch, epochs)
    hp = model.hparams
    plan = TrainingPlan(model.freeze, steps_per_epoch, epochs)
    optimizer = O.build_optimizer(
        model.optimizer_factory, model.model, model.groups, hp.lr_mult, hp.layer_decay, hp.lr_range, hp.no_decay_norm_bias
    )
    layer_group_of = [g["layer_group"] for g in optimizer.param_groups]
    scheduler = PlannedLR(optimizer, model.scheduler_factory, factors=lambda step: plan.lr_factors(layer_group_of, step))
    interval = hp.scheduler_interval
    total = steps_per_epoch * epochs
    scheduler.bind(total if interval == "step" else epochs, plan.restart_step(interval))
    plateau = isinstance(scheduler.inner, torch.optim.lr_scheduler.ReduceLROnPlateau)
    names = [g.name for g in model.groups]
    lr = np.full((len(names), total), np.nan)
    trainable = np.zeros((len(names), total), dtype=bool)
    first = {}  # layer group -> its first param group (decay and no-decay share the lr)
    for k, i in enumerate(layer_group_of):
        first.setdefault(i, k)
    step = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*lr_scheduler.step.*before.*optimizer.step.*")
        for epoch in range(epochs):
            if epoch == plan.restart_epoch:
                scheduler.restart()
            for _ in range(steps_per_epoch):
                scheduler.apply(step)
                for i, k in first.items():
                    lr[i, step] = optimizer.param_groups[k]["lr"]
                for i in plan.trainable(epoch, step):
                    trainable[i, step] = True
                step += 1
                if interval == "step" and not plateau:
                    scheduler.step()
            if interval == "epoch" and not plateau:
                scheduler.step()
    title = f"{model.freeze!r}".split("(")[0]
    inner = type(scheduler.inner).__name__ if scheduler.inner is not None else "constant lr"
    return ScheduleData(names, lr, trainable, steps_per_epoch, epochs, f"{title} + {inner}")


def _resolve_source(source: Any, steps_per_epoch: Optional[int], epochs: Optional[int]) -> tuple[ImageClassifier, int, int]:
    if isinstance(source, ImageClassifier):
        model, dm, trainer = source, None, None
    elif isinstance(source, tuple) and len(source) == 3 and isinstance(source[0], ImageClassifier):
        model, dm, trainer = source  # an Experiment
    else:
        from lit_ft.experiment import build  # experiment -> cli -> models: late import

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


