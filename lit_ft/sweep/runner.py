"""One trial of a sweep as a ``lit-ft fit`` subprocess: its command line, its share of the
CPU cores, its log, and why it failed.

A subprocess, not a function call, so that every strategy a config can express works in a
trial exactly as from the command line (DDP included: Lightning's launcher starts the other
ranks from the trial's command), and a trial that crashes, leaks memory or is killed by the OOM
killer takes nothing else down. The trial runs in its own session (process group): a signal
meant for the sweep is forwarded by the sweep as SIGTERM to the whole group, which every rank's
:class:`~lit_ft.callbacks.interrupt.GracefulInterrupt` turns into a resumable ``last.ckpt``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from lit_ft.sweep.space import override

LOG_NAME = "sweep_trial.log"


@dataclass
class TrialProcess:
    """A running (or finished) trial subprocess."""

    number: int
    slot: int
    run_dir: Path
    command: list[str]
    process: Optional[subprocess.Popen] = None
    started: float = 0.0
    returncode: Optional[int] = None
    wall_s: float = 0.0

    def start(self, env: dict[str, str], cores: Optional[Sequence[int]] = None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = (self.run_dir / LOG_NAME).open("a")
        log.write(f"\n$ {' '.join(self.command)}\n")
        log.flush()
        self.started = time.time()
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        if cores and hasattr(os, "sched_setaffinity"):
            # Before the interpreter has started any thread: every OpenMP thread and DDP rank it
            # starts later inherits the pinning.
            try:
                os.sched_setaffinity(self.process.pid, set(cores))
            except OSError:
                pass

    def wait(self) -> int:
        assert self.process is not None
        self.returncode = self.process.wait()
        self.wall_s = time.time() - self.started
        return self.returncode

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every process of the trial (all DDP ranks)."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_NAME


def trial_command(
    base_config: Path,
    overrides: dict[str, Any],
    save_dir: str,
    sweep_name: str,
    slot: int,
    reporter: dict[str, Any],
    resume_from: Optional[Path] = None,
) -> list[str]:
    """``python -m lit_ft fit`` for one trial: the sweep's base config, the sampled overrides,
    the run directory ``<save_dir>/<sweep>/trial_<slot>``, no test (the sweep tests only the
    best trial, chosen on validation), and the reporting callback."""
    words = [sys.executable, "-m", "lit_ft", "fit", "--config", str(base_config)]
    words += [override(k, v) for k, v in overrides.items()]
    words += [
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.name={sweep_name}",
        f"--trainer.logger.init_args.version=trial_{slot}",
        "--test_after_fit=false",
        "--trainer.callbacks+=" + json.dumps(reporter),
    ]
    if resume_from is not None:
        words += ["--ckpt_path", str(resume_from)]
    return words


def core_share(worker: int, workers: int, available: Optional[Sequence[int]] = None) -> list[int]:
    """The cores worker ``worker`` of ``workers`` pins its trials to (an equal, disjoint share
    when there are enough cores; otherwise one core each, round robin)."""
    cores = sorted(available if available is not None else (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)))
    per = len(cores) // workers
    if per == 0:
        return [cores[worker % len(cores)]]
    return cores[worker * per: (worker + 1) * per]


def trial_env(threads: int) -> dict[str, str]:
    """The environment of a trial: its thread count (OpenMP/MKL read it at start-up; Lightning's
    CPU DDP keeps it when it is set)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


_SIGNALS = {int(s): s.name for s in signal.Signals}


def failure_reason(returncode: int, log: Path) -> str:
    """Why a trial's process failed, in one line: lit-ft's own error line, else the last
    exception in the log, else the signal or exit status."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("lit-ft: error:"):
            return ln[len("lit-ft: error:"):].strip()
    if re.search(r"out of memory|OutOfMemoryError", text):
        return "out of memory"
    if returncode < 0:
        name = _SIGNALS.get(-returncode, str(-returncode))
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln):
            return ln[:300]
    return f"exit status {returncode}"
