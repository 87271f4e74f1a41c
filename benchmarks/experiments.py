"""The strategy suite: each fine-tuning strategy at several label fractions and seeds.

    python benchmarks/experiments.py --fractions 0.01 0.1 --seeds 0 1
    python benchmarks/experiments.py --strategies full_ft --fractions 1.0 --epochs 1.0=3
    python benchmarks/experiments.py --report-only          # rebuild the tables and plot
    python benchmarks/experiments.py --strategies full_ft --fractions 0.1 --tag timm_head --set model.head_init=timm

Runs `lit-ft fit -c configs/experiments/_base.yaml -c configs/experiments/<strategy>.yaml`
(the shared recipe, then the strategy's changes; the run is named after the strategy) once per
(strategy, fraction, seed) in a subprocess, with `train_subset`, `max_epochs` and the seed
overridden, logging to runs/experiments/<strategy>-<pct>pct/seed<N>. Then it reads every
finished run back from its TensorBoard event files (test/acc, budget/train_seconds,
budget/images_seen, and the wall time from the first event to the test result) and writes
the tables and a plot of test accuracy vs wall time to docs/results.md and
docs/results_accuracy_vs_time.png, and the headline table into README.md (between the
`<!-- experiments:begin -->` / `<!-- experiments:end -->` markers). Runs that already finished
are not re-run, so the suite can be extended a piece at a time.

Each finished run's numbers, as read from its event files, are also kept one line per run in
docs/results_runs.jsonl (committed; runs/ is not). The report reads that file and then the
event files under runs/ (a run there replaces its line), so `--report-only` rebuilds the same
tables on a fresh clone. To drop a result, delete its run directory and its line.

A variant (`--tag NAME --set KEY=VALUE ...`) runs a strategy with extra config overrides into
runs/experiments/<strategy>+<NAME>-<pct>pct, which records them in `overrides.txt`. Variants
appear in the per-fraction tables as `<strategy>+<NAME>` with their overrides spelled out,
and stay out of the ranking, the comparisons with scratch, the headline table and the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/experiments.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import cpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "experiments"
BASE_CONFIG = CONFIGS / "_base.yaml"  # the recipe every strategy shares; each <strategy>.yaml holds only its changes
RUNS = ROOT / "runs" / "experiments"
DOCS = ROOT / "docs"
README = ROOT / "README.md"
RECORDS_NAME = "results_runs.jsonl"  # under docs/: every finished run's numbers, read from its event files
STRATEGIES = ["linear_probe", "full_ft", "freeze_unfreeze", "gradual", "lp_ft", "layer_decay", "regularized", "scratch"]
BASELINE = "scratch"  # the same architecture from random init, same budget
# Epochs per label fraction: fewer images get more passes (the budget grows with the data).
DEFAULT_EPOCHS = {0.01: 15, 0.1: 4, 1.0: 2}
TRAIN_POOL = 58_000  # Fashion-MNIST's 60,000 training images minus the 2,000 held out for validation
TARGET_ACC, TARGET_MINUTES = 90.0, 20.0  # the CPU target: >= 90% test accuracy within 20 min per run
# Published Fashion-MNIST test accuracies (zalandoresearch/fashion-mnist README benchmark table;
# see ../shared/anchors.md): all trained on the 60,000 images, on GPUs, for many epochs.
ANCHORS = [
    ("2 conv + pooling (TensorFlow tutorial)", 91.6),
    ("2 conv + 2 FC, random flips", 93.9),
    ("CNN with shortcuts, augmentation + random erasing", 94.7),
    ("DenseNet-BC, 768K params, standard augmentation", 95.4),
    ("WRN-40-4, 8.9M params, standard augmentation", 96.7),
]
BEGIN, END = "<!-- experiments:begin -->", "<!-- experiments:end -->"


def config_names() -> list[str]:
    """Every strategy with a config (``_base.yaml`` is the shared recipe, not a strategy)."""
    return sorted(c.stem for c in CONFIGS.glob("*.yaml") if not c.name.startswith("_"))


def config_args(strategy: str) -> list[str]:
    """``--config _base.yaml --config <strategy>.yaml``: the last config names the run."""
    return ["--config", str(BASE_CONFIG), "--config", str(CONFIGS / f"{strategy}.yaml")]


def run_dir(strategy: str, fraction: float, seed: int) -> Path:
    return RUNS / f"{strategy}-{fraction * 100:g}pct" / f"seed{seed}"


def base_strategy(name: str) -> str:
    """``full_ft+timm_head`` -> ``full_ft``: the config a variant runs."""
    return name.split("+", 1)[0]


def is_variant(name: str) -> bool:
    return "+" in name


def variants(runs: Path | None = None, records: Path | None = None) -> dict[str, list[str]]:
    """{``strategy+tag``: its overrides} for every variant with runs (``overrides.txt``) or records."""
    out: dict[str, list[str]] = {}
    for d in sorted((runs or RUNS).glob("*+*-*pct")):
        name = d.name.rsplit("-", 1)[0]
        f = d / "overrides.txt"
        out.setdefault(name, f.read_text().split() if f.is_file() else [])
    for r in load_records(records):
        if is_variant(r["strategy"]):
            out.setdefault(r["strategy"], r["overrides"])
    return dict(sorted(out.items()))


def load_records(path: Path | None) -> list[dict]:
    """The committed per-run lines (see the module doc); none when ``path`` is None or missing."""
    if path is None or not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
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
        json.dumps({"strategy": s, "fraction": f, **{k: r.get(k) for k in ("seed", "acc", "seconds", "images", "wall", "finished", "machine")},
                    "overrides": r.get("overrides", [])}, sort_keys=False)
        for (s, f), rs in sorted(rows.items()) for r in rs
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def read_run(path: Path) -> dict | None:
    """test/acc, the budget scalars and the wall time of a finished run, from its event files."""
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
    return {
        "acc": test.value,
        "seconds": last("budget/train_seconds"),
        "images": last("budget/images_seen"),
        # From the logger's first event (the fit starting) to the test result: fit + test,
        # without the few seconds of Python start-up before the logger exists.
        "wall": test.wall_time - acc.FirstEventTimestamp(),
        "finished": time.strftime("%Y-%m-%d %H:%M", time.gmtime(test.wall_time)),  # UTC
        "machine": (path / "machine.txt").read_text().strip() if (path / "machine.txt").is_file() else None,
    }


def launch(strategy: str, fraction: float, seed: int, epochs: int, overrides: list[str] = ()) -> None:
    out = run_dir(strategy, fraction, seed)
    if out.exists():  # an unfinished run (crashed or killed): its events would skew the new run's wall time
        print(f"[experiments] removing the unfinished run in {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", flush=True)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "machine.txt").write_text(f"{cpu()}, {os.cpu_count()} cores\n")  # wall times depend on it
    if overrides:
        out.parent.mkdir(parents=True, exist_ok=True)
        (out.parent / "overrides.txt").write_text("\n".join(overrides) + "\n")
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


def collect(strategies: list[str], runs: Path = RUNS, records: Path | None = None) -> dict[tuple[str, float], list[dict]]:
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


def _stats(rs: list[dict]) -> tuple[float, float, int]:
    accs = [r["acc"] * 100 for r in rs]
    return statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else float("nan")), len(accs)


def _acc_cell(rs: list[dict]) -> str:
    mean, sd, n = _stats(rs)
    return f"{mean:.1f}" if n == 1 else f"{mean:.1f} ± {sd:.1f}"


def _minutes(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds / 60:.1f}"


def machine_counts(rows: dict) -> dict[str, int]:
    """{machine the run was timed on: number of runs}."""
    counts: dict[str, int] = defaultdict(int)
    for rs in rows.values():
        for r in rs:
            counts[r.get("machine") or "not recorded"] += 1
    return dict(counts)


def machines(rows: dict) -> dict[str, str]:
    """{machine: label} over every run, labels A, B, ... in order of the most runs; empty when
    all runs were timed on one machine (nothing to tell apart)."""
    counts = machine_counts(rows)
    if len(counts) < 2:
        return {}
    ordered = sorted(counts, key=lambda m: (-counts[m], m))
    return {m: chr(ord("A") + i) for i, m in enumerate(ordered)}


def fraction_table(rows: dict, strategies: list[str], fraction: float) -> str:
    base = rows.get((BASELINE, fraction))
    base_mean = _stats(base)[0] if base else None
    labels = machines(rows)
    lines = [
        "| strategy | test acc % (mean ± sd) | seeds | per seed | vs scratch | wall min (fit + test) | fit min | images seen |"
        + (" machine |" if labels else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if labels else ""),
    ]
    for s in strategies:
        rs = rows.get((s, fraction))
        if not rs:
            if s in STRATEGIES:  # a suite strategy missing is worth saying; an extra config is not
                lines.append(f"| {s} | not run | | | | | | |" + (" |" if labels else ""))
            continue
        mean, _, n = _stats(rs)
        per_seed = " / ".join(f"{r['acc'] * 100:.1f}" for r in rs)
        vs = "" if s == BASELINE or base_mean is None else f"{mean - base_mean:+.1f} pts"
        wall = statistics.mean(r["wall"] for r in rs)
        fit = statistics.mean(r["seconds"] for r in rs)
        imgs = statistics.mean(r["images"] for r in rs)
        lines.append(
            f"| {s} | {_acc_cell(rs)} | {', '.join(r['seed'] for r in rs)} | {per_seed} | {vs} | "
            f"{_minutes(wall)} | {_minutes(fit)} | {imgs / 1000:,.0f}k |"
            + (" " + "/".join(dict.fromkeys(labels[r.get("machine") or "not recorded"] for r in rs)) + " |" if labels else "")
        )
    return "\n".join(lines)


def headline_table(rows: dict, strategies: list[str], fractions: list[float]) -> str:
    head = " | ".join(f"{f * 100:g}% labels ({round(f * TRAIN_POOL):,})" for f in fractions)
    lines = [f"| strategy | {head} |", "|---|" + "---|" * len(fractions)]
    for s in strategies:
        if s not in STRATEGIES and not any((s, f) in rows for f in fractions):
            continue
        cells = []
        for f in fractions:
            rs = rows.get((s, f))
            cells.append(f"{_acc_cell(rs)} ({len(rs)})" if rs else "-")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(rows: dict, strategies: list[str], fractions: list[float]) -> list[str]:
    """Plain statements computed from the runs: the CPU target, the ranking, who beats scratch."""
    out = []
    full = [(s, rows[(s, 1.0)]) for s in strategies if (s, 1.0) in rows]
    if full:
        s, rs = max(full, key=lambda x: _stats(x[1])[0])
        mean = _stats(rs)[0]
        wall = max(r["wall"] for r in rs) / 60
        met = mean >= TARGET_ACC and wall <= TARGET_MINUTES
        out.append(
            f"Best at 100% of the labels: **{s}, {mean:.1f}%** test accuracy, {wall:.1f} min wall per run "
            f"(fit + test) on 2 CPU cores; the target of ≥ {TARGET_ACC:g}% within {TARGET_MINUTES:g} min is "
            f"{'met' if met else '**not met**'}."
        )
    for f in fractions:
        means = {s: _stats(rows[(s, f)])[0] for s in strategies if (s, f) in rows}
        if f != 1.0 and len(means) > 1:
            ranked = ", ".join(f"{s} {m:.1f}" for s, m in sorted(means.items(), key=lambda x: -x[1]))
            out.append(f"At {f * 100:g}% of the labels, best first: {ranked}.")
        base = rows.get((BASELINE, f))
        if not base:
            continue
        base_mean = _stats(base)[0]
        ran = [s for s in strategies if s != BASELINE and (s, f) in rows]
        losers = [s for s in ran if _stats(rows[(s, f)])[0] <= base_mean]
        margins = [_stats(rows[(s, f)])[0] - base_mean for s in ran]
        if not ran:
            continue
        if losers:
            out.append(f"At {f * 100:g}% of the labels, not better than scratch ({base_mean:.1f}%): {', '.join(losers)}.")
        else:
            out.append(
                f"At {f * 100:g}% of the labels every pretrained strategy run ({len(ran)}) beats scratch "
                f"({base_mean:.1f}%), by {min(margins):.1f} to {max(margins):.1f} points."
            )
    return out


def anchors_table() -> str:
    lines = ["| published (Fashion-MNIST README; trained on all 60,000 images) | test acc % |", "|---|---|"]
    lines += [f"| {name} | {acc:.1f} |" for name, acc in ANCHORS]
    return "\n".join(lines)


def write_results(strategies: list[str], runs: Path = RUNS, docs: Path = DOCS, readme: Path = README) -> dict:
    records = docs / RECORDS_NAME
    # Read once for every strategy with runs or records, so the records of strategies not
    # reported this time are kept.
    every = collect(sorted(set(strategies) | {r["strategy"] for r in load_records(records)}), runs, records)
    rows = {key: rs for key, rs in every.items() if key[0] in strategies}
    if not rows:
        print("no finished runs")
        return rows
    save_records(records, every)
    fractions = sorted({f for _, f in rows})
    suite = [s for s in strategies if not is_variant(s)]  # variants: tables only
    counts, labels = machine_counts(rows), machines(rows)
    timed_on = "; ".join(
        (f"{labels[m]} = " if labels else "") + f"{m} ({n} run{'s' if n > 1 else ''})" for m, n in
        sorted(counts.items(), key=lambda x: labels.get(x[0], ""))
    )
    facts = findings(rows, suite, fractions)
    _plot(rows, suite, docs)
    ran_variants = {v: o for v, o in variants(runs, records).items() if v in strategies and any((v, f) in rows for f in fractions)}
    legend = "".join(
        f"\n- `{v}`: `{base_strategy(v)}` with " + ", ".join(f"`{o}`" for o in overrides) + "." for v, overrides in ran_variants.items()
    )
    tables = "\n\n".join(
        f"### {f * 100:g}% of the labels ({round(f * TRAIN_POOL):,} images)\n\n{fraction_table(rows, strategies, f)}" for f in fractions
    )
    if legend:
        tables += "\n\nVariants (`--tag`/`--set`; not in the ranking, the headline table or the plot):" + legend
    section = (
        "## Strategies at 1%, 10% and 100% of the labels\n\n"
        "Written by `python benchmarks/experiments.py` from the runs' TensorBoard event files (each run's numbers "
        f"are kept in `docs/{RECORDS_NAME}`, so `--report-only` rebuilds this on a fresh clone). Fashion-MNIST, "
        "EfficientNet-Lite0 (ImageNet weights from the offline package; `scratch` = the same network from random "
        "init, same budget), 64 px, 2 CPU cores, no GPU. Test accuracy on the full 10,000-image test set, from the "
        "best-validation checkpoint. The label fraction is of the 58,000 training images left after holding out "
        "2,000 for validation; a seed fixes the subset, the validation split and the batch order (and the head's initialisation where it is random). "
        f"Epochs per fraction: {DEFAULT_EPOCHS} unless the command says otherwise (images seen tells). "
        "Wall time runs from the logger's first event to the test result (fit, validation each epoch, the "
        "10,000-image test); fit time runs from the start of training to the end of the last epoch (validation "
        "included, test not). Timed on: " + timed_on + (
            ". Wall times are comparable only between runs on the same machine" if labels else "") + ".\n\n"
        + "\n".join(f"- {x}" for x in facts)
        + f"\n\n{tables}\n\n![test accuracy vs wall time](results_accuracy_vs_time.png)\n"
    )
    _write_section(docs / "results.md", "Strategies at 1%, 10% and 100% of the labels", section)
    headline = (
        f"{headline_table(rows, suite, fractions)}\n\n"
        + "\n".join(f"- {x}" for x in facts)
        + f"\n\n{anchors_table()}\n\n![test accuracy vs wall time](docs/results_accuracy_vs_time.png)\n"
    )
    _write_readme(readme, headline)
    print(section)
    return rows


def _write_readme(readme: Path, body: str) -> None:
    if not readme.exists():
        return
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"[experiments] {readme.name} has no {BEGIN} ... {END} markers; headline table not written")
        return
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + body + text[end:])


def _plot(rows: dict, strategies: list[str], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    markers = {0.01: "o", 0.1: "s", 1.0: "^"}
    # tab10 without its grey (kept for the references), then darker extras: no two strategies share a colour
    colors = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7] + ["black", "navy", "darkgreen", "maroon"]
    for i, strategy in enumerate(strategies):
        color = colors[i % len(colors)]
        pts = []
        for (s, f), rs in rows.items():
            if s != strategy:
                continue
            mean, sd, _ = _stats(rs)
            pts.append((statistics.mean(r["wall"] for r in rs) / 60, mean, 0.0 if math.isnan(sd) else sd, f))
        pts.sort(key=lambda p: p[3])
        if len(pts) > 1:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=0.8, alpha=0.5)
        for j, (t, a, sd, f) in enumerate(pts):
            ax.errorbar(t, a, yerr=sd, color=color, marker=markers.get(f, "x"), ms=6, capsize=2,
                        label=strategy if j == 0 else None)
    for (name, acc), va in zip(ANCHORS[:1] + ANCHORS[3:], ("bottom", "top", "bottom")):
        ax.axhline(acc, color="0.6", ls=":", lw=0.8)
        ax.annotate(f"{name.split(',')[0]}: {acc}% (published)", (0.01, acc), xycoords=("axes fraction", "data"),
                    fontsize=7, color="0.4", va=va)
    ax.axvline(TARGET_MINUTES, color="0.6", ls="--", lw=0.8)
    ax.annotate(f"{TARGET_MINUTES:g} min", (TARGET_MINUTES, 0.02), xycoords=("data", "axes fraction"),
                fontsize=7, color="0.4", ha="right")
    ax.set_xscale("log")
    ax.set_ylim(top=98.5)  # room for the highest reference line's label
    ax.set_xlabel("wall time per run, minutes (fit + test, 2 CPU cores, log scale)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("Fashion-MNIST, EfficientNet-Lite0: o = 1% labels, s = 10%, ^ = 100% (bars: sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside: never hides a point
    fig.tight_layout()
    docs.mkdir(parents=True, exist_ok=True)
    fig.savefig(docs / "results_accuracy_vs_time.png", dpi=110)
    plt.close(fig)


def _write_section(path: Path, title: str, section: str) -> None:
    text = path.read_text() if path.exists() else "# lit-ft results\n\nEach section is written by the command it names.\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")  # the same bytes however often it is rewritten


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
                    elif read_run(run_dir(name, fraction, seed)) is None:
                        launch(name, fraction, seed, epochs.get(fraction, 4), args.set)
    # The report always covers every strategy that has runs, not only the ones just run;
    # each variant sits right under the strategy it varies.
    names = STRATEGIES + [c for c in config_names() if c not in STRATEGIES]
    found = variants(RUNS, DOCS / RECORDS_NAME)
    write_results([x for n in names for x in [n] + sorted(v for v in found if base_strategy(v) == n)])


if __name__ == "__main__":
    main()
