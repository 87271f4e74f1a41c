"""2-process DDP (gloo, CPU) run with gradual unfreezing; each rank saves its final weights.

Run by tests/test_ddp.py as `python tests/ddp_gradual.py OUT_DIR`; Lightning's launcher
starts the second rank by re-running this script.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_ft.schedules import Gradual  # noqa: E402
from tests.helpers import snapshot, tiny_data, tiny_model  # noqa: E402


def main(out: Path) -> None:
    L.seed_everything(0)
    model = tiny_model(freeze=Gradual(every=1))
    before = snapshot(model)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    # Shuffled, per-rank shards: ranks see different data, so only all-reduce keeps them equal.
    trainer.fit(model, tiny_data(train_size=128))
    torch.save({"before": before, "after": snapshot(model)}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
