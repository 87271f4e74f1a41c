"""The learning-rate schedule of a run: the user's torch scheduler x the freeze plan's factors.

Owns :class:`PlannedLR`, the one scheduler Lightning sees, and the checks that make "any
torch scheduler keeps the per-group ratios" true for a whole run rather than at step 0.
It must not touch parameters, ``requires_grad`` or module modes (that is the freeze plan's
job, :mod:`lit_ft.plan`), and it never adds or removes param groups.

Why a wrapper instead of handing the user's scheduler to Lightning directly:

- **Length.** Auto-length schedules (``WarmupCosineLR`` / ``OneCycleLR`` without
  ``total_steps``) need the run's length, which is only known once the training data is set
  up. Asking for it earlier (``trainer.estimated_stepping_batches`` in
  ``configure_optimizers``) builds the train loader before Lightning restores a checkpoint's
  loader position, so a mid-epoch resume replays the epoch's first batches. The inner
  scheduler is therefore built in :meth:`PlannedLR.bind`, called at ``on_train_start``.
- **Whole-run checks.** :func:`check_over_run` steps a copy of the schedule through the whole
  run on a stand-in optimizer before training starts: a scheduler that flattens the per-group
  ratios at any step (a scalar ``eta_min``/``min_lr`` floor, a scalar ``max_lr``), runs out
  before the run ends (LR 0, or OneCycleLR's "tried to step" error), or needs a length it
  was not given is refused up front with a message, never discovered hours in.
- **Restarts and extensions.** LP-FT restarts the schedule when fine-tuning starts; a run
  resumed with more epochs re-plans an auto-length schedule over the new length (with a
  warning that says what happens to the LR). Both rebuild the inner scheduler from the
  user's factory, so every scheduler restarts correctly, not only ``WarmupCosineLR``.
- **Per-group factors.** The freeze plan's unfreeze warm-up multiplies a group's scheduled
  LR; it is folded into ``param_group["lr"]`` here, so the optimizer, the LR monitor and
  the checkpoint all see the LR that is really used (no mutation around ``optimizer.step``).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, CyclicLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from lightning.pytorch.utilities import rank_zero_warn

from lit_ft.errors import UserError
from lit_ft.optim import WarmupCosineLR

log = logging.getLogger(__name__)

SchedulerFactory = Callable[[Optimizer], Any]
# Schedulers whose length lit-ft fills in when it is not given: class -> keyword.
AUTO_LENGTH = {WarmupCosineLR: "total_steps", OneCycleLR: "total_steps"}
# Beyond this many scheduler steps the whole-run check samples instead of stepping every one.
_MAX_CHECK_STEPS = 200_000


def scheduler_class(factory: Any) -> Optional[type]:
    """The scheduler class a factory builds, if it can be told without calling it.

    jsonargparse turns ``class_path`` + ``init_args`` into a ``functools.partial`` whose
    arguments include the class; a plain class also counts. Lambdas are opaque (None).
    """
    if isinstance(factory, type):
        return factory
    if isinstance(factory, functools.partial):
        for arg in (factory.func, *factory.args):
            if isinstance(arg, type) and issubclass(arg, LRScheduler):
                return arg
    return None


def length_keyword(factory: Any) -> Optional[str]:
    """The keyword lit-ft fills in with the run's length for this factory, or None.

    Only for a known auto-length class whose length the user left unset (for OneCycleLR,
    also without ``epochs``/``steps_per_epoch``, its other way of giving a length).
    """
    cls = scheduler_class(factory)
    key = next((k for c, k in AUTO_LENGTH.items() if cls is not None and issubclass(cls, c)), None)
    if key is None:
        return None
    given = factory.keywords if isinstance(factory, functools.partial) else {}
    if given.get(key) is not None or given.get("epochs") is not None:
        return None
    return key


def build_scheduler(factory: SchedulerFactory, optimizer: Optimizer, length: Optional[int]) -> Any:
    """Call ``factory(optimizer)``, filling in the run ``length`` where lit-ft owns it, and
    repair the schedulers that would flatten the per-group ratios (see :func:`repair_ratios`).

    Raises:
        UserError: the scheduler needs a length and the run has none, or its arguments are wrong.
    """
    key = length_keyword(factory)
    kwargs = {}
    if key is not None:
        if length is None:
            raise UserError(
                f"{scheduler_class(factory).__name__} needs the run's length, but the run has none "
                "(trainer.max_epochs and trainer.max_steps are unset or -1)",
                f"set trainer.max_epochs (or max_steps), or give the scheduler {key} explicitly",
            )
        kwargs[key] = int(length)
    try:
        scheduler = factory(optimizer, **kwargs)
    except (ValueError, TypeError) as err:
        name = getattr(scheduler_class(factory), "__name__", "the LR scheduler")
        hint = "check its init_args"
        if "total_steps" in str(err) or "epochs" in str(err):
            hint = (
                "in YAML leave total_steps unset and lit-ft fills in the run's length; from Python pass "
                "total_steps=trainer.estimated_stepping_batches"
            )
        raise UserError(f"cannot build {name}: {str(err).splitlines()[0]}", hint) from err
    if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
        # A Python lambda cannot take the length as a keyword: WarmupCosineLR takes it as an attribute.
        if length is None:
            raise UserError(
                "WarmupCosineLR needs the run's length, but trainer.max_epochs and max_steps are unset or -1",
                "set trainer.max_epochs (or max_steps), or WarmupCosineLR's total_steps",
            )
        scheduler.total_steps = int(length)
        scheduler.auto_total = True
    elif key is not None and isinstance(scheduler, WarmupCosineLR):
        scheduler.auto_total = True
    repair_ratios(scheduler, optimizer)
    return scheduler


def is_auto_length(factory: SchedulerFactory, scheduler: Any) -> bool:
    """True if lit-ft chose this scheduler's length (so it may re-plan it)."""
    return length_keyword(factory) is not None or bool(getattr(scheduler, "auto_total", False))


def repair_ratios(scheduler: Any, optimizer: Optimizer) -> None:
    """Give per-group values to schedulers that were given one value for every group.

    Each param group carries its LR scale (``lr_scale``); a scalar that means "the LR" for
    the base group is scaled per group, as the ratios require: OneCycleLR's ``max_lr``
    (and the initial/final LRs derived from it), CyclicLR's ``base_lr``/``max_lr``,
    ReduceLROnPlateau's ``min_lr`` floor.

    Raises:
        UserError: a scalar floor that cannot be given per group (CosineAnnealingLR's ``eta_min``).
    """
    groups = optimizer.param_groups
    scales = [g.get("lr_scale", 1.0) for g in groups]
    if len(set(scales)) <= 1:
        return
    if isinstance(scheduler, OneCycleLR):
        if not ratios_hold([g["max_lr"] for g in groups], scales):
            for g, s in zip(groups, scales):
                for key in ("initial_lr", "max_lr", "min_lr", "lr"):
                    g[key] *= s
    elif isinstance(scheduler, CyclicLR):
        if not ratios_hold(scheduler.max_lrs, scales):
            scheduler.base_lrs = [b * s for b, s in zip(scheduler.base_lrs, scales)]
            scheduler.max_lrs = [m * s for m, s in zip(scheduler.max_lrs, scales)]
            for g, b in zip(groups, scheduler.base_lrs):
                g["lr"] = b
                g["initial_lr"] = b  # what the plan table and a restart read as the group's LR
    elif isinstance(scheduler, ReduceLROnPlateau):
        if not ratios_hold(scheduler.min_lrs, scales):
            scheduler.min_lrs = [m * s for m, s in zip(scheduler.min_lrs, scales)]
    elif isinstance(scheduler, CosineAnnealingLR) and scheduler.eta_min > 0:
        raise UserError(
            f"CosineAnnealingLR(eta_min={scheduler.eta_min}) ends every param group at the same LR, "
            "which would undo the per-group LR multipliers at the end of the run",
            "use lit_ft.optim.WarmupCosineLR with min_lr_ratio (a floor relative to each group's LR), or eta_min: 0",
        )


def ratios_hold(values: Sequence[float], scales: Sequence[float], rtol: float = 1e-6) -> bool:
    """True if ``values`` are proportional to ``scales`` (all zero counts as proportional)."""
    if any(v == 0 for v in values):
        return all(v == 0 for v in values)
    base = values[0] / scales[0]
    return all(math.isclose(v / s, base, rel_tol=rtol) for v, s in zip(values, scales))


class _StandIn(Optimizer):
    """An optimizer that never updates anything: carries another optimizer's param-group
    settings and defaults (which schedulers read, e.g. ``betas`` for OneCycleLR's momentum)."""

    def step(self, closure: Any = None) -> None:
        return None


def _stand_in(optimizer: Optimizer) -> Optimizer:
    """A stand-in with the same param-group settings over tiny dummy parameters."""
    groups = [{**{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}, "params": [torch.zeros(1, requires_grad=True)]}
              for g in optimizer.param_groups]
    return _StandIn(groups, copy.deepcopy(optimizer.defaults))


def check_over_run(
    factory: SchedulerFactory,
    optimizer: Optimizer,
    length: Optional[int],
    restart_at: Optional[int] = None,
) -> None:
    """Step a copy of the schedule through the whole run and refuse it if it goes wrong.

    ``length`` is the run's scheduler steps (optimizer steps or epochs); ``restart_at`` the
    step at which the schedule restarts (LP-FT). ReduceLROnPlateau is fed a metric that
    never improves, so it reaches its floors. The real optimizer is not touched.

    Raises:
        UserError: the per-group LR ratios break at some step; the schedule fails, or every
            group's LR is 0, before the run ends.
    """
    if length is None or not math.isfinite(length):
        return  # an endless run: only the first steps are checked, by building the scheduler
    stand_in = _stand_in(optimizer)
    scales = [g.get("lr_scale", 1.0) for g in stand_in.param_groups]
    names = [g.get("name", str(i)) for i, g in enumerate(stand_in.param_groups)]
    every = max(1, int(length) // _MAX_CHECK_STEPS)
    last_positive = -1  # the last step with a non-zero LR (a warm-up may start at 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": nothing trains here
        scheduler = build_scheduler(factory, stand_in, int(length))
        for step in range(int(length)):
            if step == restart_at:
                for g in stand_in.param_groups:
                    g["lr"] = g["initial_lr"]
                scheduler = build_scheduler(factory, stand_in, int(length) - step)
            lrs = [float(g["lr"]) for g in stand_in.param_groups]
            if step % every == 0 and not ratios_hold(lrs, scales, rtol=1e-4):
                worst = min(range(len(lrs)), key=lambda i: lrs[i] / scales[i])
                raise UserError(
                    f"{type(scheduler).__name__} breaks the per-group LR ratios at step {step} of {int(length)} "
                    f"(group {names[worst]}: LR {lrs[worst]:.3g}, expected {lrs[0] / scales[0] * scales[worst]:.3g})",
                    "give the scheduler per-group values, or use one that scales each group from its own "
                    "initial LR (lit_ft.optim.WarmupCosineLR, LambdaLR, StepLR, CosineAnnealingLR with eta_min 0)",
                )
            if any(lr > 0 for lr in lrs):
                last_positive = step
            try:
                if isinstance(scheduler, ReduceLROnPlateau):
                    scheduler.step(1.0)
                else:
                    scheduler.step()
            except ValueError as err:  # e.g. OneCycleLR "Tried to step N times"
                raise UserError(
                    f"{type(scheduler).__name__} fails at step {step + 1} of a {int(length)}-step run: "
                    f"{str(err).splitlines()[0]}",
                    "leave the schedule's length unset so lit-ft fills in the run's length, or make it "
                    f"at least {int(length)} steps",
                ) from err
    if last_positive < int(length) - 1:
        raise UserError(
            f"{type(scheduler).__name__} reaches LR 0 at step {last_positive + 1} of a {int(length)}-step run "
            "and stays there: the remaining steps would train nothing",
            "leave the schedule's length unset so lit-ft fills in the run's length, or make it "
            f"at least {int(length)} steps",
        )


class PlannedLR(LRScheduler):
    """The scheduler Lightning steps: the user's scheduler (any torch scheduler, or none),
    restarted and re-planned as the run requires, times per-group factors from the plan.

    Build it in ``configure_optimizers``; call :meth:`bind` once the run's length is known
    (``on_train_start``) and :meth:`apply` whenever the factors may have changed. Its
    ``state_dict`` holds the inner scheduler's state and the clean (un-factored) LRs, so a
    resumed run continues exactly.

    Args:
        optimizer: the optimizer, its param groups already scaled (``lr_scale`` folded in).
        factory: the user's scheduler factory, or None for a constant LR.
        factors: ``factors(step) -> [factor per param group]`` (the plan's unfreeze warm-up).
        current_step: returns the global optimizer step (to apply factors after a step).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        factory: Optional[SchedulerFactory] = None,
        factors: Optional[Callable[[int], list[float]]] = None,
        current_step: Optional[Callable[[], int]] = None,
    ) -> None:
        # Deliberately not LRScheduler.__init__: it would step (and so set LRs) before the run's
        # length is known. The attributes Lightning and the LR monitor read are set here.
        self.optimizer = optimizer
        self.factory = factory
        self.factors = factors or (lambda step: [1.0] * len(optimizer.param_groups))
        self.current_step = current_step or (lambda: 0)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.clean = list(self.base_lrs)  # the user's schedule's LRs, before the plan's factors
        self.last_epoch = 0  # scheduler steps taken (optimizer steps or epochs, by interval)
        self._last_lr = list(self.clean)
        self.inner: Any = None
        self.length: Optional[int] = None  # the run's scheduler steps (None = endless)
        self.span: Optional[int] = None  # the length the inner scheduler was built for
        self.restarted_at: Optional[int] = None  # scheduler step of the LP-FT restart, once done
        self._pending: Optional[dict] = None  # state loaded before bind()

    # ------------------------------------------------------------------ lifecycle
    def bind(self, length: Optional[int], restart_at: Optional[int] = None) -> None:
        """Build the inner scheduler for a run of ``length`` scheduler steps (None = endless).

        Checks the whole run first (:func:`check_over_run`; ``restart_at`` is the planned
        LP-FT restart step). If a checkpoint's state was loaded, it is restored; an
        auto-length schedule planned for another length (the run was extended or shortened)
        is re-planned over the new one, with a warning.
        """
        pending, self._pending = self._pending, None
        self.length = length
        if pending is not None:
            self.clean = list(pending["clean"])
            self.last_epoch = int(pending["last_epoch"])
            self.restarted_at = pending["restarted_at"]
        if self.factory is None:
            self.apply()
            return
        check_over_run(self.factory, self.optimizer, length, restart_at)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*lr_scheduler.step.*before.*optimizer.step.*")
            self._set(self.base_lrs)
            if pending is None:
                self.span = length
                self.inner = build_scheduler(self.factory, self.optimizer, self.span)
            else:
                self.span = pending["span"]
                self.inner = build_scheduler(self.factory, self.optimizer, self.span)
                self.inner.load_state_dict(pending["inner"])
                self._set(self.clean)
                new_span = length if self.restarted_at is None or length is None else length - self.restarted_at
                if new_span != self.span and is_auto_length(self.factory, self.inner):
                    self._replan(new_span, pending["length"], length)
        self.clean = [g["lr"] for g in self.optimizer.param_groups]
        self.apply()

    def _replan(self, span: Optional[int], old: Optional[int], new: Optional[int]) -> None:
        """Rebuild an auto-length schedule for ``span`` steps and move it to where it was."""
        done = self.inner.last_epoch
        before = self.optimizer.param_groups[-1]["lr"]
        self._set(self.base_lrs)
        self.span = span
        self.inner = build_scheduler(self.factory, self.optimizer, span)
        self.inner.last_epoch = done - 1
        self.inner.step()  # closed-form schedules (WarmupCosineLR, OneCycleLR): the LR at step `done`
        after = self.optimizer.param_groups[-1]["lr"]
        rank_zero_warn(
            f"lit-ft: the run was planned for {old} scheduler steps and now has {new}: the "
            f"{type(self.inner).__name__} schedule is re-planned over the new length, so at step {done} the "
            f"last group's LR goes from {before:.3g} to {after:.3g}"
        )

    def restart(self) -> None:
        """Start the user's schedule afresh over the rest of the run (LP-FT's fine-tuning phase)."""
        self.restarted_at = self.last_epoch
        if self.factory is None:
            return
        self._set(self.base_lrs)
        self.span = None if self.length is None else max(1, self.length - self.last_epoch)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*lr_scheduler.step.*before.*optimizer.step.*")
            self.inner = build_scheduler(self.factory, self.optimizer, self.span)
        self.clean = [g["lr"] for g in self.optimizer.param_groups]
        self.apply()

    # ------------------------------------------------------------------ stepping
    def step(self, metrics: Any = None, epoch: Any = None) -> None:
        """One scheduler step: the user's scheduler on the clean LRs, then the plan's factors."""
        self.last_epoch += 1
        if self.inner is not None:
            self._set(self.clean)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*lr_scheduler.step.*before.*optimizer.step.*")
                if isinstance(self.inner, ReduceLROnPlateau):
                    self.inner.step(metrics)
                else:
                    self.inner.step()
            self.clean = [g["lr"] for g in self.optimizer.param_groups]
        self.apply()

    def apply(self, step: Optional[int] = None) -> None:
        """Set each group's LR to its clean LR x the plan's factor at ``step`` (default: now)."""
        factors = self.factors(self.current_step() if step is None else step)
        self._set([lr * f for lr, f in zip(self.clean, factors)])

    def _set(self, lrs: Sequence[float]) -> None:
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def get_lr(self) -> list[float]:
        return self.get_last_lr()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        if self.inner is None and self._pending is not None:
            return dict(self._pending)  # loaded but not bound yet (e.g. saved again before training)
        return {
            "inner": self.inner.state_dict() if self.inner is not None else None,
            "clean": list(self.clean),
            "length": self.length,
            "span": self.span,
            "last_epoch": self.last_epoch,
            "restarted_at": self.restarted_at,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if "clean" not in state_dict:
            raise UserError(
                "the checkpoint's LR scheduler state was not written by this version of lit-ft",
                "start a new run from its weights with --model.pretrained <checkpoint> instead of --ckpt_path",
            )
        self._pending = dict(state_dict)


def is_plateau(factory: Optional[SchedulerFactory], optimizer: Optimizer) -> bool:
    """True if ``factory`` builds a ReduceLROnPlateau (Lightning must then pass it a metric).

    A lambda factory is probed by building it once on a stand-in optimizer.
    """
    if factory is None:
        return False
    cls = scheduler_class(factory)
    if cls is not None:
        return issubclass(cls, ReduceLROnPlateau)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return isinstance(factory(_stand_in(optimizer)), ReduceLROnPlateau)
    except Exception:  # needs a length, say: not a plateau scheduler (those need none)
        return False
