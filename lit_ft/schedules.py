"""Freeze/unfreeze plans as pure functions of (epoch, step).

A plan says which layer groups train at a given epoch and optimizer step. Nothing is
remembered between calls: the trainer re-applies the plan at every epoch/step start, so a
resumed run is in the right state by construction.

Layer groups are ordered stem ... head (see :func:`lit_ft.backbones.layer_groups`); group
references in configs are names (``blocks.3``, ``head``) or indices (``-1`` = head).

Pick one in YAML under ``model.init_args.freeze``::

    freeze:
      class_path: lit_ft.schedules.Gradual
      init_args: {every: 1, unit: epoch}
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from lit_ft.backbones import resolve_group
from lit_ft.errors import UserError

GroupRef = Union[str, int]
Unit = Literal["epoch", "step"]


class FreezeSchedule:
    """Base class: everything trains (see :class:`Full`).

    Args:
        train_bn: if False (default), BatchNorm layers of frozen groups stay in eval mode, so
            their running statistics and affine parameters do not change. If True they keep
            training (statistics and affine parameters) while the rest of the group is frozen.
        unfreeze_warmup_steps: a group unfrozen after the first step ramps its learning rate
            linearly from 0 to its scheduled value over this many optimizer steps.
        freeze_bn_stats: keep every BatchNorm layer in eval mode, trainable groups included: the
            pretrained running statistics are used and kept, while trainable BN affine parameters
            still learn. Avoids the jump in features when a group unfreezes and its BN layers
            switch to batch statistics (recommended for small data; Keras's fine-tuning advice).
    """

    def __init__(self, train_bn: bool = False, unfreeze_warmup_steps: int = 0, freeze_bn_stats: bool = False) -> None:
        if unfreeze_warmup_steps < 0:
            raise UserError(f"unfreeze_warmup_steps must be >= 0, got {unfreeze_warmup_steps}")
        self.train_bn = train_bn
        self.unfreeze_warmup_steps = unfreeze_warmup_steps
        self.freeze_bn_stats = freeze_bn_stats
        self.num_groups = 0

    # -- binding to a model's groups -----------------------------------------------------
    def bind(self, group_names: list[str]) -> "FreezeSchedule":
        """Resolve group references against the model's layer-group names (validates them)."""
        self.num_groups = len(group_names)
        self.group_names = list(group_names)
        self._resolve()
        return self

    def _resolve(self) -> None:
        """Subclasses resolve their group references here."""

    @property
    def head(self) -> int:
        return self.num_groups - 1

    def _top(self, k: int) -> frozenset[int]:
        k = max(0, min(k, self.num_groups))
        return frozenset(range(self.num_groups - k, self.num_groups))

    def _all(self) -> frozenset[int]:
        return frozenset(range(self.num_groups))

    # -- the plan ----------------------------------------------------------------------------
    def trainable(self, epoch: int, step: int) -> frozenset[int]:
        """Indices of the layer groups that train at ``epoch`` / global optimizer ``step``."""
        return self._all()

    def events(self) -> list[tuple[Unit, int]]:
        """Times (unit, value) at which the trainable set may change, including 0."""
        return [("epoch", 0)]

    def unfreeze_step(self, group: int, steps_per_epoch: int) -> Optional[int]:
        """Global optimizer step at which ``group`` first trains (0 = from the start, None = never)."""
        times = sorted(
            (t * steps_per_epoch, t) if unit == "epoch" else (t, t // max(1, steps_per_epoch)) for unit, t in self.events()
        )
        for step, epoch in times:
            if group in self.trainable(epoch, step):
                return step
        return None

    def ever_trainable(self) -> frozenset[int]:
        # Each plan reads either the epoch or the step, so (t, t) evaluates an event at time t.
        return frozenset().union(*(self.trainable(t, t) for _, t in self.events()))

    def describe(self, group: int) -> str:
        """When ``group`` starts training, for the plan table."""
        for unit, t in sorted(self.events(), key=lambda e: e[1]):
            if group in self.trainable(t, t):
                return "start" if t == 0 else f"{unit} {t}"
        return "never"

    restart_schedule_at_epoch: Optional[int] = None
    """lp_ft: the epoch at which the LR schedule starts afresh."""

    def __repr__(self) -> str:
        args = {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("num_groups", "group_names")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


class Full(FreezeSchedule):
    """Nothing frozen: plain full fine-tuning."""


class LinearProbe(FreezeSchedule):
    """Only the head trains; the backbone is frozen throughout."""

    def trainable(self, epoch: int, step: int) -> frozenset[int]:
        return frozenset({self.head})


class FreezeUnfreeze(FreezeSchedule):
    """Head only for ``epochs`` epochs, then everything.

    Args:
        epochs: epochs of head-only training before the whole network unfreezes.
    """

    def __init__(self, epochs: int = 1, train_bn: bool = False, unfreeze_warmup_steps: int = 0, freeze_bn_stats: bool = False) -> None:
        super().__init__(train_bn, unfreeze_warmup_steps, freeze_bn_stats)
        if epochs < 0:
            raise UserError(f"FreezeUnfreeze.epochs must be >= 0, got {epochs}")
        self.epochs = epochs

    def trainable(self, epoch: int, step: int) -> frozenset[int]:
        return self._all() if epoch >= self.epochs else frozenset({self.head})

    def events(self) -> list[tuple[Unit, int]]:
        return [("epoch", 0), ("epoch", self.epochs)]


class LPFT(FreezeUnfreeze):
    """LP-FT (Kumar et al. 2022): linear probe for ``lp_epochs``, then fine-tune everything
    with the learning-rate schedule started afresh.

    Args:
        lp_epochs: epochs of linear probing (head only).
    """

    def __init__(self, lp_epochs: int = 1, train_bn: bool = False, unfreeze_warmup_steps: int = 0, freeze_bn_stats: bool = False) -> None:
        super().__init__(lp_epochs, train_bn, unfreeze_warmup_steps, freeze_bn_stats)
        self.lp_epochs = lp_epochs

    @property
    def restart_schedule_at_epoch(self) -> Optional[int]:  # type: ignore[override]
        return self.lp_epochs if self.lp_epochs > 0 else None

    def __repr__(self) -> str:
        return (
            f"LPFT(lp_epochs={self.lp_epochs}, train_bn={self.train_bn}, "
            f"unfreeze_warmup_steps={self.unfreeze_warmup_steps}, freeze_bn_stats={self.freeze_bn_stats})"
        )


class Gradual(FreezeSchedule):
    """Gradual unfreezing (ULMFiT): one more group from the top every ``every`` epochs or steps.

    Args:
        every: epochs (or steps) between unfreezing two consecutive groups.
        unit: ``epoch`` or ``step``.
        start: number of top groups trainable at the start (1 = head only).
    """

    def __init__(
        self, every: int = 1, unit: Unit = "epoch", start: int = 1, train_bn: bool = False, unfreeze_warmup_steps: int = 0, freeze_bn_stats: bool = False
    ) -> None:
        super().__init__(train_bn, unfreeze_warmup_steps, freeze_bn_stats)
        if every < 1:
            raise UserError(f"Gradual.every must be >= 1, got {every}")
        if start < 1:
            raise UserError(f"Gradual.start must be >= 1 (the head), got {start}")
        self.every, self.unit, self.start = every, unit, start

    def trainable(self, epoch: int, step: int) -> frozenset[int]:
        t = epoch if self.unit == "epoch" else step
        return self._top(self.start + t // self.every)

    def events(self) -> list[tuple[Unit, int]]:
        n = max(0, self.num_groups - self.start)
        return [(self.unit, i * self.every) for i in range(n + 1)]


class Milestones(FreezeSchedule):
    """Explicit plan: at each listed epoch, the listed groups start training (cumulative).

    Args:
        milestones: ``{epoch: [group, ...]}``; groups by name or index (``-1`` = head).
        initial: groups trainable from epoch 0 (default: the head).
    """

    def __init__(
        self,
        milestones: dict[int, list[GroupRef]],
        initial: Optional[list[GroupRef]] = None,
        train_bn: bool = False,
        unfreeze_warmup_steps: int = 0,
        freeze_bn_stats: bool = False,
    ) -> None:
        super().__init__(train_bn, unfreeze_warmup_steps, freeze_bn_stats)
        self.milestones = {int(k): list(v) for k, v in milestones.items()}
        if any(k < 0 for k in self.milestones):
            raise UserError(f"milestone epochs must be >= 0, got {sorted(self.milestones)}")
        self.initial = list(initial) if initial is not None else [-1]

    def _resolve(self) -> None:
        self._initial = frozenset(resolve_group(r, self.group_names) for r in self.initial)
        self._at = {e: frozenset(resolve_group(r, self.group_names) for r in refs) for e, refs in self.milestones.items()}

    def trainable(self, epoch: int, step: int) -> frozenset[int]:
        out = set(self._initial)
        for e, groups in self._at.items():
            if epoch >= e:
                out |= groups
        return frozenset(out)

    def events(self) -> list[tuple[Unit, int]]:
        return [("epoch", 0)] + [("epoch", e) for e in sorted(self.milestones)]


class Surgical(FreezeSchedule):
    """Surgical fine-tuning (Lee et al. 2023): only the named groups ever train.

    Args:
        groups: layer groups to train, by name or index.
        include_head: also train the (new) head; almost always what you want.
    """

    def __init__(
        self, groups: list[GroupRef], include_head: bool = True, train_bn: bool = False, unfreeze_warmup_steps: int = 0, freeze_bn_stats: bool = False
    ) -> None:
        super().__init__(train_bn, unfreeze_warmup_steps, freeze_bn_stats)
        if not groups and not include_head:
            raise UserError("Surgical trains nothing: groups is empty and include_head is false", "name a group")
        self.groups = list(groups)
        self.include_head = include_head

    def _resolve(self) -> None:
        chosen = {resolve_group(r, self.group_names) for r in self.groups}
        if self.include_head:
            chosen.add(self.head)
        self._chosen = frozenset(chosen)

    def trainable(self, epoch: int, step: int) -> frozenset[int]:
        return self._chosen


def warmup_factor(schedule: FreezeSchedule, group: int, step: int, steps_per_epoch: int) -> float:
    """LR factor for ``group`` at optimizer ``step``: ramps 0 -> 1 after a mid-run unfreeze."""
    w = schedule.unfreeze_warmup_steps
    if w <= 0:
        return 1.0
    start = schedule.unfreeze_step(group, steps_per_epoch)
    if not start or step < start:  # never trains, trains from the start (the scheduler's warm-up
        return 1.0  # applies), or not unfrozen yet (no gradient, so the factor is moot)
    return min(1.0, (step - start + 1) / w)
