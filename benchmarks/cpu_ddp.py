"""On a multi-core CPU: one training process using every core vs DDP with one process per core,
and DDP with the lowest layer groups frozen (the backward pass stops above them).

    python -m benchmarks.cpu_ddp [--steps 70] [--rounds 2]

Each runs `lit-ft fit` on the suite's layer-decay recipe (configs/experiments/_base.yaml with
layer_decay.yaml, layer_decay_ddp.yaml or cpu_best.yaml: EfficientNet-Lite0, Fashion-MNIST, 64 px, 64 images per
optimizer step in all), alternating over rounds so all see the same machine load. Throughput is the
optimizer steps between the 10th and the last logged step over the wall time between them
(from the runs' event files), times 64 images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.experiments import config_args
from benchmarks.report import ROOT, command, table, write_section

VARIANTS = {  # strategies of configs/experiments/
    "one process, all cores as threads (batch 64)": "layer_decay",
    "DDP, one process per core (batch 32 each)": "layer_decay_ddp",
    "DDP + stem, blocks.0-1 frozen (cpu_best)": "cpu_best",
}
GLOBAL_BATCH = 64


def steps_per_second(strategy: str, steps: int, out: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    subprocess.run(
        [sys.executable, "-m", "lit_ft", "fit", *config_args(strategy), "--data.init_args.train_subset", "12800",
         "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
         "--test_after_fit", "false", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "10",
         "--trainer.logger.init_args.save_dir", str(out), "--checkpoint.save_last", "false"],
        cwd=out, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    (run,) = [p for p in out.rglob("version_*") if p.is_dir()]
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    return (loss[-1].step - loss[0].step) / (loss[-1].wall_time - loss[0].wall_time)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=70)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    rates: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(args.rounds):
        for name, strategy in VARIANTS.items():
            with tempfile.TemporaryDirectory() as d:
                rates[name].append(steps_per_second(strategy, args.steps, Path(d)))
            print(name, f"{rates[name][-1] * GLOBAL_BATCH:.0f} img/s", flush=True)
    base = statistics.median(rates[next(iter(VARIANTS))])
    rows = [[k, f"{statistics.median(v) * GLOBAL_BATCH:.0f}", f"{statistics.median(v) / base:.2f}x",
             " / ".join(f"{r * GLOBAL_BATCH:.0f}" for r in v)] for k, v in rates.items()]
    body = (
        f"EfficientNet-Lite0, Fashion-MNIST 64 px, layer-decay recipe, {GLOBAL_BATCH} images per optimizer step, "
        f"{os.cpu_count()} cores; training steps 10 to {args.steps} of each run, {args.rounds} alternating rounds.\n\n"
        + table(["how", "train img/s (median)", "vs one process", "per round"], rows)
        + "\n\nOne process with a thread per core leaves cores idle through the single-threaded parts of "
        "each step (Python, small ops, data loading); one DDP process per core overlaps them, at the cost "
        "of a gradient all-reduce per step (gloo, shared memory). Use `trainer: {accelerator: cpu, strategy: ddp, "
        "devices: <cores>}` with the batch size per process divided by the cores."
    )
    write_section("CPU: one process vs DDP", body, command())


if __name__ == "__main__":
    main()
