"""``lit-ft sweep --config x.yaml --space space.yaml``: the sweep process.

Owns the order of things: check the space against the CLI's own parser (before any trial),
write the sweep's base config, open or resume the study, recover what a killed sweep left,
run ``--workers`` trials at a time until the budget is spent, and report. Sampling, pruning
and storage are Optuna's (:mod:`lit_ft.sweep.study`), a trial is a ``lit-ft fit`` subprocess
(:mod:`lit_ft.sweep.runner`, :mod:`lit_ft.callbacks.trial`), the files it writes are
:mod:`lit_ft.sweep.report`'s.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from argparse import ArgumentError
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

import yaml

from lit_ft.config_errors import explain_parse_error
from lit_ft.errors import UserError
from lit_ft.sweep import report as R
from lit_ft.sweep.runner import TrialProcess, core_share, failure_reason, trial_command, trial_env
from lit_ft.sweep.space import SearchSpace, override
from lit_ft.sweep.study import (
    CHILD, EPOCHS, HEARTBEAT, HOST, OUTCOME, PID, REASON, RETRY_OF, SKIPPED, SLOT, THREADS, WALL, Trials, best_value, latest_per_slot,
    make_sampler, open_study, slot_of, slots_used, tell,
)

if TYPE_CHECKING:
    from lit_ft.cli import LitFTCLI

HEARTBEAT_S = 30.0  # how often a sweep stamps its running trials
STALE_AFTER_S = 600.0  # a RUNNING trial of another machine with no heartbeat for this long is recovered
INTERRUPT_EXIT = (130, 143, -2, -15)  # a trial stopped by SIGINT/SIGTERM (GracefulInterrupt's 128 + signal)
_REPORTER = "lit_ft.callbacks.trial.OptunaTrial"


def sweep_command(
    cli: "LitFTCLI",
    space: Optional[str] = None,
    trials: Optional[int] = None,
    timeout: Optional[float] = None,
    workers: int = 1,
    sampler: Literal["tpe", "random", "grid"] = "tpe",
    sampler_args: Optional[dict[str, Any]] = None,
    pruner: str = "median",
    pruner_args: Optional[dict[str, Any]] = None,
    metric: Optional[str] = None,
    direction: Optional[Literal["maximize", "minimize"]] = None,
    name: Optional[str] = None,
    storage: Optional[str] = None,
    seed: Optional[int] = None,
    max_failures: int = 5,
    test_best: Optional[bool] = None,
    print_space: bool = False,
) -> None:
    """Search hyperparameters: Optuna samples any config keys; every trial is a `lit-ft fit` subprocess.

    Trials land in ``runs/<name>/trial_<n>/`` (config.yaml, checkpoints, TensorBoard); the
    sweep writes ``results.md``/``results.csv``, ``best.yaml`` (``lit-ft fit --config best.yaml``
    reproduces the best trial), ``hparams/`` (TensorBoard HPARAMS) and ``plots/`` beside them.
    Run the same command again to continue an interrupted or finished sweep; start it on
    several machines against one storage and they share the work.

    Args:
        space: YAML file of ``dotted.config.key: {type: float|int|categorical, ...}`` (see
            lit_ft/sweep/space.py); every key is checked against the config before any trial runs.
        trials: trials in all (across restarts and machines); default: the grid's size with
            ``--sampler grid``.
        timeout: stop starting trials after this many seconds (this process).
        workers: trials run at once on this machine, each pinned to its share of the CPU cores.
        sampler: Optuna sampler: ``tpe``, ``random`` or ``grid``.
        sampler_args: its arguments, e.g. ``{n_startup_trials: 6}``.
        pruner: ``median``, ``hyperband``, ``successive_halving``, ``percentile``, ``threshold``,
            ``none``, or an ``optuna.pruners`` class name; it judges the metric after every epoch.
        pruner_args: its arguments, e.g. ``{n_startup_trials: 4, n_warmup_steps: 1}``.
        metric: the validation metric to optimise; default: the checkpoint's monitor (val/acc).
        direction: ``maximize`` or ``minimize``; default: from the checkpoint's mode.
        name: the sweep (study) name and folder ``<save_dir>/<name>``; default: the space file's name.
        storage: an RDB URL (``sqlite:///sweep.db``, ``postgresql://...``) or a journal file;
            default: ``<sweep folder>/study.journal``.
        seed: sampler seed (a resumed sweep continues with a derived one).
        max_failures: stop when this many trials failed and none succeeded.
        test_best: test the best trial (chosen on validation) when the sweep ends; default: the
            config's ``test_after_fit``. Trials themselves never test.
        print_space: print the space and the budget, check the keys, and exit.
    """
    try:
        import optuna
    except ImportError:
        raise UserError("lit-ft sweep needs Optuna", "pip install 'lit-ft[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own progress lines
    if space is None:
        raise UserError("lit-ft sweep needs a search space", "pass --space space.yaml (see configs/sweeps/)")
    if workers < 1 or (trials is not None and trials < 1) or max_failures < 1:
        raise UserError("--workers, --trials and --max_failures must be at least 1")
    search = SearchSpace.load(space)
    base = base_config(cli)
    metric = metric or (base.get("checkpoint") or {}).get("monitor") or "val/acc"
    direction = direction or ("minimize" if (base.get("checkpoint") or {}).get("mode") == "min" else "maximize")
    logger = _logger_args(base)
    name = name or Path(space).stem
    save_dir = str(logger.get("save_dir") or "runs")
    sweep_dir = Path(save_dir) / name
    check_space(cli.parser, base, search, space)
    budget = trials if trials is not None else (search.grid_size() if sampler == "grid" else None)
    if budget is None and timeout is None:
        raise UserError("the sweep has no budget", "give --trials N and/or --timeout SECONDS")
    url = storage or str(sweep_dir / "study.journal")
    if print_space:
        print(describe(search, space, sampler, pruner, pruner_args, metric, direction, budget, timeout, workers, url, sweep_dir))
        return

    from lit_ft.callbacks.trial import make_pruner, open_storage

    sweep_dir.mkdir(parents=True, exist_ok=True)
    base_file = sweep_dir / "base.yaml"
    R.write_text(base_file, "# the config every trial of this sweep starts from (written by lit-ft sweep)\n"
                 + yaml.safe_dump(base, sort_keys=False))
    store = open_storage(url)
    pruner_obj = make_pruner(pruner, pruner_args)
    try:
        existing = len(optuna.load_study(study_name=name, storage=store).trials)
    except KeyError:
        existing = 0
    study = open_study(store, name, direction, make_sampler(sampler, sampler_args, search, seed, existing), pruner_obj)
    _note_changes(study, search, base)
    sweep = Sweep(
        trials=Trials(study, store), space=search, base_file=base_file, base=base, sweep_dir=sweep_dir, save_dir=save_dir,
        name=name, storage_url=url, metric=metric, maximize=direction == "maximize", pruner=pruner,
        pruner_args=pruner_args or {}, budget=budget, timeout=timeout, workers=workers, max_failures=max_failures,
    )
    print(f"lit-ft sweep {name}: {sampler} sampler, {type(pruner_obj).__name__}, {metric} ({direction}), "
          f"budget {budget if budget is not None else '-'} trials"
          + (f" / {timeout:g} s" if timeout else "") + f", {workers} worker(s); study in {url}; "
          f"{existing} trial(s) already in it", flush=True)
    sweep.run()
    best = sweep.report(final=True)
    if sweep.stopped_by is not None:
        raise SystemExit(128 + sweep.stopped_by)
    if sweep.error is not None:
        raise sweep.error
    if best is not None:
        trial = study.trials[best.number]
        write_best(cli.parser, base, search, trial.params, sweep_dir, best, metric, trial.user_attrs.get(THREADS))
        if test_best if test_best is not None else bool(base.get("test_after_fit")):
            sweep.test(best)


# ---------------------------------------------------------------------------- config
def base_config(cli: "LitFTCLI") -> dict[str, Any]:
    """The sweep's config as a plain mapping a ``lit-ft fit --config`` takes: the parsed config
    (every ``--config`` and command-line override of the sweep command, resolved), without the
    sweep's own options."""
    own = {p for p in inspect.signature(sweep_command).parameters if p != "cli"} | {"config", "ckpt_path"}
    data = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False)) or {}
    return {k: v for k, v in data.items() if k not in own}


def _logger_args(base: dict[str, Any]) -> dict[str, Any]:
    logger = (base.get("trainer") or {}).get("logger")
    if not isinstance(logger, dict) or "init_args" not in logger:
        raise UserError("a sweep needs the trainer's logger (its trials' run directories are <save_dir>/<sweep>/trial_<n>)",
                        "keep trainer.logger a TensorBoardLogger (the default), not false")
    return dict(logger["init_args"] or {})


def parse_words(parser: Any, base: dict[str, Any], words: list[str]) -> Any:
    """Parse ``words`` on top of ``base`` with the CLI's parser (as a trial's command line would be)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(base, f, sort_keys=False)
    try:
        return parser.parse_args(["--config", f.name, *words])
    finally:
        os.unlink(f.name)


def check_space(parser: Any, base: dict[str, Any], space: SearchSpace, source: str) -> None:
    """Every key of the space, with both ends of its range and every choice, must be a value the
    CLI accepts: one clear error (naming the closest valid key) before any trial runs.

    Raises:
        UserError: the first key or value the parser refuses.
    """
    for p in space.params:
        # A conditional key is checked with its condition in place (e.g. epochs of FreezeUnfreeze).
        context = [override(k, space.param(k).value(labels[0])) for k, labels in p.when.items()]
        for value in p.candidates():
            try:
                parse_words(parser, base, [*context, override(p.key, value)])
            except ArgumentError as err:
                problem = explain_parse_error(str(err), parser)
                hint = (problem.hint or "").replace("see `lit-ft <subcommand> --help` for every option", "").strip()
                raise UserError(f"search space {source}: key {p.key}: {problem.problem}",
                                (hint + " " if hint else "") + "keys are the config's dotted keys, as `lit-ft fit --help` lists them") from None


def write_best(parser: Any, base: dict[str, Any], space: SearchSpace, params: dict[str, Any], sweep_dir: Path,
               best: R.Row, metric: str, threads: Optional[int] = None) -> Path:
    """``best.yaml``: the complete config of the best trial (base + its values, resolved by the
    parser), with the run named after the file, so ``lit-ft fit --config best.yaml`` repeats it
    (bit for bit on the same machine at the trial's thread count, which the comment names)."""
    values = space.values(params)
    cfg = parser.dump(parse_words(parser, base, [override(k, v) for k, v in values.items()]), skip_none=False)
    data = {k: v for k, v in (yaml.safe_load(cfg) or {}).items() if k in base}
    init = data["trainer"]["logger"]["init_args"]
    init["name"], init["version"] = None, None  # runs/best/version_N
    lines = [f"# best trial {best.slot} of sweep {sweep_dir.name}: {metric}={best.value:.4f} "
             f"(selected on validation); its run: {sweep_dir / best.run_dir}",
             "# its values: " + ", ".join(f"{k}={v}" for k, v in params.items()),
             f"# reproduce: {f'OMP_NUM_THREADS={threads} ' if threads else ''}lit-ft fit --config {sweep_dir / 'best.yaml'}"
             + (" (the trial's thread count: float sums depend on it)" if threads else "")]
    path = sweep_dir / "best.yaml"
    R.write_text(path, "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def _note_changes(study: Any, space: SearchSpace, base: dict[str, Any]) -> None:
    """Remember the space and base config in the study; warn when a resumed sweep changes them."""
    stamp = {"lit_ft:space": {p.key: p.describe() for p in space.params}, "lit_ft:base": yaml.safe_dump(base, sort_keys=True)}
    for key, value in stamp.items():
        old = study.user_attrs.get(key)
        if old is not None and old != value:
            what = "search space" if key.endswith("space") else "config"
            print(f"lit-ft sweep: warning: the {what} differs from the one this sweep ran with so far; "
                  "earlier trials stay in the study (start a new sweep with --name to compare from scratch)", flush=True)
        study.set_user_attr(key, value)


def describe(space: SearchSpace, source: str, sampler: str, pruner: str, pruner_args: Any, metric: str, direction: str,
             budget: Optional[int], timeout: Optional[float], workers: int, url: str, sweep_dir: Path) -> str:
    lines = [f"search space {source} ({len(space.params)} keys):", space.describe()]
    if sampler == "grid":
        lines.append(f"grid: {space.grid_size()} points")
    lines.append(f"sampler {sampler}; pruner {pruner}{' ' + str(pruner_args) if pruner_args else ''}; "
                 f"{direction} {metric}")
    lines.append(f"budget: {budget if budget is not None else 'no limit on'} trials"
                 + (f", {timeout:g} s" if timeout else "") + f"; {workers} worker(s)")
    lines.append(f"trials in {sweep_dir}/trial_<n>; study in {url}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- running
class Sweep:
    """Runs trials on ``workers`` threads (each waits on one ``lit-ft fit`` subprocess) until the
    budget is spent, the timeout passes, too many trials failed, or a signal arrives."""

    def __init__(self, *, trials: Trials, space: SearchSpace, base_file: Path, base: dict[str, Any], sweep_dir: Path,
                 save_dir: str, name: str, storage_url: str, metric: str, maximize: bool, pruner: str,
                 pruner_args: dict[str, Any], budget: Optional[int], timeout: Optional[float], workers: int,
                 max_failures: int) -> None:
        self.db, self.space, self.base_file, self.base = trials, space, base_file, base
        self.sweep_dir, self.save_dir, self.name, self.storage_url = sweep_dir, save_dir, name, storage_url
        self.metric, self.maximize, self.pruner, self.pruner_args = metric, maximize, pruner, pruner_args
        self.budget, self.timeout, self.workers, self.max_failures = budget, timeout, workers, max_failures
        trainer = base.get("trainer") or {}
        devices = trainer.get("devices")
        self.ranks = devices if isinstance(devices, int) and devices > 0 and trainer.get("accelerator") in ("cpu", None, "auto") else 1
        self.running: dict[int, tuple[TrialProcess, Any]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.stopped_by: Optional[int] = None
        self.error: Optional[BaseException] = None
        self.started = time.time()
        self.walls: list[float] = []

    # ------------------------------------------------------------------ main thread
    def run(self) -> None:
        for message in self.db.recover(STALE_AFTER_S):
            print(f"lit-ft sweep: {message}", flush=True)
        handlers = self._install_signals()
        beat = threading.Thread(target=self._heartbeat, daemon=True)
        beat.start()
        threads = [threading.Thread(target=self._worker, args=(k,), name=f"sweep-worker-{k}") for k in range(self.workers)]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.5)  # short joins: signal handlers run in this thread
        finally:
            self.stop.set()
            for sig, old in handlers.items():
                signal.signal(sig, old)

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, self._on_signal)
        return old

    def _on_signal(self, signum: int, frame: Any) -> None:
        with self.lock:
            procs = [p for p, _ in self.running.values()]
        if self.stopped_by is not None:  # a second Ctrl-C: stop now, without waiting for checkpoints
            print("lit-ft sweep: stopping the trials at once (no checkpoint)", flush=True)
            for p in procs:
                p.signal(signal.SIGKILL)
            return
        self.stopped_by = signum
        self.stop.set()
        print(f"lit-ft sweep: {signal.Signals(signum).name}: the running trials save a resumable checkpoint and stop; "
              "run the same command again to continue", flush=True)
        for p in procs:
            p.signal(signal.SIGTERM)

    def _heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            with self.lock:
                live = [t for _, t in self.running.values()]
            for trial in live:
                try:
                    trial.set_user_attr(HEARTBEAT, time.time())
                except Exception:  # finished meanwhile
                    pass

    # ------------------------------------------------------------------ workers
    def _worker(self, k: int) -> None:
        cores = core_share(k, self.workers)
        threads = max(1, len(cores) // self.ranks)
        try:
            while not self.stop.is_set():
                if self.timeout is not None and time.time() - self.started > self.timeout:
                    break
                if self._too_many_failures():
                    break
                self.db.recover(STALE_AFTER_S)
                trial = self._next_trial()
                if trial is None:
                    break
                self._run(trial, cores, threads)
        except BaseException as err:  # a bug: stop everything, report it from the main thread
            self.error = err
            self.stop.set()

    def _next_trial(self) -> Any:
        """The next trial to run (a re-enqueued one first), or None when the budget is spent."""
        import optuna

        states = optuna.trial.TrialState
        with self.lock:
            all_trials = self.db.all()
            waiting = any(t.state == states.WAITING for t in all_trials)
            if self.budget is not None and not waiting and slots_used(all_trials) >= self.budget:
                return None
            trial = self.db.study.ask()
            if RETRY_OF in trial.user_attrs:
                return trial
            if self.budget is not None and slots_used(self.db.all(), before=trial.number) >= self.budget:
                # Another process took the last slot between our count and our ask: never run it.
                trial.set_user_attr(SKIPPED, "the budget was spent by other workers")
                tell(self.db.study, trial, state=states.FAIL)
                return None
            return trial

    def _run(self, trial: Any, cores: list[int], threads: int) -> None:
        import optuna

        states = optuna.trial.TrialState
        retry_of = trial.user_attrs.get(RETRY_OF)
        slot = int(trial.user_attrs.get(SLOT, trial.number))
        for key, value in ((SLOT, slot), (HOST, socket.gethostname()), (PID, os.getpid()), (HEARTBEAT, time.time()),
                           (THREADS, threads)):
            trial.set_user_attr(key, value)
        values = self.space.sample(trial)  # a retry gets its enqueued parameters back
        run_dir = self.sweep_dir / f"trial_{slot}"
        resume = run_dir / "checkpoints" / "last.ckpt"
        if retry_of is not None:
            origin = self.db.all()[retry_of]
            for step, value in sorted(origin.intermediate_values.items()):
                trial.report(value, step)  # the pruner judges the whole curve, not the resumed part
        if retry_of is None or not resume.is_file():
            _set_aside(run_dir)  # a fresh start: nothing of an earlier run may mix into it
            resume = None
        reporter = {"class_path": _REPORTER, "init_args": {
            "storage": self.storage_url, "study": self.name, "trial": trial.number, "monitor": self.metric,
            "pruner": self.pruner, "pruner_args": self.pruner_args, "parent_pid": os.getpid()}}
        proc = TrialProcess(trial.number, slot, run_dir,
                            trial_command(self.base_file, values, self.save_dir, self.name, slot, reporter, resume))
        what = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in trial.params.items())
        again = f" (again, {'from its last.ckpt' if resume else 'from the start'}: it was interrupted)" if retry_of is not None else ""
        print(f"lit-ft sweep: trial {slot} started{again}: {what}  [{run_dir}]", flush=True)
        with self.lock:
            if self.stop.is_set() and self.stopped_by is not None:
                self.db.close_interrupted(self.db.all()[trial.number], "the sweep was stopped before it started")
                return
            proc.start(trial_env(threads), cores)
            self.running[trial.number] = (proc, trial)
        trial.set_user_attr(CHILD, proc.process.pid)
        code = proc.wait()
        with self.lock:
            self.running.pop(trial.number, None)
        trial.set_user_attr(WALL, proc.wall_s)
        frozen = self.db.all()[trial.number]
        trial.set_user_attr(EPOCHS, int(frozen.user_attrs.get(EPOCHS, len(frozen.intermediate_values))))
        outcome = frozen.user_attrs.get(OUTCOME)
        value = best_value(frozen.intermediate_values, self.maximize)
        if code == 0 and outcome == "pruned":
            trial.set_user_attr(REASON, str(frozen.user_attrs.get("lit_ft:pruned", "pruned")))
            tell(self.db.study, trial, state=states.PRUNED)
        elif code == 0 and outcome == "complete" and value is not None:
            tell(self.db.study, trial, value)
        elif code in INTERRUPT_EXIT or (code != 0 and self.stopped_by is not None):
            self.db.close_interrupted(frozen, "the sweep was stopped")
        else:
            reason = failure_reason(code, proc.log_path) if code != 0 else (
                f"no finite {self.metric} was reported" if outcome == "complete" else "the trial reported no result")
            trial.set_user_attr(REASON, reason)
            tell(self.db.study, trial, state=states.FAIL)
        self.walls.append(proc.wall_s)
        self.report(final=False, slot=slot)

    def _too_many_failures(self) -> bool:
        rows = self._rows()
        failed = [r for r in rows if r.state == "FAIL"]
        ok = [r for r in rows if r.state in ("COMPLETE", "PRUNED")]
        if ok or len(failed) < self.max_failures:
            return False
        if self.error is None:
            last = max(failed, key=lambda r: r.number)
            self.error = UserError(
                f"all {len(failed)} trials failed, so the sweep stopped; the last (trial {last.slot}): {last.reason}",
                f"fix the space or the config (each trial's log: {self.sweep_dir}/trial_<n>/sweep_trial.log), "
                "or raise --max_failures",
            )
        self.stop.set()
        return True

    # ------------------------------------------------------------------ results
    def _rows(self) -> list[R.Row]:
        trials = self.db.all()
        attempts: dict[int, list] = {}
        for t in trials:
            if not t.user_attrs.get(SKIPPED):
                attempts.setdefault(slot_of(t), []).append(t)
        latest = latest_per_slot([t for t in trials if t.state.is_finished()])
        return R.rows(latest, attempts, self.maximize)

    def best(self, rows: list[R.Row]) -> Optional[R.Row]:
        done = [r for r in rows if r.state == "COMPLETE" and r.value is not None]
        if not done:
            return None
        return max(done, key=lambda r: r.value) if self.maximize else min(done, key=lambda r: r.value)

    def report(self, final: bool, slot: Optional[int] = None) -> Optional[R.Row]:
        """Rewrite the table (and this slot's HPARAMS session); at the end, the plots too."""
        with self.lock:
            rows = self._rows()
            best = self.best(rows)
            keys = [p.key for p in self.space.params]
            md, csv_text = R.table(rows, self.metric, keys)
            summary = [f"# sweep {self.name}", "", f"{len(rows)} trials; {self.metric} ({'max' if self.maximize else 'min'})"]
            if best is not None:
                summary.append(f"best: trial {best.slot}, {self.metric}={best.value:.4f} ({self.sweep_dir / best.run_dir}); "
                               f"config: {self.sweep_dir / 'best.yaml'}")
            saving = R.pruning_savings(rows, {r.slot: self._max_epochs(r.params) for r in rows})
            if saving:
                summary.append(saving)
            R.write_text(self.sweep_dir / "results.md", "\n".join(summary) + "\n\n" + md)
            R.write_text(self.sweep_dir / "results.csv", csv_text)
            for r in rows:  # once per slot, when it is final (an interrupted slot will run again)
                session = self.sweep_dir / "hparams" / r.run_dir
                if r.state != "INTERRUPTED" and not any(session.glob("events.out.tfevents.*")):
                    R.write_hparams(self.sweep_dir / "hparams", r, self.metric)
            if slot is not None:
                row = next((r for r in rows if r.slot == slot), None)
                if row is not None:
                    R.write_text(self.sweep_dir / row.run_dir / "sweep_trial.yaml", yaml.safe_dump({
                        "trial": row.slot, "optuna_trial": row.number, "state": row.state, self.metric: row.value,
                        "epochs": row.epochs, "wall_s": round(row.wall_s, 1), "params": row.params, "note": row.reason,
                    }, sort_keys=False))
                    done = len([r for r in rows if r.state != "INTERRUPTED"])
                    left = None if self.budget is None else max(0, self.budget - done)
                    eta = (sum(self.walls) / len(self.walls)) * math.ceil(left / self.workers) if left is not None and self.walls else None
                    print(R.progress(row, self.metric, done, self.budget, best, eta), flush=True)
        if final:
            for note in R.write_plots(self.db.study, self.sweep_dir / "plots"):
                print(f"lit-ft sweep: plot {note}", flush=True)
            print(f"lit-ft sweep: results in {self.sweep_dir}/results.md; tensorboard --logdir {self.sweep_dir}", flush=True)
            if best is not None:
                print(f"lit-ft sweep: best trial {best.slot} {self.metric}={best.value:.4f}; "
                      f"reproduce: lit-ft fit --config {self.sweep_dir / 'best.yaml'}", flush=True)
        return best

    def _max_epochs(self, params: dict[str, Any]) -> int:
        if "trainer.max_epochs" in params:
            return int(params["trainer.max_epochs"])
        return int((self.base.get("trainer") or {}).get("max_epochs") or 0)

    def test(self, best: R.Row) -> dict[str, float]:
        """Test the best trial's best checkpoint (a ``lit-ft test`` subprocess) into ``trial_<n>/test``."""
        from lit_ft.experiment import find_checkpoint

        run_dir = self.sweep_dir / best.run_dir
        out = run_dir / "test"
        done = _test_metrics(out)
        if done:
            return done
        ckpt = find_checkpoint(run_dir, "best")
        values = self.space.values(self.db.all()[best.number].params)
        words = [sys.executable, "-m", "lit_ft", "test", "--config", str(self.base_file),
                 *(override(k, v) for k, v in values.items()),
                 f"--trainer.logger.init_args.save_dir={self.save_dir}", f"--trainer.logger.init_args.name={self.name}",
                 f"--trainer.logger.init_args.version={best.run_dir}/test", "--ckpt_path", str(ckpt)]
        print(f"lit-ft sweep: testing the best trial ({ckpt})", flush=True)
        with (run_dir / "sweep_test.log").open("w") as log:
            code = subprocess.call(words, stdout=log, stderr=subprocess.STDOUT, env=trial_env(len(core_share(0, 1))))
        metrics = _test_metrics(out)
        if code != 0 or not metrics:
            print(f"lit-ft sweep: testing failed ({failure_reason(code, run_dir / 'sweep_test.log')})", flush=True)
            return {}
        text = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k in ("test/acc", "test/loss"))
        print(f"lit-ft sweep: best trial {best.slot}: {text}", flush=True)
        with (self.sweep_dir / "results.md").open("a") as f:
            f.write(f"\nbest trial {best.slot} (chosen on {self.metric}) on the test split: {text}\n")
        return metrics


def _test_metrics(directory: Path) -> dict[str, float]:
    if not directory.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"] if t.startswith("test/")}


def _set_aside(run_dir: Path) -> None:
    """Move an earlier run directory out of the way (a trial starting from scratch)."""
    if run_dir.exists() and any(run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(run_dir), str(aside))


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
