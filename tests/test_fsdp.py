"""lit-ft under Lightning's FSDPStrategy: freeze plans, discriminative LRs and resume.

Two CPU processes (gloo) under ``torchrun --standalone`` run tests/fsdp_run.py: the same model,
Gradual unfreezing, layer-wise LRs and AdamW weight decay under DDP (the reference) and under
FSDP (FULL_SHARD, ``use_orig_params=True``, one FSDP unit per timm ViT block), then the FSDP run
stopped after 2 of 3 epochs and resumed from its sharded checkpoint. Lightning refuses FSDP
without a GPU; fsdp_run.py's docstring says what its test-only strategy subclass changes (the
device FSDP is told to use, nothing else).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Far below one optimizer step's change (~1e-3 here): a wrong LR scale, a group without weight
# decay or a frozen parameter that moved would all show. Measured difference: 0 (bit-identical).
ATOL = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("fsdp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "TORCHELASTIC_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "fsdp_run.py"), str(out)],
        cwd=out, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = {name: torch.load(out / f"{name}.pt", weights_only=True) for name in ("ddp", "fsdp", "fsdp_part", "fsdp_resumed")}
    got["start"] = {"params": torch.load(out / "start.pt", weights_only=True)}
    return got


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and len(a) > 40
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_fsdp_trains_the_same_weights_as_ddp_through_gradual_unfreezing(runs):
    assert runs["fsdp"]["global_step"] == runs["ddp"]["global_step"] == 6
    assert max_diff(runs["fsdp"]["params"], runs["ddp"]["params"]) <= ATOL
    start, fsdp = runs["start"]["params"], runs["fsdp"]["params"]
    # Gradual(every=1), 3 epochs: head from the start, blocks.5 from epoch 1, blocks.4 from
    # epoch 2; the patch embedding and blocks 0-3 never train and stay bit-identical.
    assert not torch.equal(fsdp["head.weight"], start["head.weight"])
    assert not torch.equal(fsdp["blocks.4.attn.qkv.weight"], start["blocks.4.attn.qkv.weight"])
    frozen = [k for k in start if k.startswith(("patch_embed.", "cls_token", "pos_embed", "blocks.0.", "blocks.3."))]
    assert len(frozen) > 20 and all(torch.equal(fsdp[k], start[k]) for k in frozen)


@pytest.mark.slow
def test_fsdp_builds_the_same_named_scaled_param_groups_as_ddp(runs):
    # configure_optimizers runs after FSDP wrapped the blocks: the groups must still find every
    # parameter by name and put matrices (flat 1-d shards under FSDP) in the weight-decay groups.
    fsdp, ddp = runs["fsdp"]["param_groups"], runs["ddp"]["param_groups"]
    assert [g["name"] for g in fsdp] == [g["name"] for g in ddp]
    assert [(g["lr"], g["weight_decay"]) for g in fsdp] == [(g["lr"], g["weight_decay"]) for g in ddp]
    by_name = {g["name"]: g for g in fsdp}
    assert by_name["blocks.2"]["weight_decay"] == 0.05 and by_name["blocks.2/no_decay"]["weight_decay"] == 0.0
    assert by_name["head"]["lr"] == pytest.approx(2e-3) and by_name["blocks.5"]["lr"] == pytest.approx(2e-3 * 0.6)


@pytest.mark.slow
def test_fsdp_resumed_from_a_sharded_checkpoint_ends_where_the_uninterrupted_run_does(runs):
    assert runs["fsdp_part"]["global_step"] == 4 and runs["fsdp_resumed"]["global_step"] == 6
    # The checkpoint was written while blocks.4 was still frozen (no optimizer state for it);
    # the resumed run unfreezes it at epoch 2 and must land on the same weights.
    assert max_diff(runs["fsdp_part"]["params"], runs["fsdp"]["params"]) > 1e-4  # it really stopped early
    assert max_diff(runs["fsdp_resumed"]["params"], runs["fsdp"]["params"]) <= ATOL
