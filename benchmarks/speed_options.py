"""The effect of each speed option on training throughput, measured side by side.

    python -m benchmarks.speed_options [--backbone efficientnet_lite0] [--image-size 64] [--batch 64]

Each option is one line of YAML (model.channels_last, trainer.precision, model.compile,
model.grad_checkpointing). Throughput is the median training iteration through lit-ft's
Lightning step on the same in-memory batches; options are interleaved over rounds.
"""

from __future__ import annotations

import argparse
import tempfile

import lightning as L
import torch

from benchmarks.report import IterTimer, command, median, table, write_section
from lit_ft import ImageClassifier

OPTIONS = {
    "baseline (fp32, NCHW)": ({}, {}),
    "channels_last": ({"channels_last": True}, {}),
    "channels_last + bf16-mixed": ({"channels_last": True}, {"precision": "bf16-mixed"}),
    "channels_last + compile": ({"channels_last": True, "compile": True}, {}),
    "grad_checkpointing": ({"grad_checkpointing": True}, {}),
}


def run(model_kw, trainer_kw, args, loader) -> list[float]:
    torch.manual_seed(0)
    model = ImageClassifier(args.backbone, num_classes=10, **model_kw)
    timer = IterTimer()
    with tempfile.TemporaryDirectory() as d:
        L.Trainer(
            default_root_dir=d, accelerator="auto", max_epochs=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], **trainer_kw,
        ).fit(model, loader)
    return timer.times(args.warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    items = [
        (torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
        for _ in range(args.steps)
    ]
    loader = torch.utils.data.DataLoader(items, batch_size=None)
    times: dict[str, list[float]] = {k: [] for k in OPTIONS}
    for _ in range(args.rounds):
        for name, (model_kw, trainer_kw) in OPTIONS.items():
            times[name] += run(model_kw, trainer_kw, args, loader)
            print(name, f"{args.batch / median(times[name]):.0f} img/s", flush=True)
    base = median(times["baseline (fp32, NCHW)"])
    rows = [[k, f"{args.batch / median(v):.0f}", f"{base / median(v):.2f}x"] for k, v in times.items()]
    device = "GPU" if torch.cuda.is_available() else "CPU"
    body = (
        f"{args.backbone}, {args.image_size} px, batch {args.batch}, AdamW, {device}; median of "
        f"{args.rounds} x {args.steps - args.warmup} timed iterations per option (compile time excluded by the warm-up).\n\n"
        + table(["option", "train img/s", "vs baseline"], rows)
    )
    write_section(f"Speed options ({device})", body, command())


if __name__ == "__main__":
    main()
