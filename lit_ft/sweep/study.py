"""The Optuna study behind a sweep: sampler, opening/resuming it, the trial budget, and the
recovery of trials a killed sweep left behind.

Optuna does the sampling, pruning and storage; this module holds the few rules Optuna leaves to
its user, as functions of the study's trials:

* **Slots.** A sweep's logical trial is a *slot*: its run directory ``trial_<slot>`` and one
  row of the results. A trial interrupted by a killed sweep is closed as FAIL ("interrupted")
  and re-enqueued with the same parameters (``study.enqueue_trial``); the retry keeps the slot,
  so it resumes the same run directory from its ``last.ckpt`` and counts once in the budget.
* **Budget.** ``--trials N`` counts slots across every process of the study. Trial numbers
  are handed out atomically by the storage, so "trial n is within the budget iff fewer than N
  slots have numbers below n" gives the same answer in every process; a trial created past the
  budget by a race between workers is closed at once (FAIL, ``lit_ft:skipped``) and never run.
* **Stale trials.** Optuna's journal storage has no heartbeat (only ``RDBStorage`` has one,
  and only inside ``study.optimize``), and a RUNNING trial whose process died stays RUNNING
  forever (optuna#6283). Each sweep process stamps its running trials with its host, pid and a
  heartbeat; a RUNNING trial is stale when its process is gone (same host) or its heartbeat is
  older than ``grace`` seconds (another machine). Recovery closes it as its child recorded it
  (``lit_ft:outcome``: pruned/complete) or as interrupted, re-enqueued.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from typing import Any, Iterable, Optional

from lit_ft.errors import UserError
from lit_ft.sweep.space import SearchSpace

# Trial user attributes (visible in Optuna's dashboard and trials_dataframe()).
SLOT = "lit_ft:slot"
RETRY_OF = "lit_ft:retry_of"
HOST, PID, HEARTBEAT = "lit_ft:host", "lit_ft:pid", "lit_ft:heartbeat"
CHILD = "lit_ft:child_pid"  # the trial's `lit-ft fit` process (its process group)
THREADS = "lit_ft:threads"  # the trial's thread count (results are bit-exact only at the same count)
REASON = "lit_ft:reason"  # why a trial failed / was pruned / was interrupted
OUTCOME = "lit_ft:outcome"  # written by the trial itself: pruned / complete
EPOCHS = "lit_ft:epochs"
WALL = "lit_ft:wall_s"
SKIPPED = "lit_ft:skipped"
INTERRUPTED = "interrupted"
SAMPLERS = ("tpe", "random", "grid")


def make_sampler(name: str, args: Optional[dict], space: SearchSpace, seed: Optional[int], done: int) -> Any:
    """Optuna's sampler ``name`` with ``args``.

    With a ``seed``, a resumed TPE/random sweep reseeds with ``seed + 1000 * trials already in
    the study``: reusing the first run's seed would draw the start-up trials' random parameters
    again. The grid keeps its seed: it fixes the grid's order, and trial ``n`` takes point ``n``.
    """
    import optuna
    from optuna.exceptions import ExperimentalWarning

    if seed is not None and name != "grid":
        seed += 1000 * done
    args = dict(args or {})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            if name == "tpe":
                # group=True: a conditional space is split into the groups of keys sampled together.
                return optuna.samplers.TPESampler(**{"seed": seed, "group": space.has_conditions, **args})
            if name == "random":
                return optuna.samplers.RandomSampler(**{"seed": seed, **args})
            if name == "grid":
                return optuna.samplers.GridSampler(space.grid(), **{"seed": seed, **args})
    except TypeError as err:
        raise UserError(f"sampler {name}: {err}", "check --sampler_args (a YAML mapping of its arguments)") from err
    raise UserError(f"unknown sampler {name!r}", f"use one of {', '.join(SAMPLERS)}")


def open_study(storage: Any, name: str, direction: str, sampler: Any, pruner: Any) -> Any:
    """Create the study, or load it to continue (the same command run again).

    Raises:
        UserError: the stored study optimises the other direction.
    """
    import optuna

    study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler, pruner=pruner,
                                load_if_exists=True)
    stored = study.direction.name.lower()
    if stored != direction:
        raise UserError(f"sweep {name!r} was started to {stored} its metric, this command would {direction} it",
                        "keep --direction/--metric as they were, or start a new sweep with --name")
    return study


# ---------------------------------------------------------------------------- slots and budget
def slot_of(trial: Any) -> int:
    return int(trial.user_attrs.get(SLOT, trial.number))


def counted(trials: Iterable[Any]) -> list[Any]:
    """The trials that occupy budget (all but those closed as over-budget)."""
    return [t for t in trials if not t.user_attrs.get(SKIPPED)]


def slots_used(trials: Iterable[Any], before: Optional[int] = None) -> int:
    """Distinct slots among the counted trials (numbered below ``before``, if given)."""
    return len({slot_of(t) for t in counted(trials) if before is None or t.number < before})


def latest_per_slot(trials: Iterable[Any]) -> dict[int, Any]:
    """Each slot's latest attempt (its highest trial number): the slot's row in the results."""
    out: dict[int, Any] = {}
    for t in sorted(counted(trials), key=lambda t: t.number):
        out[slot_of(t)] = t
    return dict(sorted(out.items()))


def interrupted(trial: Any) -> bool:
    return str(trial.user_attrs.get(REASON, "")).startswith(INTERRUPTED)


# ---------------------------------------------------------------------------- stale trials
def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_orphan(trial: Any, wait_s: float = 120.0) -> None:
    """A trial process on this host that outlived its sweep (it stops itself within a batch once
    its parent is gone): make sure it has stopped, so its retry never shares the run directory
    with it."""
    import signal

    pid = trial.user_attrs.get(CHILD)
    if pid is None or trial.user_attrs.get(HOST) != socket.gethostname() or not process_alive(int(pid)):
        return
    try:
        os.killpg(int(pid), signal.SIGTERM)  # the trial runs in its own process group
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.time() + wait_s
    while process_alive(int(pid)) and time.time() < deadline:
        time.sleep(0.5)


def is_stale(trial: Any, now: float, grace: float, host: Optional[str] = None) -> bool:
    """A RUNNING trial nobody is running any more (see the module docstring)."""
    attrs = trial.user_attrs
    host = host or socket.gethostname()
    if attrs.get(HOST) == host and attrs.get(PID) is not None and not process_alive(int(attrs[PID])):
        return True
    beat = attrs.get(HEARTBEAT)
    if beat is None:  # asked but never stamped: judge by its start
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - started > grace
    return now - float(beat) > grace


class Trials:
    """The study and its storage together, for the per-trial writes Optuna's ``Study`` does not
    offer by trial number (a user attribute on a trial another process started): the storage's
    public ``get_trial_id_from_study_id_trial_number`` / ``set_trial_user_attr``."""

    def __init__(self, study: Any, storage: Any) -> None:
        self.study, self.storage = study, storage
        self.study_id = storage.get_study_id_from_name(study.study_name)

    def all(self, states: Optional[tuple] = None) -> list[Any]:
        return self.study.get_trials(deepcopy=False, states=states)

    def set_attr(self, number: int, key: str, value: Any) -> None:
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        self.storage.set_trial_user_attr(trial_id, key, value)

    def close_interrupted(self, trial: Any, why: str) -> Optional[str]:
        """Close a trial whose process is gone: as its child recorded it (``lit_ft:outcome``),
        else as FAIL "interrupted", re-enqueued with the same parameters in the same slot.

        Returns:
            the state it was closed as, or None if another process closed it first.
        """
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError

        states = optuna.trial.TrialState
        outcome = trial.user_attrs.get(OUTCOME)
        maximize = self.study.direction == optuna.study.StudyDirection.MAXIMIZE
        value = best_value(trial.intermediate_values, maximize)
        try:
            if outcome == "pruned":
                tell(self.study, trial.number, state=states.PRUNED)
                return "PRUNED"
            if outcome == "complete" and value is not None:
                tell(self.study, trial.number, value)
                return "COMPLETE"
            self.set_attr(trial.number, REASON, f"{INTERRUPTED}: {why}")
            tell(self.study, trial.number, state=states.FAIL)
        except (UpdateFinishedTrialError, ValueError):
            return None  # closed by another process meanwhile
        self.study.enqueue_trial(dict(trial.params), user_attrs={SLOT: slot_of(trial), RETRY_OF: trial.number})
        return "FAIL"

    def recover(self, grace: float) -> list[str]:
        """Close every stale RUNNING trial (:func:`is_stale`); one message per trial."""
        import optuna

        now, messages = time.time(), []
        for t in self.all((optuna.trial.TrialState.RUNNING,)):
            if not is_stale(t, now, grace):
                continue
            stop_orphan(t)
            state = self.close_interrupted(t, "its sweep process stopped")
            if state == "FAIL":
                messages.append(f"trial {t.number} (run dir trial_{slot_of(t)}) was left RUNNING by a sweep that "
                                "stopped: it will continue with the same parameters, from its last.ckpt")
            elif state is not None:
                messages.append(f"trial {t.number} had finished before its sweep stopped: closed as {state}")
        return messages


def tell(study: Any, trial: Any, value: Optional[float] = None, state: Any = None) -> None:
    """``study.tell``, tolerating the ``study.stop()`` that GridSampler calls once the grid is
    covered: outside ``study.optimize`` it raises after the trial's state was stored (Optuna 5.1).
    The sweep stops by its own budget instead."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def best_value(values: dict, maximize: bool) -> Optional[float]:
    """A trial's result: its best finite intermediate value (the best epoch), or None."""
    import math

    finite = [float(v) for v in values.values() if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if maximize else min(finite)
