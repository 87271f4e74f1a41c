"""Peer: a plain PyTorch training loop with timm's model, optimizer, scheduler and loss.

timm's model pages say how to fine-tune: ``timm.create_model(name, pretrained=True,
num_classes=N)`` and "write a training loop or adapt timm's training script"
(https://huggingface.co/docs/timm/models/efficientnet, "How do I finetune this model?"). The
loop is the one timm's scheduler documentation shows
(https://huggingface.co/docs/timm/reference/schedulers, "Usage"):
``create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05)`` (no weight decay on
biases and norms, timm's default), ``create_scheduler_v2(sched='cosine', min_lr=1e-6,
step_on_epochs=False)`` stepped per update, and the label-smoothing cross-entropy (0.1) that
timm's train.py uses by default; mixup off, validation each epoch as train.py does, channels_last
as train.py's ``--channels-last``. The documented example warms up for 5 of 100 epochs; runs here
last 2 to 4 epochs, so the warm-up is the 50 optimizer steps lit-ft's recipes use.

The head is what timm gives a model created with ``num_classes=10`` and pretrained weights: the
pretrained classifier is dropped and the new one keeps timm's own initialisation.
Run as a child of ``python -m benchmarks.peers``; the run spec comes from the environment.
"""

from __future__ import annotations

import timm
import timm.loss
import timm.optim
import timm.scheduler
import torch

from benchmarks.peers import data as D
from benchmarks.peers.probe import Probe, read_spec

WARMUP_STEPS = 50


def main() -> None:
    spec = read_spec()
    dspec = D.DataSpec.from_json(spec["data"])
    torch.manual_seed(dspec.seed)
    train, val = D.loaders(dspec)
    model = timm.create_model(D.ARCH, pretrained=True, num_classes=D.NUM_CLASSES,
                              pretrained_cfg_overlay=dict(file=spec["weights"]))
    model.to(memory_format=torch.channels_last)
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    scheduler, num_epochs = timm.scheduler.create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=spec["epochs"], warmup_epochs=WARMUP_STEPS / len(train),
        min_lr=1e-6, step_on_epochs=False, updates_per_epoch=len(train),
    )
    loss_fn = timm.loss.LabelSmoothingCrossEntropy(smoothing=0.1)
    probe = Probe(spec)
    probe.started()
    num_updates = 0
    for epoch in range(num_epochs):
        model.train()
        for x, y in train:
            x = x.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            probe.after_batch(len(y), model)
        scheduler.step(epoch + 1)
        val_acc = validate(model, val)
        print(f"epoch {epoch}: val acc {val_acc:.4f}", flush=True)
    probe.finish(model, {"epochs_run": num_epochs})


def validate(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum().item()
            seen += len(y)
    return correct / max(seen, 1)


if __name__ == "__main__":
    main()
