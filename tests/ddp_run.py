"""2-process DDP (gloo, CPU) fit; each rank saves its weights before and after.

Run by tests/test_ddp.py as `python tests/ddp_run.py MODE OUT_DIR`; Lightning's launcher
starts the second rank by re-running this script. MODE:

- ``gradual``: gradual unfreezing, groups unfrozen mid-run (DDP must still sync them).
- ``regularized``: full fine-tuning with L2-SP, DELTA (with channel attention), BSS, mixup and
  an EMA of the weights; each rank also saves the EMA average.
- ``peft``: LoRA after a linear-probe epoch (FreezeUnfreeze), with an EMA; the adapters join
  the DDP reducer up front although they start frozen.
- ``callbacks``: 2 epochs with validation and TensorBoard; each rank saves the budget counter's
  images and the validation confusion matrix (tests/test_budget.py).
- ``distill``: knowledge distillation from ``OUT_DIR/teacher.ckpt`` (written by the test) with
  mixup and a freeze-then-unfreeze plan; each rank also saves its teacher's weights.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_ft.callbacks import EMA, BudgetCounter, ConfusionLogger  # noqa: E402
from lit_ft.distill import Distillation  # noqa: E402
from lit_ft.regularizers import BSS, DELTA, L2SP, Mixup  # noqa: E402
from lit_ft.schedules import FreezeUnfreeze, Gradual  # noqa: E402
from tests.helpers import snapshot, tiny_data, tiny_model, trainer as make_trainer  # noqa: E402


def main(mode: str, out: Path) -> None:
    L.seed_everything(0)
    callbacks = []
    if mode == "gradual":
        model = tiny_model(freeze=Gradual(every=1))
    elif mode == "regularized":
        model = tiny_model(
            regularizers=[L2SP(alpha=0.1, beta=0.01), DELTA(alpha=0.01, layers=["layer3", "layer4"], attention=True,
                                                          attention_batches=2), BSS(eta=0.01)],
            mixup=Mixup(mixup_alpha=0.2, cutmix_alpha=1.0),
        )
        callbacks.append(EMA(decay=0.9))
    elif mode == "peft":
        from lit_ft.peft import PEFT

        model = tiny_model(peft=PEFT(method="lora", r=4), freeze=FreezeUnfreeze(epochs=1))
        with torch.no_grad():  # timm zero-inits each block's last BN scale, which would hide its adapters
            gen = torch.Generator().manual_seed(0)
            for m in model.model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        callbacks.append(EMA(decay=0.9))
    elif mode == "callbacks":
        budget, confusion = BudgetCounter(), ConfusionLogger(misclassified=0)
        model = tiny_model()
        trainer = make_trainer(out, devices=2, strategy="ddp", deterministic=False, callbacks=[budget, confusion],
                               logger=TensorBoardLogger(str(out), name="tb"))
        trainer.fit(model, tiny_data(train_size=64, val_size=48))
        saved = {"images_seen": budget.images_seen, "matrix": confusion.matrix}
        torch.save(saved, out / f"rank{trainer.global_rank}.pt")
        return
    elif mode == "distill":
        distill = Distillation(str(out / "teacher.ckpt"), alpha=0.5, temperature=2.0)
        model = tiny_model(distill=distill, freeze=FreezeUnfreeze(epochs=1), mixup=Mixup(mixup_alpha=0.4))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    before = snapshot(model)
    # A plan with frozen phases needs DDP to look for unused parameters (lit-ft refuses plain
    # "ddp" then; its CLI picks this strategy by itself).
    strategy = "ddp_find_unused_parameters_true" if mode in ("gradual", "distill", "peft") else "ddp"
    trainer = make_trainer(out, devices=2, strategy=strategy, max_epochs=4, deterministic=False, limit_val_batches=0,
                           callbacks=callbacks)
    # Shuffled, per-rank shards: ranks see different data, so only all-reduce keeps them equal.
    trainer.fit(model, tiny_data(train_size=128))
    saved = {"before": before, "after": snapshot(model)}
    if callbacks:
        saved["ema"] = {k: v.clone() for k, v in callbacks[0].average.items()}
    if mode == "distill":
        saved["teacher"] = snapshot(model.distill.teacher)
    torch.save(saved, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
