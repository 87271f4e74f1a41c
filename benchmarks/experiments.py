"""The strategy suite's runner: each fine-tuning strategy at several label fractions and seeds.

    python benchmarks/experiments.py --fractions 0.01 0.1 --seeds 0 1
    python benchmarks/experiments.py --strategies full_ft --fractions 1.0 --epochs 1.0=3
    python benchmarks/experiments.py --report-only          # rebuild the tables and plot
    python benchmarks/experiments.py --strategies full_ft --fractions 0.1 --tag timm_head --set model.head_init=timm

Runs `lit-ft fit -c configs/experiments/_base.yaml -c configs/experiments/<strategy>.yaml`
(the shared recipe, then the strategy's changes; the run is named after the strategy) once per
(strategy, fraction, seed) in a subprocess, with `train_subset`, `max_epochs` and the seed
overridden, logging to runs/experiments/<strategy>-<pct>pct/seed<N>. Runs that already
finished (on disk or in docs/results_runs.jsonl) are not re-run, so the suite can be extended a
piece at a time. Then it rebuilds the report from every finished run: the tables and the plot
of test accuracy vs wall time in docs/results.md, the headline table in README.md (between the
`<!-- experiments:begin -->` / `<!-- experiments:end -->` markers).

A variant (`--tag NAME --set KEY=VALUE ...`) runs a strategy with extra config overrides into
runs/experiments/<strategy>+<NAME>-<pct>pct, which records them in `overrides.txt`. Variants
appear in the per-fraction tables as `<strategy>+<NAME>` with their overrides spelled out,
and stay out of the ranking, the comparisons with scratch, the headline table and the plot.

Owns: the command line, choosing what to run and launching it. The run records (directories,
event files, docs/results_runs.jsonl) are benchmarks/suite/records.py's; the report is
benchmarks/suite/report.py's (see benchmarks/suite/__init__.py).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/experiments.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import cpu  # noqa: E402
from benchmarks.suite.records import (  # noqa: E402
    RECORDS_NAME,
    base_strategy,
    begin_run,
    load_records,
    read_run,
    refresh,
    run_dir,
    variants,
)
from benchmarks.suite.report import write_report  # noqa: E402
from benchmarks.suite.spec import DEFAULT_EPOCHS, STRATEGIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "experiments"
BASE_CONFIG = CONFIGS / "_base.yaml"  # the recipe every strategy shares; each <strategy>.yaml holds only its changes
RUNS = ROOT / "runs" / "experiments"
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def config_names() -> list[str]:
    """Every strategy with a config (``_base.yaml`` is the shared recipe, not a strategy)."""
    return sorted(c.stem for c in CONFIGS.glob("*.yaml") if not c.name.startswith("_"))


def config_args(strategy: str) -> list[str]:
    """``--config _base.yaml --config <strategy>.yaml``: the last config names the run."""
    return ["--config", str(BASE_CONFIG), "--config", str(CONFIGS / f"{strategy}.yaml")]


def launch(strategy: str, fraction: float, seed: int, epochs: int, overrides: list[str] = ()) -> None:
    out = run_dir(RUNS, strategy, fraction, seed)
    if begin_run(out, f"{cpu()}, {os.cpu_count()} cores", overrides):  # wall times depend on the machine
        print(f"[experiments] removed the unfinished run in {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", flush=True)
    cmd = [
        sys.executable, "-m", "lit_ft", "fit", *config_args(base_strategy(strategy)),
        "--data.init_args.train_subset", str(fraction), "--trainer.max_epochs", str(epochs),
        "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
        "--trainer.logger.init_args.save_dir", str(out.parent.parent),
        "--trainer.logger.init_args.name", out.parent.name, "--trainer.logger.init_args.version", out.name,
        "--trainer.enable_progress_bar", "false", "--checkpoint.save_last", "false",
    ]
    for kv in overrides:  # KEY=VALUE -> --KEY VALUE, after the suite's own so they win
        key, value = kv.split("=", 1)
        cmd += [f"--{key}", value]
    print(f"[experiments] {strategy} {fraction:g} seed {seed}: {epochs} epochs", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def write_results(strategies: list[str], runs: Path | None = None, docs: Path | None = None, readme: Path | None = None) -> dict:
    """Refresh the run records from the event files, then rebuild the report from them; the
    rows reported, ``{(strategy, fraction): [run, ...]}``."""
    runs, docs, readme = runs or RUNS, docs or DOCS, readme or README
    rows = refresh(strategies, runs, docs / RECORDS_NAME)
    if not rows:
        print("no finished runs")
        return rows
    print(write_report(rows, strategies, docs, readme))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", nargs="*", default=[], help="per-fraction epochs, e.g. 1.0=3 0.01=20")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables and plot from existing runs")
    p.add_argument("--tag", help="run a variant: runs go to <strategy>+<tag>-<pct>pct (needs --set)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for the variant, e.g. model.head_init=timm")
    args = p.parse_args(argv)
    if bool(args.tag) != bool(args.set):
        p.error("--tag and --set go together: a variant needs a name and its overrides")
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_]+", args.tag):
        p.error(f"--tag {args.tag!r}: use letters, digits and _ only")
    bad = [kv for kv in args.set if "=" not in kv or kv.startswith("-")]
    if bad:
        p.error(f"--set {bad[0]!r}: write KEY=VALUE, e.g. model.head_init=timm")
    unknown = [s for s in args.strategies if s not in config_names()]
    if unknown:
        p.error(f"no configs/experiments/<name>.yaml for {', '.join(unknown)}; known: {', '.join(config_names())}")
    epochs = dict(DEFAULT_EPOCHS)
    epochs.update({float(k): int(v) for k, v in (e.split("=") for e in args.epochs)})
    recorded = {(r["strategy"], float(r["fraction"]), str(r["seed"])) for r in load_records(DOCS / RECORDS_NAME)}
    if not args.report_only:
        for seed in args.seeds:
            for fraction in args.fractions:
                for strategy in args.strategies:
                    name = f"{strategy}+{args.tag}" if args.tag else strategy
                    done = variants(RUNS, DOCS / RECORDS_NAME).get(name) if args.tag else None
                    if done is not None and done != args.set:
                        sys.exit(f"[experiments] {name} already has runs with {' '.join(done)}; choose another --tag")
                    if (name, fraction, str(seed)) in recorded:
                        print(f"[experiments] {name} {fraction:g} seed {seed}: recorded in docs/{RECORDS_NAME}, not re-run "
                              "(delete its line and run directory to re-run)")
                    elif read_run(run_dir(RUNS, name, fraction, seed)) is None:
                        launch(name, fraction, seed, epochs.get(fraction, 4), args.set)
    # The report always covers every strategy that has runs, not only the ones just run;
    # each variant sits right under the strategy it varies.
    names = STRATEGIES + [c for c in config_names() if c not in STRATEGIES]
    found = variants(RUNS, DOCS / RECORDS_NAME)
    write_results([x for n in names for x in [n] + sorted(v for v in found if base_strategy(v) == n)])


if __name__ == "__main__":
    main()
