"""benchmarks/gpu_check.py: a clean exit without a GPU, and every code path run on the CPU
(--cpu-smoke) so the script is known to work before a GPU machine is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_without_a_gpu_it_says_so_and_exits_0_without_running_anything(tmp_path):
    proc = run(["--out", str(tmp_path / "report")], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gpu_check: no CUDA GPU found; nothing to measure" in proc.stdout
    assert not (tmp_path / "report").exists() and list(tmp_path.iterdir()) == []  # no report, no run folders


def test_a_section_that_does_not_fit_the_budget_is_skipped_and_an_error_does_not_stop_the_rest():
    report = {"sections": {}, "skipped": {}, "errors": {}, "seconds": {}}
    budget = gpu_check.Budget(30)
    gpu_check.run_section(report, "long", 60, budget, lambda: 1 / 0)
    gpu_check.run_section(report, "broken", 1, budget, lambda: 1 / 0)
    gpu_check.run_section(report, "fine", 1, budget, lambda: {"x": 1})
    assert "long" in report["skipped"] and "needs ~60 s" in report["skipped"]["long"]
    assert "ZeroDivisionError" in report["errors"]["broken"]
    assert report["sections"] == {"fine": {"x": 1}}
    text = gpu_check.render({**report, "mode": "gpu", "date": "-", "machine": "-", "command": "-"})
    assert "skipped long: needs ~60 s" in text and "ERROR in broken: ZeroDivisionError" in text


@pytest.mark.slow
def test_cpu_smoke_runs_every_section_and_writes_one_report(tmp_path):
    out = tmp_path / "report"
    proc = run(["--cpu-smoke", "--out", str(out)], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["errors"] == {}
    s = report["sections"]
    assert s["device"]["auto"] == {"accelerator": "CPUAccelerator", "devices": 1, "strategy": "SingleDeviceStrategy"}
    assert [r["model"] for r in s["throughput"]] == ["test_resnet", "test_vit"]
    assert all(r["images_per_s"] > 0 and r["gflop_per_image"] > 0 for r in s["throughput"])
    assert all(s["data"][k] > 0 for k in ("loader_pil", "loader_batch_transforms", "train_pil", "train_batch_transforms", "model_only"))
    assert 0.0 <= s["fashion_mnist"]["test_acc"] <= 1.0 and s["fashion_mnist"]["images_seen"] == 3 * 32
    assert s["fsdp"]["refused_on_cpu"]  # Lightning's refusal, as README says
    assert s["ddp"]["ddp"]["ranks_equal"] and s["ddp"]["ddp"]["params"] > 40
    assert s["ddp"]["ddp"]["bn_types"] == ["BatchNorm2d"] and "sync_bn" not in s["ddp"]  # GPU only
    assert set(report["skipped"]) == {"compile"}
    text = (out / "gpu_check.md").read_text()
    assert text.startswith("# lit-ft GPU check (cpu-smoke") and "| test_vit | 32 | 8 | False |" in text
