"""Framework overhead: lit-ft's training step vs a hand-written PyTorch loop.

    python -m benchmarks.overhead [--backbone resnet18] [--image-size 64] [--batches 32 64]

Same model, same in-memory batches, same optimizer (AdamW), fp32, CPU. lit-ft runs its full
Lightning step (freeze plan, per-group LRs, metrics, logging to TensorBoard every 50 steps);
the plain loop does forward, loss, backward, step, zero_grad. Each iteration is timed from
the start of one batch to the start of the next (data fetch included for both), the two are
interleaved over several rounds, and the ratio of medians is reported.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import timm
import torch
import torch.nn.functional as F

from benchmarks.report import IterTimer, command, median, table, write_section
from lit_ft import ImageClassifier


def batches(n: int, batch: int, size: int) -> torch.utils.data.DataLoader:
    """Pre-made batches served by a DataLoader (batch_size=None: items are whole batches)."""
    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]
    return torch.utils.data.DataLoader(items, batch_size=None)


def run_lit_ft(args, data) -> list[float]:
    torch.manual_seed(0)
    model = ImageClassifier(args.backbone, num_classes=10, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    timer = IterTimer()
    with tempfile.TemporaryDirectory() as d:
        L.Trainer(
            default_root_dir=d, accelerator="cpu", max_epochs=1, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
            logger=L.pytorch.loggers.TensorBoardLogger(d), log_every_n_steps=50,
        ).fit(model, data)
    return timer.times(args.warmup)


def run_plain(args, data) -> list[float]:
    torch.manual_seed(0)
    model = timm.create_model(args.backbone, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    times, t = [], time.perf_counter()
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        now = time.perf_counter()
        times.append(now - t)
        t = now
    return times[args.warmup :]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rows = []
    for bs in args.batches:
        data = batches(args.steps, bs, args.image_size)
        lit, plain = [], []
        for _ in range(args.rounds):
            plain += run_plain(args, data)
            lit += run_lit_ft(args, data)
        ratio = median(lit) / median(plain)
        rows.append([bs, f"{median(plain) * 1000:.1f}", f"{median(lit) * 1000:.1f}", f"{ratio:.3f}"])
        print(rows[-1], flush=True)
    body = (
        f"{args.backbone}, {args.image_size} px, AdamW, fp32, CPU; median iteration time over "
        f"{args.rounds} interleaved rounds of {args.steps - args.warmup} timed steps. Target: ratio <= 1.03 at batch >= 32.\n\n"
        + table(["batch", "plain loop ms", "lit-ft ms", "lit-ft / plain"], rows)
    )
    write_section("Framework overhead vs a hand-written loop", body, command())


if __name__ == "__main__":
    main()
