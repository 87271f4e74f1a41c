"""The suite's run records: where each run lives, what it measured, and the committed copy.

A run of (strategy, label fraction, seed) lives in ``<runs>/<strategy>-<pct>pct/seed<N>``
(a variant's strategy is ``<strategy>+<tag>``, its overrides in ``overrides.txt`` one level up),
with ``machine.txt`` saying where it was timed. What it measured is read back from its
TensorBoard event files. Every finished run's numbers are also kept one JSON line per run in
docs/results_runs.jsonl (committed; runs/ is not): :func:`collect` reads that file and then the
event files (a run on disk replaces its line), so the report can be rebuilt on a fresh clone.

Owns: the run-directory layout, reading event files, the JSONL format. Must not: launch runs
or format anything for people (the runner and the report do).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.markdown import atomic_write

RECORDS_NAME = "results_runs.jsonl"  # under docs/: every finished run's numbers, read from its event files
MACHINE_FILE = "machine.txt"  # in a run directory: the machine it was timed on
OVERRIDES_FILE = "overrides.txt"  # in a variant's directory: its KEY=VALUE overrides, one a line
FIELDS = ("seed", "acc", "seconds", "images", "wall", "finished", "machine")  # a record's fields, in file order


def run_dir(runs: Path, strategy: str, fraction: float, seed: int) -> Path:
    return runs / f"{strategy}-{fraction * 100:g}pct" / f"seed{seed}"


def base_strategy(name: str) -> str:
    """``full_ft+timm_head`` -> ``full_ft``: the config a variant runs."""
    return name.split("+", 1)[0]


def is_variant(name: str) -> bool:
    return "+" in name


def begin_run(path: Path, machine: str, overrides: list[str] = ()) -> bool:
    """Make ``path`` an empty run directory that says where it is timed (and, for a variant, with
    which overrides). True when an unfinished run (killed or crashed) was there and was removed:
    its events would otherwise become the new run's first ones and inflate its wall time."""
    removed = path.exists()
    if removed:
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MACHINE_FILE).write_text(machine + "\n")
    if overrides:
        (path.parent / OVERRIDES_FILE).write_text("\n".join(overrides) + "\n")
    return removed


def variants(runs: Path, records: Path | None = None) -> dict[str, list[str]]:
    """{``strategy+tag``: its overrides} for every variant with runs (``overrides.txt``) or records."""
    out: dict[str, list[str]] = {}
    for d in sorted(runs.glob("*+*-*pct")):
        name = d.name.rsplit("-", 1)[0]
        f = d / OVERRIDES_FILE
        out.setdefault(name, f.read_text().split() if f.is_file() else [])
    for r in load_records(records):
        if is_variant(r["strategy"]):
            out.setdefault(r["strategy"], r["overrides"])
    return dict(sorted(out.items()))


def load_records(path: Path | None) -> list[dict]:
    """The committed per-run lines; none when ``path`` is None or missing. A line that is not a
    record stops everything with its line number: a report silently missing runs is worse."""
    if path is None or not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            float(r["fraction"]), float(r["acc"]), str(r["strategy"]), str(r["seed"])
        except (ValueError, KeyError, TypeError) as e:
            sys.exit(f"[experiments] {path}:{n}: not a run record ({e!r}); fix or delete that line")
        out.append(r)
    return out


def save_records(path: Path, rows: dict[tuple[str, float], list[dict]]) -> None:
    """One JSON line per run, sorted, so the file diffs cleanly as runs are added."""
    lines = [
        json.dumps({"strategy": s, "fraction": f, **{k: r.get(k) for k in FIELDS}, "overrides": r.get("overrides", [])})
        for (s, f), rs in sorted(rows.items()) for r in rs
    ]
    atomic_write(path, "\n".join(lines) + "\n")


def read_run(path: Path) -> dict | None:
    """test/acc, the budget scalars and the wall time of a finished run, from its event files;
    None for a run that has not reached its test."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not path.is_dir():
        return None
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    if "test/acc" not in tags:
        return None
    last = lambda tag: acc.Scalars(tag)[-1].value if tag in tags else float("nan")  # noqa: E731
    test = acc.Scalars("test/acc")[-1]
    machine = path / MACHINE_FILE
    return {
        "acc": test.value,
        "seconds": last("budget/train_seconds"),
        "images": last("budget/images_seen"),
        # From the logger's first event (the fit starting) to the test result: fit + test,
        # without the few seconds of Python start-up before the logger exists.
        "wall": test.wall_time - acc.FirstEventTimestamp(),
        "finished": time.strftime("%Y-%m-%d %H:%M", time.gmtime(test.wall_time)),  # UTC
        "machine": machine.read_text().strip() if machine.is_file() else None,
    }


def collect(strategies: list[str], runs: Path, records: Path | None = None) -> dict[tuple[str, float], list[dict]]:
    """{(strategy, fraction): [run, ...]} for every finished run in ``records`` or under ``runs``
    (the event files win), seeds in order."""
    found: dict[tuple[str, float, str], dict] = {}
    overrides = variants(runs, records)
    for r in load_records(records):
        if r["strategy"] in strategies:
            found[(r["strategy"], float(r["fraction"]), str(r["seed"]))] = {**r, "seed": str(r["seed"])}
    for strategy in strategies:
        for frac_dir in sorted(runs.glob(f"{strategy}-*pct")):
            fraction = float(frac_dir.name.rsplit("-", 1)[1][: -len("pct")]) / 100
            for seed_dir in frac_dir.glob("seed*"):
                result = read_run(seed_dir)
                if result:
                    seed = seed_dir.name[4:]
                    found[(strategy, fraction, seed)] = {**result, "seed": seed, "overrides": overrides.get(strategy, [])}
    rows: dict[tuple[str, float], list[dict]] = defaultdict(list)
    seed_key = lambda k: (k[0], k[1], int(k[2]) if k[2].isdigit() else -1)  # noqa: E731
    for key in sorted(found, key=seed_key):
        rows[key[:2]].append({k: v for k, v in found[key].items() if k not in ("strategy", "fraction")})
    return dict(rows)


def refresh(strategies: list[str], runs: Path, records: Path) -> dict[tuple[str, float], list[dict]]:
    """The finished runs of ``strategies`` (as :func:`collect`), after writing every finished run
    of every strategy with runs or records back to ``records``: reading once for all of them
    means a narrower report drops no one else's record. Nothing is written when none of
    ``strategies`` has a finished run."""
    every = collect(sorted(set(strategies) | {r["strategy"] for r in load_records(records)}), runs, records)
    rows = {key: rs for key, rs in every.items() if key[0] in strategies}
    if rows:
        save_records(records, every)
    return rows
