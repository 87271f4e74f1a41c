"""Layer groups -> named, scaled optimizer param groups (pure functions), and schedulers.

One param group per (layer group x decay/no-decay), built once. A group's learning-rate
scale is folded into its starting ``lr`` right after the optimizer is created, so every
torch scheduler keeps the ratios between groups: schedulers scale each group from its own
``initial_lr``. (timm's ``lr_scale`` key is read only by timm's schedulers; we do not rely
on it.) The two schedulers that overwrite every group's lr with one value (OneCycleLR and
CyclicLR given a scalar) are rescaled per group; any other scheduler that breaks the
ratios is refused with a clear message.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim.lr_scheduler import CyclicLR, LambdaLR, OneCycleLR

from lit_ft.backbones import LayerGroup, named_parameters, resolve_group
from lit_ft.errors import UserError

NO_DECAY_SUFFIX = "/no_decay"


def is_no_decay(name: str, shape: Sequence[int]) -> bool:
    """Biases, norm weights, and other 1-d parameters (plus tokens/embeddings) skip weight decay.

    Decided from the parameter's shape as built (``LayerGroup.shapes``), not its live one: under
    FSDP every parameter outside the forward pass is a flat 1-d shard.
    """
    leaf = name.rsplit(".", 1)[-1]
    return len(shape) <= 1 or leaf in {"cls_token", "pos_embed", "dist_token", "reg_token"}


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
    no_decay: Callable[[str, Sequence[int]], bool] = is_no_decay,
) -> list[dict]:
    """One optimizer param group per (layer group x decay/no-decay), each named and scaled.

    Each dict has ``params``, ``name``, ``layer_group`` (index), ``lr_scale``; no-decay groups
    also carry ``weight_decay=0``. Empty groups are left out. Every trainable-or-not
    parameter of ``model`` lands in exactly one group (asserted): freezing later only
    toggles ``requires_grad``; groups are never added mid-run.
    """
    # Names as the groups know them, also when FSDP or activation checkpointing wrapped blocks.
    params = named_parameters(model)
    out: list[dict] = []
    for i, (group, scale) in enumerate(zip(groups, scales, strict=True)):
        shape = lambda n: group.shapes.get(n, params[n].shape)  # noqa: E731  (as built: see is_no_decay)
        decay = [params[n] for n in group.param_names if not (split_no_decay and no_decay(n, shape(n)))]
        plain = [params[n] for n in group.param_names if split_no_decay and no_decay(n, shape(n))]
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


def check_scheduler_ratios(scheduler: object, optimizer: torch.optim.Optimizer) -> None:
    """Make sure ``scheduler`` kept the per-group lr ratios; repair the schedulers known to flatten them.

    Raises:
        UserError: a scheduler that set one lr for all groups and that we cannot repair.
    """
    groups = optimizer.param_groups
    scales = [g.get("lr_scale", 1.0) for g in groups]
    if len(set(scales)) <= 1:
        return
    if isinstance(scheduler, OneCycleLR):
        # OneCycleLR stores per-group initial/max/min lr; a scalar max_lr made them equal.
        maxes = [g["max_lr"] for g in groups]
        if _ratios_ok(maxes, scales):
            return
        for g, s in zip(groups, scales):
            for key in ("initial_lr", "max_lr", "min_lr", "lr"):
                g[key] *= s
        return
    if isinstance(scheduler, CyclicLR):
        if _ratios_ok(scheduler.max_lrs, scales):
            return
        scheduler.base_lrs = [b * s for b, s in zip(scheduler.base_lrs, scales)]
        scheduler.max_lrs = [m * s for m, s in zip(scheduler.max_lrs, scales)]
        for g, b in zip(groups, scheduler.base_lrs):
            g["lr"] = b
        return
    lrs = [g["lr"] for g in groups]
    if all(lr == 0 for lr in lrs):  # warmup from zero: compare where the schedule starts from
        lrs = [g.get("initial_lr", 0.0) for g in groups]
    if not _ratios_ok(lrs, scales):
        raise UserError(
            f"{type(scheduler).__name__} set the same learning rate on every param group, "
            "which would silently undo the per-group lr multipliers",
            "pass per-group values to the scheduler, or use a scheduler that scales from each group's "
            "initial lr (CosineAnnealingLR, LambdaLR, lit_ft.optim.WarmupCosineLR, ...)",
        )


def _ratios_ok(values: Sequence[float], scales: Sequence[float], rtol: float = 1e-6) -> bool:
    if any(v == 0 for v in values):
        return all(v == 0 for v in values)
    base = values[0] / scales[0]
    return all(math.isclose(v / s, base, rel_tol=rtol) for v, s in zip(values, scales))


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
