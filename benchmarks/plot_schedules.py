"""Draw every freeze strategy's LR/freeze plan side by side -> docs/schedules.png (for the README).

    python -m benchmarks.plot_schedules [--out docs/schedules.png] [--backbone resnet18]

The plans are replayed by ``lit_ft.notebook.schedule_data`` through each model's real
``configure_optimizers`` and scheduler: AdamW at lr 1e-3, ``layer_decay`` 0.7, and
``WarmupCosineLR`` with one epoch of warm-up, 10 epochs of 100 steps.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from lit_ft import ImageClassifier
from lit_ft.notebook import plot_schedules
from lit_ft.optim import WarmupCosineLR
from lit_ft.schedules import LPFT, FreezeSchedule, FreezeUnfreeze, Full, Gradual, LinearProbe, Milestones, Surgical

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 100
EPOCHS = 10


def strategies() -> dict[str, FreezeSchedule]:
    """One example of each plan, as a README reader would configure it."""
    return {
        "Full": Full(),
        "LinearProbe": LinearProbe(),
        "FreezeUnfreeze(epochs=2)": FreezeUnfreeze(epochs=2),
        "Gradual(every=1, warm-up 50)": Gradual(every=1, unfreeze_warmup_steps=50),
        "LPFT(lp_epochs=3)": LPFT(lp_epochs=3),
        "Milestones{2: layer4, 5: layer3}": Milestones({2: ["layer4"], 5: ["layer3"]}),
        "Surgical([layer1])": Surgical(["layer1"]),
    }


def model_for(plan: FreezeSchedule, backbone: str = "resnet18") -> ImageClassifier:
    return ImageClassifier(
        backbone,
        num_classes=10,
        freeze=plan,
        layer_decay=0.7,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        lr_scheduler=partial(WarmupCosineLR, warmup_steps=STEPS_PER_EPOCH),
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "schedules.png")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--dpi", type=int, default=72)
    args = parser.parse_args(argv)
    models = {name: model_for(plan, args.backbone) for name, plan in strategies().items()}
    fig = plot_schedules(models, STEPS_PER_EPOCH, EPOCHS, ncols=4)
    fig.suptitle(f"{args.backbone}: LR per layer group and freeze plan, {EPOCHS} epochs x {STEPS_PER_EPOCH} steps "
                 "(AdamW 1e-3, layer_decay 0.7, WarmupCosineLR)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
