import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_ddp(mode: str, tmp_path: Path, port_offset: int) -> tuple[dict, dict]:
    """Fit on 2 CPU ranks (tests/ddp_run.py MODE); return each rank's saved weights."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(29500 + port_offset + os.getpid() % 1000)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_run.py"), mode, str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "rank0.pt", weights_only=True), torch.load(tmp_path / "rank1.pt", weights_only=True)


def assert_ranks_identical(r0: dict, r1: dict, key: str = "after") -> list[str]:
    params = [k for k in r0[key] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 40
    for k in params:
        assert torch.equal(r0[key][k], r1[key][k]), f"ranks diverged at {k} ({key})"
    return params


@pytest.mark.slow
def test_ddp_gradual_unfreeze_keeps_ranks_identical(tmp_path):
    r0, r1 = run_ddp("gradual", tmp_path, 0)
    assert_ranks_identical(r0, r1)
    # BN running stats are per-rank buffers: DDP broadcasts rank 0's before every forward, so they
    # differ by the last batch's update only (use trainer.sync_batchnorm to make them global).
    # Gradual(every=1) over 4 epochs on test_resnet (6 groups): layer4 unfreezes at epoch 1,
    # layer3 at 2, layer2 at 3; stem and layer1 never train.
    changed = lambda k: not torch.equal(r0["before"][k], r0["after"][k])  # noqa: E731
    assert changed("model.fc.weight")
    assert changed("model.layer4.0.conv1.weight")  # unfrozen mid-run, and still synchronised
    assert changed("model.layer2.0.conv1.weight")
    assert not changed("model.layer1.0.conv1.weight")
    assert not changed("model.conv1.0.weight")


@pytest.mark.slow
def test_ddp_with_every_regularizer_and_ema_keeps_ranks_identical(tmp_path):
    # L2-SP's anchors, DELTA's teacher and channel weights, BSS's SVD and mixup all run per rank
    # on different data; the parameters must still be all-reduced into one model, and the EMA
    # (updated from those parameters) must agree too.
    r0, r1 = run_ddp("regularized", tmp_path, 500)
    params = assert_ranks_identical(r0, r1)
    assert_ranks_identical(r0, r1, key="ema")
    assert all(not torch.equal(r0["before"][k], r0["after"][k]) for k in ("model.fc.weight", "model.conv1.0.weight"))
    # the anchors and the teacher are the starting weights on both ranks, untouched by training
    teacher = [k for k in params if ".teacher." in k]
    assert len(teacher) > 20
    for k in teacher:
        assert torch.equal(r0["after"][k], r0["before"][k]) and torch.equal(r1["after"][k], r0["before"][k]), k


@pytest.mark.slow
def test_ddp_distillation_keeps_ranks_identical_and_the_teacher_untouched(tmp_path):
    import lightning as L

    from lit_ft.distill import load_teacher
    from tests.helpers import tiny_data, tiny_model, trainer

    L.seed_everything(3)
    teacher = tiny_model("test_efficientnet")
    t = trainer(tmp_path / "teacher", max_epochs=1, limit_val_batches=0)
    t.fit(teacher, tiny_data())
    t.save_checkpoint(tmp_path / "teacher.ckpt", weights_only=True)
    reference = load_teacher(str(tmp_path / "teacher.ckpt"), 4).net.state_dict()
    r0, r1 = run_ddp("distill", tmp_path, 700)
    assert_ranks_identical(r0, r1)
    assert not torch.equal(r0["before"]["model.conv1.0.weight"], r0["after"]["model.conv1.0.weight"])  # unfrozen, trained
    for rank in (r0, r1):  # each rank's own teacher: weights and BatchNorm statistics as loaded
        assert rank["teacher"].keys() == reference.keys()
        for k, v in reference.items():
            assert torch.equal(rank["teacher"][k], v), k
        assert not any("teacher" in k or "distill" in k for k in rank["after"])
