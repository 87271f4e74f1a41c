"""The strategy suite: each fine-tuning strategy at several label fractions and seeds.

    python benchmarks/experiments.py --fractions 0.01 0.1 --seeds 0 1
    python benchmarks/experiments.py --strategies full_ft --fractions 1.0 --epochs 1.0=3

Runs `lit-ft fit --config configs/experiments/<strategy>.yaml` once per
(strategy, fraction, seed) in a subprocess, with `train_subset`, `max_epochs` and the seed
overridden, logging to runs/experiments/<strategy>-<pct>/seed<N>. Then it reads every
finished run back from its TensorBoard logs (test/acc, budget/train_seconds,
budget/images_seen) and writes the table and a plot of test accuracy vs training time to
docs/results.md and docs/results_accuracy_vs_time.png. Runs that already finished are not
re-run, so the suite can be extended a piece at a time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "experiments"
RUNS = ROOT / "runs" / "experiments"
DOCS = ROOT / "docs"
STRATEGIES = ["linear_probe", "full_ft", "freeze_unfreeze", "gradual", "lp_ft", "layer_decay", "regularized", "scratch"]
# Epochs per label fraction: fewer images get more passes (the budget grows with the data).
DEFAULT_EPOCHS = {0.01: 15, 0.1: 4, 1.0: 2}


def run_dir(strategy: str, fraction: float, seed: int) -> Path:
    return RUNS / f"{strategy}-{fraction * 100:g}pct" / f"seed{seed}"


def read_run(path: Path) -> dict | None:
    """test/acc and the budget scalars of a finished run, from its event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not path.is_dir():
        return None
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    if "test/acc" not in tags:
        return None
    last = lambda tag: acc.Scalars(tag)[-1].value if tag in tags else float("nan")  # noqa: E731
    return {"acc": last("test/acc"), "seconds": last("budget/train_seconds"), "images": last("budget/images_seen")}


def launch(strategy: str, fraction: float, seed: int, epochs: int) -> None:
    out = run_dir(strategy, fraction, seed)
    cmd = [
        sys.executable, "-m", "lit_ft", "fit", "--config", str(CONFIGS / f"{strategy}.yaml"),
        "--data.init_args.train_subset", str(fraction), "--trainer.max_epochs", str(epochs),
        "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
        "--trainer.logger.init_args.save_dir", str(out.parent.parent),
        "--trainer.logger.init_args.name", out.parent.name, "--trainer.logger.init_args.version", out.name,
        "--trainer.enable_progress_bar", "false", "--checkpoint.save_last", "false",
    ]
    print(f"[experiments] {strategy} {fraction:g} seed {seed}: {epochs} epochs", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def write_results(strategies: list[str]) -> None:
    rows: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for strategy in strategies:
        for frac_dir in sorted(RUNS.glob(f"{strategy}-*pct")):
            fraction = float(frac_dir.name.rsplit("-", 1)[1][: -len("pct")]) / 100
            for seed_dir in sorted(frac_dir.glob("seed*")):
                result = read_run(seed_dir)
                if result:
                    rows[(strategy, fraction)].append(result)
    if not rows:
        print("no finished runs")
        return
    fractions = sorted({f for _, f in rows})
    header = "| strategy | " + " | ".join(f"{f * 100:g}% labels: test acc (mean ± sd, n) | train time, images seen" for f in fractions) + " |"
    lines = [header, "|---|" + "---|---|" * len(fractions)]
    for strategy in strategies:
        cells = []
        for f in fractions:
            rs = rows.get((strategy, f), [])
            if not rs:
                cells += ["-", "-"]
                continue
            accs = [r["acc"] * 100 for r in rs]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            secs = statistics.mean(r["seconds"] for r in rs)
            imgs = statistics.mean(r["images"] for r in rs)
            cells += [f"{statistics.mean(accs):.1f} ± {sd:.1f} ({len(accs)})", f"{secs / 60:.1f} min, {imgs / 1000:.0f}k"]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    _plot(rows, strategies)
    section = (
        "## Strategies at 1%, 10% and 100% of the labels\n\n"
        "Written by `python benchmarks/experiments.py` from the runs' TensorBoard logs. Fashion-MNIST, "
        "EfficientNet-Lite0 (ImageNet weights from the offline package; `scratch` = random init), 64 px, "
        "2 CPU cores; test accuracy on the full 10,000-image test set; train time excludes the test pass. "
        "The label fraction is of the 58,000 training images left after holding out 2,000 for validation. "
        f"Epochs per fraction: {DEFAULT_EPOCHS} unless the command says otherwise.\n\n"
        f"{table}\n\n![test accuracy vs training time](results_accuracy_vs_time.png)\n"
    )
    _write_section("Strategies at 1%, 10% and 100% of the labels", section)
    print(section)


def _plot(rows: dict, strategies: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    markers = {0.01: "o", 0.1: "s", 1.0: "^"}
    for i, strategy in enumerate(strategies):
        pts = [(statistics.mean(r["seconds"] for r in rs) / 60, statistics.mean(r["acc"] for r in rs) * 100, f)
               for (s, f), rs in rows.items() if s == strategy]
        for j, (t, a, f) in enumerate(sorted(pts)):
            ax.scatter(t, a, color=f"C{i}", marker=markers.get(f, "x"), label=strategy if j == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("training time, minutes (2 CPU cores, log scale)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("Fashion-MNIST: o = 1% labels, s = 10%, ^ = 100%")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside: never hides a point
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    fig.savefig(DOCS / "results_accuracy_vs_time.png", dpi=110)


def _write_section(title: str, section: str) -> None:
    import re

    path = DOCS / "results.md"
    text = path.read_text() if path.exists() else "# lit-ft results\n\nEach section is written by the command it names.\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", nargs="*", default=[], help="per-fraction epochs, e.g. 1.0=3 0.01=20")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from existing runs")
    args = p.parse_args()
    epochs = dict(DEFAULT_EPOCHS)
    epochs.update({float(k): int(v) for k, v in (e.split("=") for e in args.epochs)})
    if not args.report_only:
        for seed in args.seeds:
            for fraction in args.fractions:
                for strategy in args.strategies:
                    if not (CONFIGS / f"{strategy}.yaml").is_file():
                        print(f"[experiments] skipping {strategy}: no configs/experiments/{strategy}.yaml")
                        continue
                    if read_run(run_dir(strategy, fraction, seed)) is None:
                        launch(strategy, fraction, seed, epochs.get(fraction, 4))
    write_results([s for s in STRATEGIES if s in args.strategies] + [s for s in args.strategies if s not in STRATEGIES])


if __name__ == "__main__":
    main()
