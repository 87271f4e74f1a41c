"""Shared by the benchmark scripts: the machine description, markdown tables, a per-iteration
timer, and writing a section of BENCHMARKS.md (through :mod:`benchmarks.markdown`, which every
script that writes markdown uses)."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import timm
import torch

from benchmarks import markdown

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def cpu() -> str:
    """The CPU model and its widest vector unit, e.g. ``AMD EPYC (AVX2)``: CPU timings (and the last
    digits of float results) differ between an AVX-512 and an AVX2 machine of the same core count."""
    name, flags = None, set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()  # no /proc/cpuinfo (macOS, Windows)
    isa = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None)
    return f"{name} ({isa})" if isa else name


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {gpu}; "
        f"python {platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}, timm {timm.__version__}"
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, command: str, machine_desc: str | None = None) -> None:
    """Replace (or append) the section ``## name`` of BENCHMARKS.md, stamped with the command,
    the date and the machine (see :mod:`benchmarks.markdown`).

    ``machine_desc``: the machine the numbers come from, when it is not this one (a report
    measured on a device machine and written here).
    """
    stamp = time.strftime("%Y-%m-%d")
    full = f"Command: `{command}` ({stamp})\n\nMachine: {machine_desc or machine()}\n\n{body.strip()}\n"
    print(markdown.write_section(BENCHMARKS_MD, name, full, heading="# lit-ft benchmarks"))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def command() -> str:
    """How this benchmark was run, as a user would type it (from the repository root)."""
    module = Path(sys.argv[0]).resolve().relative_to(ROOT).with_suffix("")
    return "python -m " + ".".join(module.parts) + "".join(f" {a}" for a in sys.argv[1:])


class IterTimer(L.Callback):
    """Times each training iteration, from one batch start to the next (data fetch included)."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_epoch_end(self, trainer, module):
        self.starts.append(time.perf_counter())

    def times(self, skip: int = 0) -> list[float]:
        return [b - a for a, b in zip(self.starts[:-1], self.starts[1:])][skip:]
