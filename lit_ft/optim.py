"""Layer groups -> named, scaled optimizer param groups (pure functions), and the LR
scheduler classes a config can name (``WarmupCosineLR``, ``SequentialLR``, ``ChainedScheduler``).

One param group per (layer group x decay/no-decay), built once. A group's learning-rate
scale is folded into its starting ``lr`` right after the optimizer is created, so every
torch scheduler keeps the ratios between groups: schedulers scale each group from its own
``initial_lr``. (timm's ``lr_scale`` key is read only by timm's schedulers; we do not rely
on it.) How a schedule runs over a whole training run (its length, restarts, repairs of
schedulers given one value for every group, the whole-run ratio check) is
:mod:`lit_ft.lr_schedule`'s job. This module never touches ``requires_grad``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim import lr_scheduler as torch_schedulers
from torch.optim.lr_scheduler import LambdaLR

from lightning.pytorch.cli import LRSchedulerCallable

from lit_ft.backbones import LayerGroup, named_parameters, no_weight_decay_names, resolve_group
from lit_ft.errors import UserError

NO_DECAY_SUFFIX = "/no_decay"


def group_lr_scales(
    names: Sequence[str],
    lr_mult: Optional[Mapping[Union[str, int], float]] = None,
    layer_decay: Optional[float] = None,
) -> list[float]:
    """Learning-rate multiplier of each layer group (stem first, head last).

    Args:
        names: layer-group names in order; the last one is the head.
        lr_mult: explicit multipliers by group name or index (``-1`` = head).
        layer_decay: ``scale_i = layer_decay ** depth_from_head`` (head = 1).

    Raises:
        UserError: unknown group, or a scale that is not positive.
    """
    n = len(names)
    scales = [1.0] * n
    if layer_decay is not None:
        if not 0 < layer_decay <= 1:
            raise UserError(f"layer_decay must be in (0, 1], got {layer_decay}", "typical values are 0.6-0.9")
        scales = [layer_decay ** (n - 1 - i) for i in range(n)]
    for ref, mult in (lr_mult or {}).items():
        if not (isinstance(mult, (int, float)) and mult > 0 and math.isfinite(mult)):
            raise UserError(
                f"lr_mult for group {ref!r} must be a positive number, got {mult!r}",
                "use 0 < multiplier; to keep a group fixed, freeze it with a freeze schedule instead",
            )
        scales[resolve_group(ref, list(names))] *= float(mult)
    return scales


def lr_range_scales(n: int, low: float, high: float, base_lr: float) -> list[float]:
    """fastai ``slice(low, high)``: geometric lrs from ``low`` (stem) to ``high`` (head), as scales of ``base_lr``."""
    if not (0 < low <= high):
        raise UserError(f"lr_range must satisfy 0 < low <= high, got ({low}, {high})", "e.g. lr_range: [1e-5, 1e-3]")
    if n == 1:
        return [high / base_lr]
    return [low * (high / low) ** (i / (n - 1)) / base_lr for i in range(n)]


def build_param_groups(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    scales: Sequence[float],
    split_no_decay: bool = True,
    no_decay: Optional[set[str]] = None,
) -> list[dict]:
    """One optimizer param group per (layer group x decay/no-decay), each named and scaled.

    ``no_decay``: the parameter names without weight decay; default the model's own
    (:func:`lit_ft.backbones.no_weight_decay_names`: its ``no_weight_decay()`` tokens,
    biases and norm weights) plus each group's :attr:`~lit_ft.backbones.LayerGroup.no_decay`.

    Each dict has ``params``, ``name``, ``layer_group`` (index), ``lr_scale``; no-decay groups
    also carry ``weight_decay=0``. Empty groups are left out. Every trainable-or-not
    parameter of ``model`` lands in exactly one group (asserted): freezing later only
    toggles ``requires_grad``; groups are never added mid-run.
    """
    params = named_parameters(model)  # also through FSDP's per-block wrappers
    shapes = {n: s for g in groups for n, s in g.shapes.items()}  # as built, not FSDP's flat shards
    own = {n for g in groups for n in g.no_decay}  # e.g. PEFT's scales that start at 1
    skip = ((no_weight_decay_names(model, shapes) | own) if no_decay is None else no_decay) if split_no_decay else set()
    out: list[dict] = []
    for i, (group, scale) in enumerate(zip(groups, scales, strict=True)):
        decay = [params[n] for n in group.param_names if n not in skip]
        plain = [params[n] for n in group.param_names if n in skip]
        if decay:
            out.append({"params": decay, "name": group.name, "layer_group": i, "lr_scale": scale})
        if plain:
            out.append(
                {"params": plain, "name": group.name + NO_DECAY_SUFFIX, "layer_group": i, "lr_scale": scale, "weight_decay": 0.0}
            )
    ids = [id(p) for g in out for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two param groups"
    assert set(ids) == {id(p) for p in params.values()}, "a parameter is in no param group"
    return out


def apply_lr_scales(optimizer: torch.optim.Optimizer) -> None:
    """Fold each group's ``lr_scale`` into its lr (call once, right after creating the optimizer)."""
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * g.get("lr_scale", 1.0)


def build_optimizer(
    factory: Callable[[list[dict]], torch.optim.Optimizer],
    model: nn.Module,
    groups: Sequence[LayerGroup],
    lr_mult: Optional[Mapping[Union[str, int], float]] = None,
    layer_decay: Optional[float] = None,
    lr_range: Optional[tuple[float, float]] = None,
    split_no_decay: bool = True,
) -> torch.optim.Optimizer:
    """The run's optimizer: every param group built once, each group's LR scale folded in.

    ``factory`` is the user's optimizer callable (``OptimizerCallable``); its ``lr`` is the
    base LR that the scales multiply (``lr_range`` replaces it by a geometric spread).
    """
    names = [g.name for g in groups]
    scales = group_lr_scales(names, lr_mult, layer_decay)
    optimizer = factory(build_param_groups(model, groups, scales, split_no_decay=split_no_decay))
    if lr_range is not None:
        spread = lr_range_scales(len(groups), *lr_range, base_lr=optimizer.defaults["lr"])
        for g in optimizer.param_groups:
            g["lr_scale"] *= spread[g["layer_group"]]
    apply_lr_scales(optimizer)
    return optimizer


def check_lr_options(
    names: Sequence[str],
    lr_mult: Optional[Mapping[Union[str, int], float]],
    layer_decay: Optional[float],
    lr_range: Optional[tuple[float, float]],
) -> None:
    """Validate the LR options together, at construction rather than at the first step.

    Raises:
        UserError: a bad group or scale, or ``lr_range`` together with ``layer_decay`` (both
            spread the LR over depth, so together they would compound silently).
    """
    group_lr_scales(names, lr_mult, layer_decay)
    if lr_range is not None:
        lr_range_scales(len(names), *lr_range, base_lr=1.0)
        if layer_decay is not None:
            raise UserError(
                f"lr_range {list(lr_range)} and layer_decay {layer_decay} both spread the LR from stem to head; "
                "together they would multiply",
                "use one of them (lr_range: [low, high] sets the stem and head LRs directly)",
            )
        if lr_mult:
            warnings.warn(
                f"lit-ft: lr_mult {dict(lr_mult)} multiplies the LRs that lr_range {list(lr_range)} spreads; "
                "the named groups end outside [low, high]",
                stacklevel=2,
            )


class WarmupCosineLR(LambdaLR):
    """Linear warm-up then cosine decay, per group from its own initial lr.

    Args:
        optimizer: the optimizer.
        warmup_steps: scheduler steps of linear warm-up from ``warmup_start_ratio``.
        total_steps: scheduler steps in all; ``None`` lets lit-ft fill in the run's length
            (``trainer.estimated_stepping_batches`` or ``max_epochs``).
        min_lr_ratio: final lr as a fraction of each group's initial lr.
        warmup_start_ratio: first lr of the warm-up as a fraction of the initial lr.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 0,
        total_steps: Optional[int] = None,
        min_lr_ratio: float = 0.0,
        warmup_start_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.warmup_start_ratio = warmup_start_ratio
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start_ratio + (1 - self.warmup_start_ratio) * step / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def state_dict(self) -> dict:
        # LambdaLR would try to pickle the bound method; our lambda is our own config.
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)


class SequentialLR(torch_schedulers.SequentialLR):
    """torch's ``SequentialLR``, configurable from YAML: each scheduler is given as a
    ``class_path`` + ``init_args`` (built on this optimizer), e.g. a linear warm-up then cosine::

        lr_scheduler:
          class_path: lit_ft.optim.SequentialLR
          init_args:
            schedulers:
              - {class_path: torch.optim.lr_scheduler.LinearLR, init_args: {start_factor: 0.1, total_iters: 100}}
              - {class_path: torch.optim.lr_scheduler.CosineAnnealingLR, init_args: {T_max: 900}}
            milestones: [100]

    (torch's own class takes scheduler *instances*, which a config file cannot create.)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedulers: list[LRSchedulerCallable], milestones: list[int], last_epoch: int = -1) -> None:
        built = []
        for factory in schedulers:
            # Each child must start from the group's initial LR, not from where the last one left it.
            for g in optimizer.param_groups:
                g["lr"] = g.get("initial_lr", g["lr"])
            built.append(factory(optimizer))
        for g in optimizer.param_groups:
            g["lr"] = g.get("initial_lr", g["lr"])
        super().__init__(optimizer, built, milestones, last_epoch=last_epoch)


class ChainedScheduler(torch_schedulers.ChainedScheduler):
    """torch's ``ChainedScheduler`` (every scheduler stepped each time, their factors
    multiplied), configurable from YAML like :class:`SequentialLR`."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedulers: list[LRSchedulerCallable]) -> None:
        super().__init__([factory(optimizer) for factory in schedulers], optimizer=optimizer)
