import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_gradual_unfreeze_keeps_ranks_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_gradual.py"), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    params = [k for k in r0["after"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 40
    for k in params:
        assert torch.equal(r0["after"][k], r1["after"][k]), f"ranks diverged at {k}"
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
