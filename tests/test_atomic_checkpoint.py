"""Checkpoint writes are atomic: a write that dies half-way leaves the previous file loadable.
And ``last.ckpt`` is the latest epoch, not a copy of the best one (Lightning 2.6's default), written by a
second stock ModelCheckpoint that `--ckpt_path best` tells apart from the best one."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest
import torch

from lit_ft.callbacks.checkpointing import AtomicCheckpointIO, atomic_save
from tests.cli_args import synthetic_run
from lit_ft.cli import main, resolve_ckpt_alias

TINY = synthetic_run(batch_size=8, train_size=32, val_size=8, test_size=0)
CKPTS = Path("runs/default/version_0/checkpoints")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def disk_full_halfway(monkeypatch):
    """Make every torch.save write half of its bytes, then fail as a full disk would."""
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        if isinstance(f, (str, Path)):
            f = open(f, "wb")
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)


def test_a_write_interrupted_midway_leaves_the_previous_checkpoint(tmp_path, request):
    path = tmp_path / "last.ckpt"
    atomic_save({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)
    request.getfixturevalue("disk_full_halfway")
    with pytest.raises(OSError):
        atomic_save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}, path)
    old = torch.load(path, weights_only=True)
    assert old["global_step"] == 1 and torch.equal(old["state_dict"]["w"], torch.ones(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left
    # The same failure on a plain in-place write destroys the file: the test does test something.
    with pytest.raises(OSError):
        torch.save({"global_step": 2}, tmp_path / "plain.ckpt")
    with pytest.raises(Exception):
        torch.load(tmp_path / "plain.ckpt", weights_only=True)


def test_a_failed_save_during_fit_is_one_message_and_last_ckpt_survives(request, capsys):
    cli = main(["fit", *TINY, "--trainer.max_epochs", "1"], return_cli=True)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    before = torch.load(CKPTS / "last.ckpt", weights_only=True)
    assert before["global_step"] == 4

    request.getfixturevalue("disk_full_halfway")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "cannot write checkpoint" in err and "No space left on device" in err and "is unchanged" in err

    after = torch.load(CKPTS / "last.ckpt", weights_only=True)
    assert after["global_step"] == 4
    assert all(torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
    assert not [p for p in CKPTS.iterdir() if p.name.startswith(".")]


def test_last_ckpt_is_the_latest_epoch_even_when_the_metric_did_not_improve():
    # lr = 0: val/acc never changes, so only epoch 0 is a "best" checkpoint. Lightning 2.6 alone
    # would keep last.ckpt = that epoch; resuming from it would redo epoch 1.
    main(["fit", *TINY, "--trainer.max_epochs", "2", "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0"])
    last = torch.load(CKPTS / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * 4 and last["epoch"] == 1
    bests = [p.name for p in CKPTS.glob("best-*.ckpt")]
    assert len(bests) == 1 and bests[0].startswith("best-epoch00")
    # Same state key as a plain ModelCheckpoint: `--ckpt_path best` and older checkpoints keep working.
    assert any(k.startswith("ModelCheckpoint{") for k in last["callbacks"])


def test_best_and_last_go_to_the_folder_given_and_last_can_be_switched_off(tmp_path):
    main(["fit", *TINY, "--trainer.max_epochs", "1", "--checkpoint.dirpath", str(tmp_path / "ck")])
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert len(names) == 2 and names[0].startswith("best-epoch00") and names[1] == "last.ckpt", names
    assert not CKPTS.exists()  # last.ckpt follows checkpoint.dirpath, not the run folder
    main(["fit", *TINY, "--trainer.max_epochs", "1", "--checkpoint.dirpath", str(tmp_path / "off"),
          "--last_checkpoint.save_top_k", "0"])
    assert [p.name for p in (tmp_path / "off").iterdir()] == [names[0]]


def test_ckpt_path_best_follows_the_monitored_checkpoint_state_whatever_its_order():
    # last.ckpt holds two ModelCheckpoint states; the unmonitored one names last.ckpt as its "best".
    CKPTS.mkdir(parents=True)
    best = CKPTS / "best-epoch00-acc0.5000.ckpt"
    torch.save({"state_dict": {}}, best)
    states = {
        "ModelCheckpoint{'monitor': None}": {"monitor": None, "best_model_path": str(CKPTS / "last.ckpt")},
        "ModelCheckpoint{'monitor': 'val/acc'}": {"monitor": "val/acc", "best_model_path": str(best)},
    }
    torch.save({"callbacks": states}, CKPTS / "last.ckpt")
    assert resolve_ckpt_alias("best", {"trainer": {}}) == (best, 0)
    assert resolve_ckpt_alias("last", {"trainer": {}}) == (CKPTS / "last.ckpt", 0)
