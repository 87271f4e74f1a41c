"""Step time of frozen-backbone phases vs a full fine-tune, through lit-ft's own training step.

    python -m benchmarks.frozen_step [--backbone efficientnet_lite0] [--image-size 64] [--batch 64]

Runs each freeze plan for the same number of steps on the same random batch, interleaved
over several rounds, and reports median step times as ratios to the full fine-tune.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch

from benchmarks.report import IterTimer, command, median, table, write_section
from lit_ft import ImageClassifier
from lit_ft.schedules import Full, Gradual, LinearProbe


def run(plan, args) -> list[float]:
    torch.manual_seed(0)
    model = ImageClassifier(args.backbone, num_classes=10, freeze=plan, channels_last=True)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch,))
    loader = torch.utils.data.DataLoader([(x[i], y[i]) for i in range(args.batch)] * args.steps, batch_size=args.batch)
    timer = IterTimer()
    L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer],
    ).fit(model, loader)
    return timer.times(skip=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    plans = {
        "full fine-tune": Full,
        "gradual, top 3 groups": lambda: Gradual(every=1000, start=3),
        "linear probe (backbone frozen)": LinearProbe,
    }
    times: dict[str, list[float]] = {k: [] for k in plans}
    for _ in range(args.rounds):  # interleave so machine noise hits every plan alike
        for name, plan in plans.items():
            times[name] += run(plan(), args)
    full = median(times["full fine-tune"])
    rows = [
        [name, f"{median(t) * 1000:.1f}", f"{args.batch / median(t):.0f}", f"{median(t) / full:.2f}"]
        for name, t in times.items()
    ]
    body = (
        f"{args.backbone}, {args.image_size} px, batch {args.batch}, fp32, channels_last, CPU; "
        f"median of {len(times['full fine-tune'])} steps per plan, {args.rounds} interleaved rounds.\n\n"
        + table(["plan", "step ms", "img/s", "step / full"], rows)
    )
    write_section("Frozen-backbone step vs full fine-tune", body, command())


if __name__ == "__main__":
    main()
