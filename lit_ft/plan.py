"""The training plan: what a run does at (epoch, step), from explicit numbers.

Owns :class:`TrainingPlan` (which layer groups train, BN/dropout modes, each group's LR
factor (the unfreeze warm-up), when LP-FT restarts the schedule, which epochs can train on
cached features, the plan table) and :class:`PlanRunner`, the few lines that make a model
match the plan at an epoch/step. The freeze plans themselves are :mod:`lit_ft.schedules`
(pure functions of (epoch, step)); applying them to modules is :mod:`lit_ft.freezing`.
This module never builds optimizers or schedulers; apart from :func:`run_length` and
:func:`check_distributed` (which read a Trainer's public settings) it works on the numbers
the LightningModule's hooks pass it (epoch, step, steps per epoch).

Because every answer is a function of (epoch, step), a resumed or re-fitted run is in the
right state by construction, and a notebook can replay a whole run's plan without training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import lightning as L
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lit_ft.backbones import LayerGroup
from lit_ft.errors import UserError
from lit_ft.freezing import set_modes, set_trainable
from lit_ft.schedules import FreezeSchedule, warmup_factor


@dataclass(frozen=True)
class TrainingPlan:
    """A bound freeze plan over a run of ``epochs`` x ``steps_per_epoch`` optimizer steps.

    Args:
        schedule: the freeze plan, bound to the model's layer groups.
        steps_per_epoch: optimizer steps per epoch (after gradient accumulation).
        epochs: epochs in the run (None = unknown or endless).
    """

    schedule: FreezeSchedule
    steps_per_epoch: int = 1
    epochs: Optional[int] = None

    @property
    def num_groups(self) -> int:
        return self.schedule.num_groups

    def trainable(self, epoch: int, step: int) -> frozenset[int]:
        """Layer groups (indices, stem first) that train at ``epoch`` / optimizer ``step``."""
        return self.schedule.trainable(epoch, step)

    @property
    def ever_trainable(self) -> frozenset[int]:
        """Every group the plan trains at some point (DDP must register them up front)."""
        return self.schedule.ever_trainable()

    @property
    def has_phases(self) -> bool:
        """True if the trainable set changes during the run (some groups start frozen)."""
        return self.ever_trainable != self.trainable(0, 0)

    def lr_factor(self, group: int, step: int) -> float:
        """The unfreeze warm-up: a group unfrozen mid-run ramps its LR 0 -> 1."""
        return warmup_factor(self.schedule, group, step, self.steps_per_epoch)

    def lr_factors(self, layer_group_of: Sequence[int], step: int) -> list[float]:
        """:meth:`lr_factor` for each optimizer param group (``layer_group_of[k]`` = its layer group)."""
        if self.schedule.unfreeze_warmup_steps <= 0:
            return [1.0] * len(layer_group_of)
        return [self.lr_factor(i, step) for i in layer_group_of]

    @property
    def restart_epoch(self) -> Optional[int]:
        """The epoch at which the LR schedule starts afresh (LP-FT), or None."""
        return self.schedule.restart_schedule_at_epoch

    def restart_step(self, interval: str) -> Optional[int]:
        """The restart in scheduler steps (optimizer steps or epochs, by the scheduler's interval)."""
        at = self.restart_epoch
        if at is None:
            return None
        return at * self.steps_per_epoch if interval == "step" else at

    def head_only(self, epoch: int) -> bool:
        """True if during the whole of ``epoch`` only the head trains, with the backbone's
        BN statistics frozen: the backbone is then a fixed function, so its features can be
        cached (a step-unit plan may unfreeze mid-epoch: both ends of the epoch are checked)."""
        if self.schedule.train_bn:
            return False
        head = frozenset({self.num_groups - 1})
        first, last = epoch * self.steps_per_epoch, (epoch + 1) * self.steps_per_epoch - 1
        # Plans only ever add groups, so the first and last step bound the whole epoch.
        return self.trainable(epoch, first) == head and self.trainable(epoch, last) == head

    def when(self, group: int) -> str:
        """When ``group`` starts training, for the plan table (``start``, ``epoch 3``, ``never``)."""
        return self.schedule.describe(group)


def steps_per_epoch(batches: float, accumulate: int = 1) -> int:
    """Optimizer steps per epoch from the number of training batches (Lightning rounds up)."""
    if batches == float("inf") or batches <= 0:
        return 1
    return max(1, math.ceil(int(batches) / accumulate))


class PlanRunner:
    """Makes a model match a :class:`TrainingPlan`: ``requires_grad`` and module modes.

    The trainable set is a pure function of (epoch, step); the runner only remembers the
    last set it applied to skip redundant work (a cache, never checkpointed; :meth:`reset`
    forgets it at every fit start).
    """

    def __init__(self, model: nn.Module, groups: Sequence[LayerGroup], schedule: FreezeSchedule) -> None:
        self.model, self.groups, self.schedule = model, list(groups), schedule
        self.applied: Optional[frozenset[int]] = None

    def reset(self) -> None:
        self.applied = None

    def mark_ever_trainable(self, plan: TrainingPlan) -> None:
        """Every parameter the plan will ever train requires grad (for DDP's reducer)."""
        set_trainable(self.model, self.groups, plan.ever_trainable, self.schedule.train_bn)
        self.applied = None

    def apply(self, trainable: frozenset[int]) -> None:
        """``requires_grad`` for exactly ``trainable``; frozen groups' modules in eval mode.

        Modes are set only when the trainable set changes: between changes only
        ``model.train()`` resets them, and :meth:`apply_modes` runs after it (Lightning
        restores each module's own mode after validation).
        """
        if trainable != self.applied:
            set_trainable(self.model, self.groups, trainable, self.schedule.train_bn)
            self.applied = trainable
            self.apply_modes()

    def apply_modes(self) -> None:
        """Re-apply module modes (after every ``model.train()``, which resets them)."""
        if self.applied is not None:
            set_modes(self.model, self.groups, self.applied, self.schedule.train_bn, self.schedule.freeze_bn_stats)


def plan_table(
    plan: TrainingPlan,
    groups: Sequence[LayerGroup],
    params: Sequence[int],
    lrs: Sequence[Optional[float]],
    weight_decays: Sequence[Optional[float]],
    trainable: Optional[Sequence[int]] = None,
    notes: Sequence[str] = (),
) -> str:
    """The plan as a text table: per layer group, parameters, peak LR, weight decay, start.

    ``trainable``: per group, the parameters it trains when the plan trains it (a PEFT model's
    adapters, biases, head), shown as a column beside ``params``; ``notes``: lines after the table.
    """
    rows = [("group", "params") + (("trainable",) if trainable is not None else ()) + ("lr", "weight_decay", "trains from")]
    for i, g in enumerate(groups):
        rows.append(
            (g.name, f"{params[i]:,}")
            + ((f"{trainable[i]:,}",) if trainable is not None else ())
            + (
                f"{lrs[i]:.3g}" if lrs[i] is not None else "-",
                f"{weight_decays[i]:.3g}" if weight_decays[i] is not None else "-",
                plan.when(i) if trainable is None or trainable[i] else "never (fixed)",
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return f"lit-ft plan: {plan.schedule!r}\n" + "\n".join([*lines, *notes])


def run_length(trainer: L.Trainer, plan: TrainingPlan, interval: str) -> Optional[int]:
    """The run's scheduler steps (optimizer steps or epochs), or None for an endless run."""
    if interval == "step":
        total = trainer.estimated_stepping_batches  # safe here: the train loader is already set up
        return int(total) if total != float("inf") else None
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return trainer.max_epochs
    if trainer.max_steps and trainer.max_steps > 0:
        return -(-trainer.max_steps // plan.steps_per_epoch)
    return None


def check_distributed(wrapped: Any, has_phases: bool) -> None:
    """Refuse DDP settings under which a plan with frozen phases would silently go wrong.

    Groups frozen at some point produce no gradients then, so DDP must look for unused
    parameters; a static graph would be wrong as soon as the trainable set changes.
    """
    if not has_phases or not isinstance(wrapped, DistributedDataParallel):
        return
    if wrapped.static_graph:
        raise UserError(
            "DDP with static_graph=True, but the freeze plan changes the trainable parameters during the run",
            "drop static_graph from the DDP strategy, or use a plan without phases (Full, LinearProbe, Surgical)",
        )
    if not wrapped.find_unused_parameters:
        raise UserError(
            "DDP without find_unused_parameters, but the freeze plan keeps some groups frozen for part of the run "
            "(their parameters get no gradient then, and DDP would wait for them)",
            "use strategy: ddp_find_unused_parameters_true (the lit-ft CLI picks it for you), or "
            "DDPStrategy(find_unused_parameters=True)",
        )


def seed_model_rngs(seed: int) -> None:
    """Seed the RNGs the model's forward pass draws from (dropout, drop-path): torch's CPU
    generator and, if CUDA is in use, the current device's. Called at every training step
    with a seed from (run seed, step, rank), so a resumed run draws what an uninterrupted one
    did. (``torch.manual_seed`` would also seed every CUDA device, ~150 us per call.)"""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed(seed)
