"""The trial side of a sweep: a ``lit-ft fit`` that reports to its Optuna study and can be pruned.

:mod:`lit_ft.sweep` starts every trial as a ``lit-ft fit`` subprocess with this callback
added (``--trainer.callbacks+=...``). After every validation, global rank 0 writes the
monitored metric to the shared study storage as the trial's intermediate value for that epoch
and asks the study's pruner (built here from its name and arguments, exactly as the sweep built
it) whether to stop. The decision is broadcast, so every DDP rank stops at the same epoch, and
the sampled parameters came from the sweep on the command line, so every rank trains the same
trial (the failure mode of optuna#4835 / optuna-integration#59, where each rank samples its own).

Rank 0 also records the outcome in the storage as trial user attributes (``lit_ft:outcome``:
``pruned``/``complete``, ``lit_ft:epochs``), so a sweep that was killed after its trial ended
can still close the trial correctly when it is restarted. The sweep process owns the trial's
state (COMPLETE / PRUNED / FAIL): this callback never sets it.

A trial stops (through :class:`~lit_ft.callbacks.interrupt.GracefulInterrupt`'s SIGTERM path:
a resumable ``last.ckpt``, exit 143) when the sweep process that started it is gone, so a
killed sweep leaves no orphan training in a directory its restart will resume.

Only public Optuna API: ``optuna.load_study``, the storage's ``set_trial_intermediate_value`` /
``set_trial_user_attr`` / ``get_trial``, and ``BasePruner.prune``.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lit_ft.errors import UserError

# Pruner names a sweep accepts, besides any class name in optuna.pruners.
PRUNERS = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "threshold": "ThresholdPruner",
    "patient": "PatientPruner",
    "wilcoxon": "WilcoxonPruner",
}


def open_storage(url: str) -> Any:
    """An Optuna storage from a URL: an RDB URL (``sqlite:///x.db``, ``postgresql://...``) or
    a path to a journal file (``.../study.journal``; Optuna's JournalFileBackend, which locks
    the file and so also serves several machines over a shared filesystem)."""
    import optuna

    if "://" in url:
        return optuna.storages.RDBStorage(url)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(url))


def make_pruner(name: str, args: Optional[dict[str, Any]] = None) -> Any:
    """``median`` / ``hyperband`` / ... or an ``optuna.pruners`` class name, with its arguments.

    Raises:
        UserError: an unknown pruner or arguments it does not take.
    """
    import optuna

    cls_name = PRUNERS.get(name, name)
    cls = getattr(optuna.pruners, cls_name, None)
    if not isinstance(cls, type) or not issubclass(cls, optuna.pruners.BasePruner):
        raise UserError(f"unknown pruner {name!r}", f"use one of {', '.join(PRUNERS)} or a class name in optuna.pruners")
    try:
        return cls(**(args or {}))
    except TypeError as err:
        raise UserError(f"pruner {cls_name}: {err}", "check --pruner_args (a YAML mapping of its arguments)") from err


class OptunaTrial(Callback):
    """Report ``monitor`` to trial ``trial`` of study ``study`` after every validation; stop when pruned.

    Args:
        storage: the study's storage URL or journal file (see :func:`open_storage`).
        study: the study name.
        trial: the trial number.
        monitor: the metric reported (logged by the model, e.g. ``val/acc``).
        pruner: the pruner's name or ``optuna.pruners`` class name.
        pruner_args: the pruner's arguments.
        parent_pid: the sweep process; when it is gone the trial saves and stops.
    """

    def __init__(
        self,
        storage: str,
        study: str,
        trial: int,
        monitor: str = "val/acc",
        pruner: str = "median",
        pruner_args: Optional[dict[str, Any]] = None,
        parent_pid: Optional[int] = None,
    ) -> None:
        self.storage_url, self.study_name, self.trial, self.monitor = storage, study, trial, monitor
        self.pruner_name, self.pruner_args, self.parent_pid = pruner, dict(pruner_args or {}), parent_pid
        self._storage: Any = None
        self._study: Any = None
        self._trial_id: Optional[int] = None
        self.pruned_at: Optional[int] = None

    # ------------------------------------------------------------------ storage (rank 0 only)
    def _connect(self) -> None:
        if self._storage is not None:
            return
        import optuna

        self._storage = open_storage(self.storage_url)
        self._study = optuna.load_study(study_name=self.study_name, storage=self._storage,
                                        pruner=make_pruner(self.pruner_name, self.pruner_args))
        study_id = self._storage.get_study_id_from_name(self.study_name)
        self._trial_id = self._storage.get_trial_id_from_study_id_trial_number(study_id, self.trial)

    def report(self, epoch: int, value: float) -> tuple[bool, str]:
        """Write the epoch's value to the study and ask the pruner: (prune?, why). Rank 0 only."""
        from optuna.exceptions import UpdateFinishedTrialError

        self._connect()
        try:
            self._storage.set_trial_intermediate_value(self._trial_id, epoch, value)
        except UpdateFinishedTrialError:
            return True, "the sweep already closed this trial"
        frozen = self._storage.get_trial(self._trial_id)
        if self._study.pruner.prune(self._study, frozen):
            return True, f"pruned by {type(self._study.pruner).__name__}"
        return False, ""

    def _set_attr(self, key: str, value: Any) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        self._connect()
        try:
            self._storage.set_trial_user_attr(self._trial_id, key, value)
        except UpdateFinishedTrialError:
            pass  # the sweep closed the trial already (e.g. recovered it after a crash)

    # ------------------------------------------------------------------ hooks
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        epoch = trainer.current_epoch
        decision = None
        if trainer.is_global_zero:
            if self.monitor not in trainer.callback_metrics:
                raise UserError(
                    f"the sweep's metric {self.monitor!r} was not logged (logged: {sorted(trainer.callback_metrics)})",
                    "give the sweep --metric with one of them, or give the data a validation split",
                )
            value = float(trainer.callback_metrics[self.monitor])
            prune, why = self.report(epoch, value)
            decision = {"prune": prune, "why": why, "value": value}
            verdict = f"; {why}, stopping" if prune else ""
            print(f"lit-ft trial {self.trial}: epoch {epoch} {self.monitor}={value:.4f} reported (rank 0){verdict}", flush=True)
        decision = trainer.strategy.broadcast(decision, src=0)  # every rank stops together
        if decision["prune"]:
            if not trainer.is_global_zero:
                print(f"lit-ft trial {self.trial}: rank {trainer.global_rank} stops with rank 0 at epoch {epoch}", flush=True)
            self.pruned_at = epoch
            trainer.should_stop = True
            if trainer.is_global_zero:
                self._set_attr("lit_ft:outcome", "pruned")
                self._set_attr("lit_ft:pruned", f"{decision['why']} after epoch {epoch}: {self.monitor}={decision['value']:.4g}")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # The sweep that started this trial is gone (killed): save a resumable checkpoint and stop,
        # through the same SIGTERM path a `kill` takes.
        if self.parent_pid is not None and trainer.is_global_zero and os.getppid() != self.parent_pid:
            self.parent_pid = None
            # The sweep started the trial in its own process group: every DDP rank gets the signal.
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpgrp(), signal.SIGTERM)
            else:
                os.kill(os.getpid(), signal.SIGTERM)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.interrupted:
            return
        if self.pruned_at is None:
            self._set_attr("lit_ft:outcome", "complete")
        self._set_attr("lit_ft:epochs", int(trainer.current_epoch))

