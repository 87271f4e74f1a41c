"""The strategy suite's report: statistics over seeds, the per-fraction and headline tables, the
findings stated plainly, written into docs/results.md (its ``## Strategies ...`` section), the
figure beside it, and the README's block between the ``experiments`` markers.

Owns: everything a person reads about the suite's runs. Must not: read event files or the
records file (it is handed the rows, see ``records.refresh``) or launch runs.

Rows are ``{(strategy, fraction): [run, ...]}``, a run a dict with acc (0-1), seconds (fit),
images, wall (seconds), seed, machine and overrides, as ``records.collect`` returns them.
Variants (``strategy+tag``) appear in the tables with their overrides spelled out and stay out
of the ranking, the comparisons with scratch, the headline table and the plot.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.markdown import write_between, write_section
from benchmarks.suite.plot import accuracy_vs_time
from benchmarks.suite.records import RECORDS_NAME, base_strategy, is_variant
from benchmarks.suite.spec import (
    ANCHORS,
    BASELINE,
    DEFAULT_EPOCHS,
    STRATEGIES,
    TARGET_ACC,
    TARGET_MINUTES,
    TRAIN_POOL,
)

SECTION = "Strategies at 1%, 10% and 100% of the labels"  # in docs/results.md
FIGURE = "results_accuracy_vs_time.png"  # in docs/
BEGIN, END = "<!-- experiments:begin -->", "<!-- experiments:end -->"  # the README's block


def stats(rs: list[dict]) -> tuple[float, float, int]:
    """Mean and sample sd of the test accuracy in %, and the number of runs (sd NaN for one run)."""
    accs = [r["acc"] * 100 for r in rs]
    return statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else float("nan")), len(accs)


def _acc_cell(rs: list[dict]) -> str:
    mean, sd, n = stats(rs)
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
    base_mean = stats(base)[0] if base else None
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
        mean = stats(rs)[0]
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
        s, rs = max(full, key=lambda x: stats(x[1])[0])
        mean = stats(rs)[0]
        wall = max(r["wall"] for r in rs) / 60
        met = mean >= TARGET_ACC and wall <= TARGET_MINUTES
        out.append(
            f"Best at 100% of the labels: **{s}, {mean:.1f}%** test accuracy, {wall:.1f} min wall per run "
            f"(fit + test) on 2 CPU cores; the target of ≥ {TARGET_ACC:g}% within {TARGET_MINUTES:g} min is "
            f"{'met' if met else '**not met**'}."
        )
    for f in fractions:
        means = {s: stats(rows[(s, f)])[0] for s in strategies if (s, f) in rows}
        if f != 1.0 and len(means) > 1:
            ranked = ", ".join(f"{s} {m:.1f}" for s, m in sorted(means.items(), key=lambda x: -x[1]))
            out.append(f"At {f * 100:g}% of the labels, best first: {ranked}.")
        base = rows.get((BASELINE, f))
        if not base:
            continue
        base_mean = stats(base)[0]
        ran = [s for s in strategies if s != BASELINE and (s, f) in rows]
        losers = [s for s in ran if stats(rows[(s, f)])[0] <= base_mean]
        margins = [stats(rows[(s, f)])[0] - base_mean for s in ran]
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


def plot_points(rows: dict, strategies: list[str]) -> dict[str, list[tuple[float, float, float, float]]]:
    """{strategy: [(mean wall minutes, mean acc %, sd (0 for one seed), fraction), ...]}, every
    strategy listed (none of its points run keeps its colour in the figure)."""
    points: dict[str, list[tuple[float, float, float, float]]] = {s: [] for s in strategies}
    for (s, f), rs in rows.items():
        if s in points:
            mean, sd, _ = stats(rs)
            points[s].append((statistics.mean(r["wall"] for r in rs) / 60, mean, 0.0 if math.isnan(sd) else sd, f))
    return points


def _variant_legend(rows: dict, strategies: list[str]) -> str:
    overrides = {s: rs[0].get("overrides", []) for (s, _), rs in sorted(rows.items()) if is_variant(s) and s in strategies}
    return "".join(f"\n- `{v}`: `{base_strategy(v)}` with " + ", ".join(f"`{o}`" for o in sets) + "." for v, sets in overrides.items())


def write_report(rows: dict, strategies: list[str], docs: Path, readme: Path) -> str:
    """Write the section of docs/results.md, the figure and the README block for ``rows``, in the
    order of ``strategies`` (each variant right under its strategy). Returns the section."""
    fractions = sorted({f for _, f in rows})
    suite = [s for s in strategies if not is_variant(s)]  # variants: tables only
    counts, labels = machine_counts(rows), machines(rows)
    timed_on = "; ".join(
        (f"{labels[m]} = " if labels else "") + f"{m} ({n} run{'s' if n > 1 else ''})" for m, n in
        sorted(counts.items(), key=lambda x: labels.get(x[0], ""))
    )
    facts = findings(rows, suite, fractions)
    accuracy_vs_time(plot_points(rows, suite), docs / FIGURE)
    legend = _variant_legend(rows, strategies)
    tables = "\n\n".join(
        f"### {f * 100:g}% of the labels ({round(f * TRAIN_POOL):,} images)\n\n{fraction_table(rows, strategies, f)}" for f in fractions
    )
    if legend:
        tables += "\n\nVariants (`--tag`/`--set`; not in the ranking, the headline table or the plot):" + legend
    body = (
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
        + f"\n\n{tables}\n\n![test accuracy vs wall time]({FIGURE})\n"
    )
    section = write_section(docs / "results.md", SECTION, body)
    headline = (
        f"{headline_table(rows, suite, fractions)}\n\n"
        + "\n".join(f"- {x}" for x in facts)
        + f"\n\n{anchors_table()}\n\n![test accuracy vs wall time](docs/{FIGURE})\n"
    )
    if not write_between(readme, BEGIN, END, headline) and readme.exists():
        print(f"[experiments] {readme.name} has no {BEGIN} ... {END} markers; headline table not written")
    return section
