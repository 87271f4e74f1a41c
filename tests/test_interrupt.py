"""SIGTERM / Ctrl-C during fit: a resumable checkpoint is saved, and resuming from it ends with
the same weights as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Dataset

from lit_ft.callbacks import BudgetCounter
from tests.cli_args import synthetic_run
from lit_ft.cli import main
from lit_ft.data.base import EpochShuffleSampler
from lit_ft.data.resumable import ResumableDataLoader

ROOT = Path(__file__).resolve().parents[1]
# 40 images / batch 8 = 5 steps per epoch; no augmentation and no dropout, so nothing but the
# data order (a function of seed and epoch) and the saved state decides the result.
ARGS = [
    *synthetic_run(batch_size=8, train_size=40, val_size=16, test_size=0, trainer={"max_epochs": 2, "log_every_n_steps": 1}),
    "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.05", "--model.optimizer.momentum", "0.9",
]
STEPS = 10


pytestmark = pytest.mark.usefixtures("one_thread")


class PauseAt(Callback):
    """Hold training at ``step`` (writing ``marker``) until a SIGTERM arrives, so a test can signal
    the process at a known point in the middle of an epoch."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).touch()
            deadline = time.monotonic() + 300
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.02)


class SignalAt(Callback):
    """Send ``signum`` to this process at ``step`` (what pressing Ctrl-C does)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class SignalInValidation(Callback):
    """Send ``signum`` to this process during the validation that follows ``step``."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking and batch_idx == 0:
            os.kill(os.getpid(), self.signum)


@dataclass
class Reference:
    weights: dict[str, torch.Tensor]
    scalars: dict[str, list[tuple[int, float]]]  # tag -> [(step, value)] in TensorBoard


# Scalars that are a function of the weights and the data only (not of the clock, nor of
# per-process or non-checkpointed running state), so a resumed run must log the same values.
DETERMINISTIC = ("train/loss", "train/acc_step", "lr/", "trainable_params", "val/", "budget/images_seen")


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Reference:
    save_dir = tmp_path_factory.mktemp("reference") / "runs"
    cli = main(["fit", *ARGS, "--trainer.logger.init_args.save_dir", str(save_dir)], return_cli=True)
    assert cli.trainer.global_step == STEPS
    return Reference({k: v.clone() for k, v in cli.model.state_dict().items()}, scalars(Path(cli.trainer.log_dir)))


def resume_and_compare(uninterrupted: Reference, extra: tuple[str, ...] = (), unchecked: tuple[str, ...] = ()) -> None:
    cli = main(["fit", *ARGS, *extra, "--ckpt_path", "last"], return_cli=True)
    assert cli.trainer.global_step == STEPS
    budget = next(c for c in cli.trainer.callbacks if isinstance(c, BudgetCounter))
    assert budget.images_seen == STEPS * 8  # the budget counts on across the interruption
    assert Path(cli.trainer.log_dir) == Path("runs/default/version_0")  # the same run continues
    got = cli.model.state_dict()
    assert got.keys() == uninterrupted.weights.keys()
    different = [k for k in got if not torch.equal(got[k], uninterrupted.weights[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    # TensorBoard, both runs' event files together: every tag at the same steps as the
    # uninterrupted run (the interrupted step once, not missing, not twice), and the same values.
    logged = scalars(Path(cli.trainer.log_dir))
    assert logged.keys() == uninterrupted.scalars.keys()
    for tag, ref in uninterrupted.scalars.items():
        if tag.startswith(unchecked):
            continue
        assert sorted(s for s, _ in logged[tag]) == sorted(s for s, _ in ref), tag
        if tag.startswith(DETERMINISTIC):
            assert sorted(logged[tag]) == sorted(ref), tag


def mid_epoch_checkpoint(step: int, batches: int, epoch: int) -> dict:
    ckpt = torch.load("runs/default/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == step and ckpt["epoch"] == epoch
    # the train loader's position inside the epoch is part of the checkpoint
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": epoch, "batches": batches}]
    return ckpt


def test_sigterm_to_a_running_fit_saves_and_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    marker = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lit_ft", "fit", *ARGS,
         "--trainer.callbacks+=tests.test_interrupt.PauseAt", "--trainer.callbacks.step", "7",
         "--trainer.callbacks.marker", str(marker)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr.txt").open("w"),
    )  # stderr to a file: a full pipe would block the child
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "training never reached step 7"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # epoch 1, after its 2nd of 5 batches
        proc.wait(timeout=120)
    finally:
        proc.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM at global step 7 (epoch 1)" in err
    assert "resume with the same command plus --ckpt_path last" in err and "Traceback" not in err
    mid_epoch_checkpoint(step=7, batches=2, epoch=1)
    resume_and_compare(uninterrupted)


def test_ctrl_c_saves_after_the_batch_and_resume_matches_an_uninterrupted_run(uninterrupted, capsys):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *ARGS, "--trainer.callbacks+=tests.test_interrupt.SignalAt", "--trainer.callbacks.step", "3",
              "--trainer.callbacks.signum", str(int(signal.SIGINT))])
    assert exit_.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C behaves normally again afterwards
    err = capsys.readouterr().err
    assert "interrupted by SIGINT at global step 3 (epoch 0)" in err and "--ckpt_path last" in err
    mid_epoch_checkpoint(step=3, batches=3, epoch=0)
    resume_and_compare(uninterrupted)


@pytest.mark.parametrize("persistent", ["false", "true"])
def test_ctrl_c_with_loader_worker_processes_resumes_at_the_same_batch(uninterrupted, capsys, persistent):
    # Workers prefetch batches ahead of training; the saved position must count the batches
    # trained on, not the ones prefetched, and the resumed loader's workers must skip exactly
    # those. (A multi-worker iterator draws its index sampler twice on creation: the skip used
    # to be spent on the discarded first draw, so the resumed epoch re-trained batches 0-1.)
    workers = ("--data.num_workers", "2", "--data.persistent_workers", persistent)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *ARGS, *workers, "--trainer.callbacks+=tests.test_interrupt.SignalAt", "--trainer.callbacks.step", "3",
              "--trainer.callbacks.signum", str(int(signal.SIGINT))])
    assert exit_.value.code == 128 + signal.SIGINT
    assert "interrupted by SIGINT at global step 3 (epoch 0)" in capsys.readouterr().err
    mid_epoch_checkpoint(step=3, batches=3, epoch=0)
    resume_and_compare(uninterrupted, workers)


def test_sigterm_during_validation_saves_from_on_exception_and_resumes(uninterrupted, capsys):
    # Lightning stops the validation loop itself (SIGTERMException, which would exit with 0).
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *ARGS, "--trainer.callbacks+=tests.test_interrupt.SignalInValidation", "--trainer.callbacks.step", "5",
              "--trainer.callbacks.signum", str(int(signal.SIGTERM))])
    assert exit_.value.code == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM at global step 5 (epoch 0)" in capsys.readouterr().err
    mid_epoch_checkpoint(step=5, batches=5, epoch=0)  # all of epoch 0 trained, its validation cut short
    # Every training step's scalars are there once. Not the cut validation's: Lightning 2.6 resumes
    # past a validation that had not finished (the epoch's val/* and epoch means are lost).
    resume_and_compare(uninterrupted, unchecked=("val/", "validate/", "train/acc_epoch", "epoch"))


# --------------------------------------------------------------------------- the loader alone


class CountingDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.loaded = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.loaded.append(i)
        return i


def loader(ds: CountingDataset, epoch: int) -> ResumableDataLoader:
    sampler = EpochShuffleSampler(len(ds), seed=3)
    sampler.set_epoch(epoch)
    return ResumableDataLoader(ds, batch_size=4, sampler=sampler)


def test_resumable_loader_skips_the_batches_done_without_loading_them():
    full = [b.tolist() for b in loader(CountingDataset(22), epoch=2)]  # 6 batches, the last of 2
    first = loader(CountingDataset(22), epoch=2)
    it = iter(first)
    done = [next(it).tolist() for _ in range(4)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 4} and done == full[:4]

    ds = CountingDataset(22)
    resumed = loader(ds, epoch=2)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == full[4:]
    assert sorted(ds.loaded) == sorted(i for b in full[4:] for i in b)  # skipped images never decoded
    assert resumed.state_dict() == {"epoch": 2, "batches": 6}
    assert len([b for b in resumed]) == 6  # one-shot: the next pass is a whole epoch


@pytest.mark.parametrize(("state", "why"), [({"epoch": 2, "batches": 6}, "epoch was finished"), ({"epoch": 1, "batches": 2}, "other epoch")])
def test_resumable_loader_does_not_skip_into_a_new_epoch(state, why):
    resumed = loader(CountingDataset(22), epoch=2)
    resumed.load_state_dict(state)
    assert len(list(resumed)) == 6, why
