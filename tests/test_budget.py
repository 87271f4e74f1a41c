"""The budget counter: images and seconds logged per epoch, continued across a resume, all
ranks counted under DDP; and the confusion matrix summed over DDP ranks."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_ft.callbacks import BudgetCounter
from tests.helpers import StopAfter, tiny_data, tiny_model, trainer
from tests.test_ddp import run_ddp

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGES_PER_EPOCH = 64  # tiny_data's train_size


def _logged(log_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def _fit(root: Path, budget: BudgetCounter, *callbacks, ckpt_path=None, epochs: int = 2) -> L.Trainer:
    L.seed_everything(0)
    t = trainer(root, max_epochs=epochs, callbacks=[budget, *callbacks], logger=TensorBoardLogger(str(root), name="", version=""))
    t.fit(tiny_model(), tiny_data(), ckpt_path=ckpt_path)
    return t


def test_a_resumed_run_logs_the_counts_of_an_uninterrupted_one(tmp_path):
    whole = BudgetCounter()
    _fit(tmp_path / "whole", whole)
    assert whole.images_seen == 2 * IMAGES_PER_EPOCH
    expected = _logged(tmp_path / "whole", "budget/images_seen")
    assert list(expected.values()) == [IMAGES_PER_EPOCH, 2 * IMAGES_PER_EPOCH]

    first = BudgetCounter()
    t = _fit(tmp_path / "first", first, StopAfter(1))
    t.save_checkpoint(tmp_path / "epoch1.ckpt")
    saved_seconds = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)["callbacks"]["BudgetCounter"]["train_seconds"]
    assert saved_seconds > 0

    resumed = BudgetCounter()
    started = time.perf_counter()
    _fit(tmp_path / "resumed", resumed, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    wall = time.perf_counter() - started
    images = {**_logged(tmp_path / "first", "budget/images_seen"), **_logged(tmp_path / "resumed", "budget/images_seen")}
    assert images == expected and resumed.images_seen == whole.images_seen
    # Seconds continue from the checkpoint's: the resumed run adds only its own time.
    (final_seconds,) = _logged(tmp_path / "resumed", "budget/train_seconds").values()
    assert saved_seconds < final_seconds <= saved_seconds + wall


def test_a_second_fit_with_the_same_callback_counts_from_zero(tmp_path):
    budget = BudgetCounter()
    _fit(tmp_path / "a", budget, epochs=1)
    seconds = budget.train_seconds
    assert budget.images_seen == IMAGES_PER_EPOCH and seconds == budget.train_seconds  # clock stopped after fit
    _fit(tmp_path / "b", budget, epochs=1)
    assert budget.images_seen == IMAGES_PER_EPOCH
    assert list(_logged(tmp_path / "b", "budget/images_seen").values()) == [IMAGES_PER_EPOCH]


def test_counts_of_a_checkpoint_written_before_the_counter_existed_are_kept():
    budget = BudgetCounter()
    legacy = {"lit_ft": {"images_seen": 320, "train_seconds": 12.5}, "callbacks": {}}
    budget.on_load_checkpoint(None, None, legacy)
    assert budget.images_seen == 320 and budget.train_seconds == 12.5
    budget.load_state_dict({"images_seen": 640, "train_seconds": 20.0})  # Lightning calls this after, when present
    assert budget.images_seen == 640 and budget.train_seconds == 20.0


@pytest.mark.slow
def test_ddp_counts_every_ranks_images_and_sums_the_confusion_matrix_over_ranks(tmp_path):
    r0, r1 = run_ddp("callbacks", tmp_path, 250)
    # 64 training images per epoch split over 2 ranks (32 each), 2 epochs: all ranks' images count.
    assert r0["images_seen"] == r1["images_seen"] == 2 * 64
    # 48 validation images, 24 per rank: each rank's matrix holds all 48 (torchmetrics' sync).
    assert int(r0["matrix"].sum()) == 48 and torch.equal(r0["matrix"], r1["matrix"])
    (run,) = (tmp_path / "tb").iterdir()
    assert list(_logged(run, "budget/images_seen").values()) == [64, 128]
