"""Smaller models from a fine-tuned one: distillation and structured pruning on Fashion-MNIST, 64 px,
measured by test accuracy per CPU millisecond.

    python benchmarks/smaller.py                    # every step not done yet, then the report
    python benchmarks/smaller.py --teacher lite0    # skip the Lite2 teacher: the Lite0 run teaches
    python benchmarks/smaller.py --report-only      # rebuild the section from docs/results_smaller.json
    python benchmarks/smaller.py --smoke            # the whole pipeline on tiny settings (minutes);
                                                    # runs/smaller-smoke, report printed, docs untouched

The steps, each a ``lit-ft`` command in a subprocess (``_base`` = configs/experiments/_base.yaml),
each logging to ``<runs>/<step>/version_0``:

=============  ========================================================================
teacher        ``fit _base teacher_lite2.yaml`` (EfficientNet-Lite2, ImageNet weights)
lite0          ``fit _base cpu_best.yaml``: EfficientNet-Lite0, the student without a teacher,
               and the model that is pruned
lite0_kd       the same + ``--model.distill.teacher <teacher's best>`` (same budget)
mnv3           ``fit _base student_mnv3.yaml``: MobileNetV3-Small 0.5x from scratch
mnv3_kd        the same + the teacher
pruned         ``prune _base cpu_best.yaml --ckpt_path <lite0's best> --ratio R``, then
               ``test`` of the pruned weights before any fine-tuning
pruned_ft      ``fit _base pruned_ft.yaml --model.pretrained <pruned>``
pruned_ft_kd   the same + ``--model.distill.teacher <lite0's best>`` (the unpruned model;
               ``--recovery-teacher teacher`` uses the Lite2 teacher instead)
=============  ========================================================================

Then parameters, MACs (torch-pruning's counter) and CPU latency at batch 1 and 32 of every
finished model, all in this one process side by side (``lit_ft.prune.measure_latency``), and
the section "Smaller models: distillation and pruning" of docs/results.md from those numbers
and each run's test accuracy (read from its event files). Everything measured is also kept in
docs/results_smaller.json, so ``--report-only`` rebuilds the section on a fresh clone. A step
whose run already finished is not run again; an unfinished one is removed and re-run.

Owns: this suite's steps, its record and its section. Reuses the strategy suite's run records
(``benchmarks.suite.records``: ``begin_run``, ``read_run``) and markdown writer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as `python benchmarks/smaller.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.markdown import atomic_write, write_section  # noqa: E402
from benchmarks.report import cpu  # noqa: E402
from benchmarks.suite.records import begin_run, read_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "experiments"
RUNS = ROOT / "runs" / "smaller"
DOCS = ROOT / "docs"
RECORD = "results_smaller.json"
SECTION = "Smaller models: distillation and pruning"
INPUT = (3, 64, 64)
TARGET_KD_POINTS, TARGET_PRUNED_POINTS, TARGET_SPEEDUP = 1.0, 1.0, 1.5
# Tiny settings that run every step in minutes: the pipeline, not the numbers.
SMOKE = ["--data.init_args.train_subset", "256", "--data.init_args.val_split", "64", "--trainer.max_epochs", "1",
         "--trainer.limit_test_batches", "2", "--trainer.strategy", "auto", "--trainer.devices", "1"]
ONE_PROCESS = ["--trainer.strategy", "auto", "--trainer.devices", "1"]  # commands that do not train

# step -> (config after _base, what it is)
FITS = {
    "teacher": ("teacher_lite2", "EfficientNet-Lite2, ImageNet weights, fine-tuned: the teacher"),
    "lite0": ("cpu_best", "EfficientNet-Lite0, ImageNet weights, fine-tuned"),
    "lite0_kd": ("cpu_best", "the same, distilled from the teacher"),
    "mnv3": ("student_mnv3", "MobileNetV3-Small 0.5x from scratch"),
    "mnv3_kd": ("student_mnv3", "the same, distilled from the teacher"),
    "pruned_ft": ("pruned_ft", "Lite0 pruned, then fine-tuned"),
    "pruned_ft_kd": ("pruned_ft", "Lite0 pruned, then fine-tuned with a teacher"),
}
ORDER = ["teacher", "lite0", "lite0_kd", "mnv3", "mnv3_kd", "pruned", "pruned_ft", "pruned_ft_kd"]


# --------------------------------------------------------------------------- running the steps


def base_args(config: str) -> list[str]:
    return ["-c", str(CONFIGS / "_base.yaml"), "-c", str(CONFIGS / f"{config}.yaml")]


def log_args(runs: Path, step: str) -> list[str]:
    return ["--trainer.logger.init_args.save_dir", str(runs), "--trainer.logger.init_args.name", step,
            "--trainer.logger.init_args.version", "0", "--trainer.enable_progress_bar", "false"]


def best_checkpoint(run: Path) -> Optional[Path]:
    found = sorted((run / "checkpoints").glob("best-*.ckpt"))
    return found[-1] if found else None


def lit_ft(*words: str) -> None:
    cmd = [sys.executable, "-m", "lit_ft", *words]
    print("[smaller] " + " ".join(str(w) for w in cmd[2:]), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def pruned_checkpoint(runs: Path, ratio: float) -> Path:
    return runs / "pruned" / f"lite0-pruned{round(ratio * 100)}.ckpt"


def finished_models(runs: Path, ratio: float) -> dict[str, Path]:
    """{step: the checkpoint its model is measured from} for every finished step on disk."""
    models = {step: best_checkpoint(runs / step / "version_0") for step in FITS}
    models = {step: ckpt for step, ckpt in models.items() if ckpt is not None and read_run(ckpt.parent.parent) is not None}
    if pruned_checkpoint(runs, ratio).is_file():
        models["pruned"] = pruned_checkpoint(runs, ratio)
    return {step: models[step] for step in ORDER if step in models}


def run_steps(args: argparse.Namespace, runs: Path) -> None:
    """Run every wanted step not finished yet (and those it needs)."""
    extra = SMOKE if args.smoke else []
    machine = f"{cpu()}, {os.cpu_count()} cores"
    distill = ["--model.distill.alpha", str(args.alpha), "--model.distill.temperature", str(args.temperature)]

    def fit(step: str, *more: str) -> Path:
        run = runs / step / "version_0"
        if read_run(run) is None or best_checkpoint(run) is None:
            begin_run(run, machine)
            lit_ft("fit", *base_args(FITS[step][0]), *log_args(runs, step), "--checkpoint.save_last", "false", *extra, *more)
        return best_checkpoint(run)

    wanted = lambda step: not args.only or step in args.only  # noqa: E731
    needs_teacher = any(wanted(s) for s in ("teacher", "lite0_kd", "mnv3_kd")) or (
        wanted("pruned_ft_kd") and args.recovery_teacher == "teacher")
    teacher = fit("teacher") if args.teacher == "lite2" and needs_teacher else None
    lite0 = fit("lite0")  # every other step needs it: the student without a teacher, the model pruned
    teacher = teacher or lite0
    if args.teacher == "lite2" and wanted("lite0_kd"):
        fit("lite0_kd", "--model.distill.teacher", str(teacher), *distill)
    if wanted("mnv3"):
        fit("mnv3")
    if wanted("mnv3_kd"):
        fit("mnv3_kd", "--model.distill.teacher", str(teacher), *distill)
    if not any(wanted(s) for s in ("pruned", "pruned_ft", "pruned_ft_kd")):
        return
    pruned = pruned_checkpoint(runs, args.ratio)
    run = runs / "pruned" / "version_0"
    if not pruned.is_file() or read_run(run) is None:
        pruned.unlink(missing_ok=True)
        begin_run(run, machine)
        lit_ft("prune", *base_args("cpu_best"), *ONE_PROCESS, "--ckpt_path", str(lite0), "--ratio", str(args.ratio),
               "--importance", args.importance, "--steps", str(args.steps), "--out", str(pruned), "--latency_rounds", "0",
               "--bn_batches", str(args.bn_batches))
        # The pruned weights as they are, before any fine-tuning: `test` builds the model from them.
        lit_ft("test", *base_args("pruned_ft"), *log_args(runs, "pruned"), *extra, *ONE_PROCESS,
               "--model.pretrained", str(pruned))
    recovery = teacher if args.recovery_teacher == "teacher" else lite0
    if wanted("pruned_ft"):
        fit("pruned_ft", "--model.pretrained", str(pruned))
    if wanted("pruned_ft_kd"):
        fit("pruned_ft_kd", "--model.pretrained", str(pruned), "--model.distill.teacher", str(recovery), *distill)


# --------------------------------------------------------------------------- measuring the models


def measure(models: dict[str, Path], rounds: int, threads: int) -> dict[str, dict[str, Any]]:
    """Parameters, MACs and CPU latency (batch 1 and 32) of every model, side by side."""
    import torch

    from lit_ft import backbones as B
    from lit_ft.prune import macs, measure_latency, param_count

    torch.set_num_threads(threads)
    nets = {}
    for step, ckpt in models.items():
        hp = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]
        nets[step] = B.create_backbone(hp["backbone"], len(hp["class_names"]), pretrained=str(ckpt), head_init="timm").eval()
    latency = measure_latency(nets, INPUT, batch_sizes=(1, 32), rounds=rounds, channels_last=True)
    return {
        step: {"params": param_count(net), "macs": macs(net, INPUT), "ms_b1": latency[step][1], "ms_b32": latency[step][32]}
        for step, net in nets.items()
    }


# --------------------------------------------------------------------------- the report


def report(record: dict[str, Any]) -> str:
    """The markdown section from the record (pure: tested without any run)."""
    runs, costs, s = record["runs"], record["costs"], record["settings"]
    rows = []
    for step in ORDER:
        r, c = runs.get(step), costs.get(step)
        if r is None:
            continue
        acc = 100 * r["acc"]
        cells = [f"`{step}`", DESCRIPTIONS(s).get(step, step), f"{acc:.2f}"]
        if c:
            cells += [f"{c['params'] / 1e6:.2f} M", f"{c['macs'] / 1e6:.0f} M", f"{c['ms_b1']:.2f}", f"{c['ms_b32']:.1f}",
                      f"{acc / c['ms_b1']:.1f}", f"{acc / (c['ms_b32'] / 32):.0f}"]
        else:
            cells += [""] * 6
        cells.append(f"{r['wall'] / 60:.1f}" if r.get("wall") == r.get("wall") and r.get("wall") is not None else "")
        rows.append(cells)
    header = ["run", "what", "test acc %", "params", "MACs", "CPU ms, batch 1", "CPU ms, batch 32",
              "acc % per ms (batch 1)", "acc % per ms per image (batch 32)", "wall min"]
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    lines = [
        f"Written by `{record['command']}` ({record['date']}). Fashion-MNIST at 64 px, test accuracy on the full "
        "10,000-image test set from each run's best-validation checkpoint. Parameters and MACs of one 64 px image "
        f"(torch-pruning's counter); CPU latency: median over {s['rounds']} rounds, all models timed side by side in one "
        f"process, {s['threads']} thread(s), channels_last, eval mode. Distillation: alpha {s['alpha']}, temperature "
        f"{s['temperature']}, the teacher sees the student's own augmented batch. Pruning: {s['ratio']:.0%} of the "
        f"parameters removed as whole channels ({s['importance']} importance, {s['steps']} step(s)). Equal budget: "
        "a student with and without a teacher trains on the same images for the same epochs (distillation adds the "
        "teacher's forward passes to the wall time). Machine: " + record["machine"] + ".",
        "",
        table,
        "",
    ]
    lines += verdicts(runs, costs)
    lines += ["", "Reproduce (about 1.5 h on 2 CPU cores):", "", "    python benchmarks/smaller.py"]
    return "\n".join(lines)


def DESCRIPTIONS(settings: dict[str, Any]) -> dict[str, str]:  # noqa: N802 - a table of texts
    texts = {step: what for step, (_, what) in FITS.items()}
    bn = settings.get("bn_batches")  # records from before `prune` recomputed BN statistics have none
    texts["pruned"] = f"Lite0 with {settings['ratio']:.0%} of its parameters pruned, not fine-tuned" + (
        ", BN statistics of the unpruned model (recorded before `prune` recomputed them)" if bn is None
        else f", BN statistics recomputed on {bn} batches" if bn else ", BN statistics of the unpruned model (`--bn-batches 0`)")
    texts["pruned_ft_kd"] = "Lite0 pruned, then fine-tuned with the " + (
        "Lite2 teacher" if settings.get("recovery_teacher") == "teacher" else "unpruned Lite0 as teacher")
    if settings.get("teacher") == "lite0":
        texts["lite0"] = "EfficientNet-Lite0, ImageNet weights, fine-tuned: the teacher"
    return texts


def verdicts(runs: dict[str, Any], costs: dict[str, Any]) -> list[str]:
    """The issue's targets, each with the measured numbers it was judged on."""
    out = []

    def pts(a: str, b: str) -> Optional[float]:
        return 100 * (runs[a]["acc"] - runs[b]["acc"]) if a in runs and b in runs else None

    for student in ("lite0", "mnv3"):
        gain = pts(f"{student}_kd", student)
        if gain is not None:
            ok = "met" if gain >= TARGET_KD_POINTS else "missed"
            out.append(f"- Distillation into `{student}`: {gain:+.2f} points over the same student without a teacher "
                       f"(target >= +{TARGET_KD_POINTS:g}: {ok}).")
    for tuned in ("pruned_ft", "pruned_ft_kd"):
        loss = pts(tuned, "lite0")
        if loss is None:
            continue
        line = f"- `{tuned}` vs unpruned `lite0`: {loss:+.2f} points (target >= -{TARGET_PRUNED_POINTS:g}: " \
               f"{'met' if loss >= -TARGET_PRUNED_POINTS else 'missed'})"
        if tuned in costs and "lite0" in costs:
            a, b = costs["lite0"], costs[tuned]
            speed = [a["ms_b1"] / b["ms_b1"], a["ms_b32"] / b["ms_b32"]]
            line += (f"; CPU latency {speed[0]:.2f}x lower at batch 1, {speed[1]:.2f}x at batch 32 (target >= "
                     f"{TARGET_SPEEDUP:g}x: {'met' if min(speed) >= TARGET_SPEEDUP else 'missed'}), with "
                     f"{a['params'] / b['params']:.2f}x fewer parameters and {a['macs'] / b['macs']:.2f}x fewer MACs")
        out.append(line + ".")
    if "pruned" in runs and "lite0" in runs:
        after = [f"`{t}` {100 * runs[t]['acc']:.2f}%" for t in ("pruned_ft", "pruned_ft_kd") if t in runs]
        out.append(f"- Pruning alone, before any fine-tuning: {pts('pruned', 'lite0'):+.2f} points against `lite0` "
                   f"({100 * runs['pruned']['acc']:.2f}%)" + (f"; fine-tuned: {', '.join(after)}." if after else "."))
    return out


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", choices=["lite2", "lite0"], default="lite2", help="lite0: no separate teacher run")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of lite0's parameters to prune")
    p.add_argument("--importance", choices=["magnitude", "taylor"], default="magnitude")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--bn-batches", type=int, default=32, help="lit-ft prune --bn_batches: BN statistics recomputed after pruning")
    p.add_argument("--recovery-teacher", choices=["unpruned", "teacher"], default="unpruned")
    p.add_argument("--only", nargs="+", choices=ORDER, help="run only these steps (and the ones they need: lite0 always, "
                   "the teacher for distillation, pruned for pruned_ft*)")
    p.add_argument("--rounds", type=int, default=7, help="latency rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the latency measurement")
    p.add_argument("--runs", type=Path, help="run directories (default runs/smaller, runs/smaller-smoke with --smoke)")
    p.add_argument("--docs", type=Path, default=DOCS, help="where results.md and the record go (not written with --smoke)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks the pipeline in minutes")
    args = p.parse_args(argv)
    runs = args.runs or (ROOT / "runs" / ("smaller-smoke" if args.smoke else "smaller"))
    record_path = args.docs / RECORD
    if args.report_only:
        record = json.loads(record_path.read_text())
    else:
        started = time.time()
        run_steps(args, runs)
        costs = measure(finished_models(runs, args.ratio), 1 if args.smoke else args.rounds, args.threads)
        results = {step: read_run(runs / step / "version_0") for step in ORDER}
        record = {
            "command": "python benchmarks/smaller.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{cpu()}, {os.cpu_count()} cores",
            "settings": {"teacher": args.teacher, "alpha": args.alpha, "temperature": args.temperature, "ratio": args.ratio,
                         "importance": args.importance, "steps": args.steps, "bn_batches": args.bn_batches, "recovery_teacher": args.recovery_teacher,
                         "rounds": 1 if args.smoke else args.rounds, "threads": args.threads, "smoke": args.smoke},
            "runs": {k: v for k, v in results.items() if v is not None},
            "costs": costs,
            "total_minutes": (time.time() - started) / 60,
        }
        if not args.smoke:
            atomic_write(record_path, json.dumps(record, indent=1) + "\n")
    section = report(record)
    if args.smoke:
        print(section)
    else:
        print(write_section(args.docs / "results.md", SECTION, section))


if __name__ == "__main__":
    main()
