"""Weight averaging and robustness at 10% of the Fashion-MNIST labels: the best single run vs
uniform and greedy model soups vs WiSE-FT, on the clean test set and under corruptions.

    python benchmarks/soup_bench.py                  # 2 seeds x 5 ingredients; ~2.5 h on 2 CPU cores
    python benchmarks/soup_bench.py --seeds 0        # one seed (~1.2 h); run --seeds 1 later to add the other
    python benchmarks/soup_bench.py --report-only    # rebuild the section from the recorded results
    python benchmarks/soup_bench.py --smoke          # ~15 min: tiny data, 2 ingredients, 1 seed, 3 epochs
                                                     # (writes runs/soup_bench_smoke/report.md, never docs/)

What it does, per seed:

1. Trains the ingredients: `lit-ft fit -c configs/experiments/_base.yaml -c configs/experiments/<strategy>.yaml`
   (default strategy lp_ft, so every run has a linear-probe head for WiSE-FT) with the
   variants below, one starting point (EfficientNet-Lite0 ImageNet weights, zero head), the
   same 10% subset and validation split (``data.seed`` = the seed), and a different
   ``seed_everything`` each (which changes nothing in this recipe: the shuffling and augmentation
   draws come from ``data.seed``, the head starts at zero and there is no dropout; the runs
   differ by the variant's options). Runs that already have a best checkpoint are not re-run.
2. Builds the models: the best single run (best validation accuracy), the uniform and greedy
   soups, each with BatchNorm statistics recomputed (``bn_batches``) and averaged
   (``bn_batches: 0``), and WiSE-FT of the best single run at the validation-chosen a (grid
   0, 0.1, ..., 1), with BN statistics recomputed and interpolated, and at the a of the user
   rule ``--tolerance 0.005`` (the smallest a within 0.5 pt of the best validation accuracy).
   Then the robustness curve: every shifted set at a = 0.5, 0.7, 0.8, 0.9 (reported, never
   used to choose).
3. Tests each: clean accuracy on the full 10,000-image test set; the corruption grid (8
   corruptions x severities 1-5, :mod:`lit_ft.data.corruptions`) on a fixed, class-stratified
   2,000-image test subset (``--shift-subset``) to keep 40 shifted test sets affordable; the
   mean corruption accuracy is the mean over those 40 cells.

Results go one JSON file per seed (``runs/soup_bench/seed<N>/results.json``, updated after each
model, so an interrupted benchmark resumes where it stopped) and one line per (seed, model)
in ``docs/soup_runs.jsonl`` (committed), and the report to the section "Weight averaging and
robustness" of docs/results.md (through :mod:`benchmarks.markdown`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/soup_bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.markdown import atomic_write, write_section  # noqa: E402
from benchmarks.report import cpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "experiments"
DOCS = ROOT / "docs"
SECTION = "Weight averaging and robustness (10% of the labels)"
RECORDS = "soup_runs.jsonl"

# Ingredients: one starting point, different learning rates, augmentation and seeds.
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "lr_x2": ["model.optimizer.init_args.lr=0.002"],
    "lr_half": ["model.optimizer.init_args.lr=0.0005"],
    "crops_strong": ["data.init_args.scale=[0.35, 1.0]"],
    "aug_weak": ["data.init_args.scale=[0.9, 1.0]", "data.init_args.hflip=0.0"],
}
# The models compared, in report order: (key, label).
MODELS = [
    ("best_single", "best single run"),
    ("uniform", "uniform soup"),
    ("uniform_nobn", "uniform soup, BN averaged"),
    ("greedy", "greedy soup"),
    ("greedy_nobn", "greedy soup, BN averaged"),
    ("wise", "WiSE-FT of the best run"),
    ("wise_tol", "WiSE-FT, a by the 0.5-pt rule"),
    ("wise_nobn", "WiSE-FT, BN interpolated"),
]
# WiSE-FT's user rule (``lit-ft wise --tolerance``): the smallest a whose validation accuracy is
# within this of the best, trading in-distribution accuracy the issue allows (0.5 pt) for distance
# from the fine-tuned end. And the a's at which every shifted set is tested (the robustness curve).
TOLERANCE = 0.005
CURVE = [0.5, 0.7, 0.8, 0.9]


# --------------------------------------------------------------------------- ingredients


def train(out: Path, strategy: str, seed: int, name: str, index: int, args: argparse.Namespace) -> Path:
    """Fine-tune one ingredient (a subprocess, like the strategy suite); its best checkpoint."""
    run = out / f"seed{seed}" / name
    found = sorted((run / "checkpoints").glob("best-*.ckpt"))
    if found:
        return found[-1]
    cmd = [
        sys.executable, "-m", "lit_ft", "fit", "--config", str(CONFIGS / "_base.yaml"), "--config", str(CONFIGS / f"{strategy}.yaml"),
        "--seed_everything", str(1000 * seed + index), "--data.init_args.seed", str(seed),
        "--data.init_args.train_subset", str(args.fraction), "--trainer.max_epochs", str(args.epochs),
        "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", f"seed{seed}",
        "--trainer.logger.init_args.version", name, "--trainer.enable_progress_bar", "false",
        "--checkpoint.save_last", "false", "--test_after_fit", "false",
    ]
    for kv in [*VARIANTS[name], *args.set]:
        key, value = kv.split("=", 1)
        cmd += [f"--{key}", value]
    print(f"[soup_bench] seed {seed}: training {name}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    found = sorted((run / "checkpoints").glob("best-*.ckpt"))
    if not found:
        sys.exit(f"[soup_bench] {run} has no best checkpoint")
    return found[-1]


def train_minutes_of(best: Path) -> float | None:
    """Minutes of training of the run that wrote ``best`` (its BudgetCounter callback's state, from
    the run's last checkpoint when there is one), or None when the checkpoint does not say."""
    import torch

    last = best.with_name("last.ckpt")
    callbacks = torch.load(last if last.is_file() else best, map_location="cpu", weights_only=True).get("callbacks") or {}
    seconds = next((v.get("train_seconds") for k, v in callbacks.items() if str(k).startswith("BudgetCounter")), None)
    return None if seconds is None else round(float(seconds) / 60, 2)


# --------------------------------------------------------------------------- the models


def analyse(out: Path, strategy: str, seed: int, ckpts: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Build and test every model of one seed; results cached in ``results.json`` model by model."""
    import torch

    from lit_ft.experiment import build, evaluate
    from lit_ft.robustness import robustness_report
    from lit_ft.soup import make_soup
    from lit_ft.wise import wise_ft

    torch.set_num_threads(os.cpu_count() or 1)
    path = out / f"seed{seed}" / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    overrides = {"data.init_args.seed": seed, "data.init_args.train_subset": args.fraction, **dict(kv.split("=", 1) for kv in args.set)}
    dm = build([CONFIGS / "_base.yaml", CONFIGS / f"{strategy}.yaml"], overrides).datamodule
    kw: dict[str, Any] = {"accelerator": "cpu"}
    if args.smoke:
        kw["limit_test_batches"] = 2  # the clean test on 2 batches only
    paths = [str(p) for p in ckpts.values()]

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(results, indent=1) + "\n")

    def test(key: str, model: Any, val_acc: float, extra: dict[str, Any]) -> None:
        start = time.perf_counter()
        clean = evaluate(model, dm, split="test", **kw)["test/acc"]
        report = robustness_report(model, dm, subset=args.shift_subset, seed=0, clean=False, **kw)
        results[key] = {
            "val_acc": val_acc, "clean_acc": clean, "clean_subset_acc": report.clean_subset_acc,
            "mean_corruption_acc": report.mean_corruption_acc, "per_corruption": report.per_corruption(),
            "per_severity": {str(k): v for k, v in report.per_severity().items()},
            "test_seconds": time.perf_counter() - start, **extra,
        }
        save()
        print(f"[soup_bench] seed {seed} {key}: clean {clean:.4f}, mean corruption {report.mean_corruption_acc:.4f}", flush=True)

    for method in ("greedy", "uniform"):
        for suffix, bn in (("", args.bn_batches), ("_nobn", 0)):
            key = method + suffix
            if key in results and (key != "greedy" or "best_single" in results):
                continue
            start = time.perf_counter()
            soup = make_soup(paths, dm, method, bn_batches=bn, **kw)
            built = time.perf_counter() - start
            soup.save(out / f"seed{seed}" / f"{key}.ckpt")
            info = soup.checkpoint["lit_ft"]["soup"]
            if key == "greedy":  # ranks every ingredient: the best single run and the table of ingredients
                results["ingredients"] = [
                    {"variant": next(n for n, p in ckpts.items() if str(p) == r["checkpoint"]), "val_acc": r["val_acc"],
                     "in_greedy": r["in_soup"], "greedy_val_acc_with_it": r["soup_val_acc_with_it"]}
                    for r in soup.rows[:-1]
                ]
                best = soup.rows[0]["checkpoint"]
                single = load_model(best)
                test("best_single", single, soup.rows[0]["val_acc"],
                     {"checkpoint": best, "variant": results["ingredients"][0]["variant"]})
            test(key, soup.model, soup.val_acc, {"ingredients": len(info["ingredients"]), "bn": info["bn"], "build_seconds": built})
    best = results["best_single"]["checkpoint"]
    for key, bn, tolerance in (("wise", args.bn_batches, 0.0), ("wise_nobn", 0, 0.0), ("wise_tol", args.bn_batches, TOLERANCE)):
        if key in results:
            continue
        start = time.perf_counter()
        wise = wise_ft(best, dm, tolerance=tolerance, bn_batches=bn, **kw)
        built = time.perf_counter() - start
        wise.save(out / f"seed{seed}" / f"{key}.ckpt")
        test(key, wise.model, next(r["val_acc"] for r in wise.rows if r["chosen"]),
             {"alpha": wise.alpha, "head": wise.head, "grid": wise.rows, "build_seconds": built})
    if "wise_curve" not in results:  # every shifted set at several a (reported only, never used to choose)
        start = time.perf_counter()
        curve = wise_ft(best, dm, alphas=CURVE, bn_batches=args.bn_batches, robustness=True, shift_subset=args.shift_subset, **kw)
        results["wise_curve"] = {
            "points": [{k: r[k] for k in ("a", "val_acc", "clean_test_acc", "mean_corruption_acc")} for r in curve.rows],
            "seconds": time.perf_counter() - start,
        }
        save()
        print(f"[soup_bench] seed {seed} wise_curve: " + ", ".join(
            f"a={r['a']:g} corrupted {r['mean_corruption_acc']:.4f}" for r in curve.rows), flush=True)
    return results


def load_model(path: str) -> Any:
    from lit_ft import ImageClassifier

    model = ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True, pretrained=False)
    return model.eval()


# --------------------------------------------------------------------------- records and report


def record(docs: Path, seed: int, results: dict[str, Any], train_minutes: dict[str, float]) -> None:
    """One line per (seed, model) in docs/soup_runs.jsonl (a seed's lines are replaced)."""
    path = docs / RECORDS
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    lines = [x for x in lines if x["seed"] != seed]
    machine = f"{cpu()}, {os.cpu_count()} cores"
    for key, _ in MODELS:
        r = results.get(key)
        if r:
            lines.append({"seed": seed, "model": key, **{k: v for k, v in r.items() if k != "grid"}, "machine": machine})
    lines.append({"seed": seed, "model": "ingredients", "ingredients": results.get("ingredients", []), "train_minutes": train_minutes,
                  "machine": machine})
    if results.get("wise_curve"):
        lines.append({"seed": seed, "model": "wise_curve", **results["wise_curve"], "machine": machine})
    atomic_write(path, "".join(json.dumps(x, sort_keys=True) + "\n" for x in sorted(lines, key=lambda x: (x["seed"], x["model"]))))


def load_records(docs: Path) -> dict[int, dict[str, Any]]:
    path = docs / RECORDS
    out: dict[int, dict[str, Any]] = {}
    for line in (path.read_text().splitlines() if path.exists() else []):
        if line.strip():
            x = json.loads(line)
            out.setdefault(x["seed"], {})[x["model"]] = x
    return out


def _pct(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def report(records: dict[int, dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    """The section's markdown, from every recorded seed."""
    seeds = sorted(records)
    get = lambda key, field: [records[s][key][field] for s in seeds if key in records[s]]  # noqa: E731
    base = get("best_single", "clean_acc"), get("best_single", "mean_corruption_acc")
    sizes = ("the first 128 test images (smoke)", "256 images (smoke)") if args.smoke else ("the full 10,000-image test set", "2,000-image")
    lines = [
        f"Written by `{command}`. Fashion-MNIST, EfficientNet-Lite0 (ImageNet weights), 64 px, {args.fraction:g} of the "
        f"training labels, seeds {', '.join(map(str, seeds))}; per seed {len(VARIANTS)} ingredient runs of the "
        f"`{args.strategy}` recipe from one starting point ({', '.join(f'`{n}`' + (' ' + ' '.join(v) if v else '') for n, v in VARIANTS.items())}; "
        f"the same subset, validation split, shuffling and augmentation draws, all from `data.seed`; each run's own "
        f"`seed_everything` changes nothing in this recipe (zero-initialised head, no dropout), so the runs differ by "
        f"their options only). Clean accuracy: {sizes[0]}. "
        f"Corruptions: 8 kinds x severities 1-5 on a fixed, class-stratified {args.shift_subset}-image test subset; "
        f"mean corruption accuracy = the mean of those 40 cells. Soups and a are chosen on the {sizes[1]} validation split, "
        "never on the test set. Timed on " + ", ".join(sorted({x['machine'] for s in seeds for x in records[s].values()})) + ".",
        "",
        "| model | clean test acc % | mean corruption acc % | vs best single: clean / corrupted (pts) | val acc % | per seed (clean / corrupted) |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in MODELS:
        clean, corr, val = get(key, "clean_acc"), get(key, "mean_corruption_acc"), get(key, "val_acc")
        if not clean:
            continue
        extra = ""
        if key.startswith("wise"):
            extra = " (a = " + " / ".join(f"{a:g}" for a in get(key, "alpha")) + ")"
        elif key != "best_single":
            extra = " (" + " / ".join(str(n) for n in get(key, "ingredients")) + f" of {len(VARIANTS)} runs)"
        delta = ""
        if key != "best_single" and len(clean) == len(base[0]):
            dc = 100 * statistics.mean(c - b for c, b in zip(clean, base[0]))
            dm = 100 * statistics.mean(c - b for c, b in zip(corr, base[1]))
            delta = f"{dc:+.1f} / {dm:+.1f}"
        per = "; ".join(f"{100 * c:.1f} / {100 * m:.1f}" for c, m in zip(clean, corr))
        lines.append(f"| {label}{extra} | {_pct(clean)} | {_pct(corr)} | {delta} | {_pct(val)} | {per} |")
    # Targets, honestly.
    lines.append("")
    if base[0] and get("greedy", "clean_acc"):
        wins = [g >= b for g, b in zip(get("greedy", "clean_acc"), base[0])]
        lines.append(f"- Target greedy soup >= best single on clean test: {'met' if all(wins) else 'missed'} "
                     f"({sum(wins)} of {len(wins)} seeds).")
    def wise_verdict(key: str) -> str:
        """The WiSE-FT target judged on ``key``'s mean gains over the best single run."""
        dc = statistics.mean(100 * (w - b) for w, b in zip(get(key, "clean_acc"), base[0]))
        dm = statistics.mean(100 * (w - b) for w, b in zip(get(key, "mean_corruption_acc"), base[1]))
        return f"{'met' if dm >= 2 and dc >= -0.5 else 'missed'} (mean {dm:+.1f} pts corrupted, {dc:+.1f} pts clean"

    alphas_of = lambda key: " / ".join(f"{a:g}" for a in get(key, "alpha"))  # noqa: E731
    if base[0] and get("wise", "clean_acc"):
        lines.append(f"- Target WiSE-FT >= +2 pts mean corruption accuracy with <= 0.5 pt clean loss: {wise_verdict('wise')}; "
                     f"a chosen on validation: {alphas_of('wise')}).")
    if base[0] and get("wise_tol", "clean_acc"):
        lines.append(f"- The same target with the user rule `--tolerance {TOLERANCE:g}` (the smallest a within "
                     f"{100 * TOLERANCE:g} pt of the best validation accuracy, a = {alphas_of('wise_tol')}): {wise_verdict('wise_tol')}).")
    # Per corruption: where robustness was won or lost.
    names = list(records[seeds[0]]["best_single"]["per_corruption"])
    columns = {k: [round(100 * statistics.mean(p[c] for p in get(k, "per_corruption")), 1) for c in names]
               for k, _ in MODELS if get(k, "per_corruption")}
    shown: list[str] = []
    same: dict[str, list[str]] = {}  # a model whose every cell equals a column's is that model (greedy of 1 run, a = 1)
    for key, cells in columns.items():
        twin = next((k for k in shown if columns[k] == cells), None)
        if twin is None:
            shown.append(key)
        else:
            same.setdefault(twin, []).append(key)
    lines += ["", "Mean accuracy % over severities 1-5, per corruption (mean over seeds):", "",
              "| corruption | " + " | ".join(dict(MODELS)[k] for k in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for i, c in enumerate(names):
        lines.append(f"| {c} | " + " | ".join(f"{columns[k][i]:.1f}" for k in shown) + " |")
    for twin, keys in same.items():
        lines += ["", f"Not shown, the same in every cell as the {dict(MODELS)[twin]}: " + ", ".join(dict(MODELS)[k] for k in keys) + "."]
    # Robustness along the WiSE-FT path, with a = 1 (the best single run) as the reference.
    curves = {s: records[s]["wise_curve"]["points"] for s in seeds if "wise_curve" in records[s]}
    if curves:
        ref = {s: {"a": 1.0, "val_acc": records[s]["best_single"]["val_acc"], "clean_test_acc": records[s]["best_single"]["clean_subset_acc"],
                   "mean_corruption_acc": records[s]["best_single"]["mean_corruption_acc"]} for s in curves}
        alphas = sorted({p["a"] for pts in curves.values() for p in pts} | {1.0})
        lines += ["", f"Along the WiSE-FT path of the best run (BN recomputed; clean and corrupted on the {args.shift_subset}-image "
                  "test subset of the shifted sets, so clean differs from the table above; a = 1 is the best single run; "
                  "measured here, never used to choose a):", "",
                  "| a | val acc % | clean acc % (subset) | mean corruption acc % | per seed (val / clean / corrupted) |", "|---|---|---|---|---|"]
        for a in alphas:
            pts = [next((p for p in [*curves[s], ref[s]] if p["a"] == a), None) for s in sorted(curves)]
            pts = [p for p in pts if p is not None]
            per = "; ".join(f"{100 * p['val_acc']:.1f} / {100 * p['clean_test_acc']:.1f} / {100 * p['mean_corruption_acc']:.1f}" for p in pts)
            lines.append(f"| {a:g} | {_pct([p['val_acc'] for p in pts])} | {_pct([p['clean_test_acc'] for p in pts])} | "
                         f"{_pct([p['mean_corruption_acc'] for p in pts])} | {per} |")
    # The WiSE-FT curve and the ingredients.
    for s in seeds:
        grid = records[s].get("wise", {}).get("grid_summary")
        if grid:
            lines += ["", f"WiSE-FT validation accuracy over a (seed {s}): " + ", ".join(grid)]
    lines += ["", "Ingredients (validation accuracy %, in the greedy soup?):", ""]
    for s in seeds:
        ing = records[s].get("ingredients", {}).get("ingredients", [])
        mins = records[s].get("ingredients", {}).get("train_minutes", {})
        lines.append(f"- seed {s}: " + ", ".join(
            f"{i['variant']} {100 * i['val_acc']:.1f}{' (kept)' if i['in_greedy'] else ''}" for i in ing)
            + (f"; training {sum(mins.values()):.0f} min for {len(mins)} runs" if mins else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--strategy", default="lp_ft", help="configs/experiments/<strategy>.yaml for every ingredient")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--bn-batches", type=int, default=32)
    p.add_argument("--shift-subset", type=int, default=2000)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every ingredient")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny settings to check the pipeline (not written to docs/)")
    args = p.parse_args(argv)
    # The command that measures (a --report-only rebuild names the run it rebuilds, not itself).
    command = " ".join(["python benchmarks/soup_bench.py", *(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only")])
    if args.smoke:
        args.seeds, args.epochs, args.shift_subset = args.seeds[:1], 3, 64
        args.variants = args.variants[:2]
        args.fraction = 256  # images
        args.set = [*args.set, "data.init_args.val_split=256", "data.init_args.eval_batch_size=64",
                    "model.lr_scheduler.init_args.warmup_steps=0"]
    for name in list(VARIANTS):
        if name not in args.variants:
            del VARIANTS[name]
    out = ROOT / "runs" / ("soup_bench_smoke" if args.smoke else "soup_bench")
    docs = out if args.smoke else DOCS
    if not args.report_only:
        for seed in args.seeds:
            start = time.perf_counter()
            ckpts = {name: train(out, args.strategy, seed, name, i, args) for i, name in enumerate(VARIANTS)}
            train_minutes = {name: m for name, ck in ckpts.items() if (m := train_minutes_of(ck)) is not None}
            results = analyse(out, args.strategy, seed, ckpts, args)
            grid = results.get("wise", {}).get("grid") or []
            if "wise" in results:
                results["wise"]["grid_summary"] = [f"{r['a']:g}: {100 * r['val_acc']:.1f}" for r in grid]
            record(docs, seed, results, train_minutes)
            print(f"[soup_bench] seed {seed} done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    records = load_records(docs)
    if not records:
        sys.exit("[soup_bench] nothing recorded yet")
    body = report(records, args, command)
    if args.smoke:
        atomic_write(out / "report.md", f"## {SECTION} (smoke)\n\n{body}\n")
        print(body)
    else:
        print(write_section(DOCS / "results.md", SECTION, body))


if __name__ == "__main__":
    main()
