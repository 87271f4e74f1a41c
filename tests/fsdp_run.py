"""2-process FSDP vs DDP on CPU (gloo), run by tests/test_fsdp.py as
``torchrun --standalone --nproc_per_node 2 tests/fsdp_run.py OUT_DIR``.

Four fits of the same model, plan, data and seed, one after the other in the same two processes
(the process group is torchrun's, shared by all four):

1. ``ddp``: Lightning's DDPStrategy (the reference);
2. ``fsdp``: Lightning's FSDPStrategy, FULL_SHARD, ``use_orig_params=True``, one FSDP unit per
   timm block (``auto_wrap_policy={Block}``);
3. ``fsdp_part``: the FSDP run stopped after 2 of its 3 epochs, saving a checkpoint;
4. ``fsdp_resumed``: a fresh model and trainer resuming from that checkpoint.

Rank 0 saves each run's parameters (gathered whole under FSDP) to ``OUT_DIR/<run>.pt``.

Why a subclass of FSDPStrategy: Lightning 2.6 refuses FSDP without a GPU
(``trainer/connectors/accelerator_connector.py``, ``_check_strategy_and_fallback``: "The
strategy `fsdp` requires a GPU accelerator"), a check that only matches the exact class; and it
passes ``device_id=root_device.index``, None on CPU, which torch's FSDP refuses ("FSDP needs a
non-CPU accelerator device", ``torch/distributed/fsdp/_init_utils.py``). Torch's FSDP itself
runs on CPU with gloo when given ``device_id=cpu``. :class:`CPUFSDPStrategy` changes only that;
everything else (setup, optimizer set-up with use_orig_params, full-state checkpoints, FSDP's
optimizer state dict on save and load) is Lightning's own code path. Users cannot do this from a
config; it exists so the suite can check lit-ft under FSDP without a GPU.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from timm.models.vision_transformer import Block

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_ft.backbones import named_parameters  # noqa: E402
from lit_ft.schedules import Gradual  # noqa: E402
from tests.helpers import StopAfter, tiny_data, tiny_model, trainer as make_trainer  # noqa: E402

EPOCHS = 3


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy with ``device_id=cpu`` (test-only; see the module docstring)."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


def model():
    # Gradual(every=1): one more block starts training each epoch, so when the run stops after
    # epoch 2 the optimizer holds AdamW state for some parameter groups and none for others;
    # layer-wise LRs and weight decay on matrices only (shapes as built, not FSDP's flat shards).
    L.seed_everything(0)
    return tiny_model(
        "test_vit", freeze=Gradual(every=1), layer_decay=0.6,
        optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.05),
    )


def strategy(kind: str):
    if kind == "ddp":
        return DDPStrategy(find_unused_parameters=True)
    # Sharded checkpoints (one file per rank), what a model too big for one device needs. (The
    # "full" kind is broken on CPU only: torch's FSDP optimizer-state gather reuses one buffer for
    # every state and offload_to_cpu's .cpu() does not copy a CPU tensor, so Adam's exp_avg comes
    # back as exp_avg_sq; on a GPU .cpu() copies. benchmarks/gpu_check.py covers "full" there.)
    return CPUFSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True, sharding_strategy="FULL_SHARD",
                           state_dict_type="sharded")


def fit(out: Path, name: str, kind: str, callbacks=(), ckpt_path=None) -> tuple[L.Trainer, L.LightningModule]:
    m = model()
    trainer = make_trainer(out / name, devices=2, strategy=strategy(kind), max_epochs=EPOCHS, deterministic=False,
                           limit_val_batches=0, callbacks=list(callbacks))
    trainer.fit(m, tiny_data(train_size=64), ckpt_path=ckpt_path)
    return trainer, m


def save(trainer: L.Trainer, model: L.LightningModule, out: Path, name: str) -> Path:
    """Save a resumable checkpoint (sharded under FSDP: a folder, one file per rank) and, from rank 0,
    the full parameters and the optimizer's param-group settings to ``<name>.pt``."""
    path = out / f"{name}.ckpt"
    trainer.save_checkpoint(path)  # every rank calls it
    params = full_params(trainer, model)
    if trainer.global_rank == 0:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizers[0].param_groups]
        torch.save({"params": params, "global_step": trainer.global_step, "param_groups": groups}, out / f"{name}.pt")
    return path


def full_params(trainer: L.Trainer, model: L.LightningModule) -> dict:
    """Every parameter, whole, under its unwrapped name (FSDP: gathered; every rank must call)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(trainer.strategy, FSDPStrategy):
        return {k: v.detach().clone() for k, v in named_parameters(model.model).items()}
    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
        return {k: v.detach().clone() for k, v in named_parameters(model.model).items()}


def main(out: Path) -> None:
    torch.save({k: v.detach().clone() for k, v in named_parameters(model().model).items()}, out / "start.pt")
    save(*fit(out, "ddp", "ddp"), out, "ddp")
    save(*fit(out, "fsdp", "fsdp"), out, "fsdp")
    part = save(*fit(out, "fsdp_part", "fsdp", callbacks=[StopAfter(2)]), out, "fsdp_part")
    save(*fit(out, "fsdp_resumed", "fsdp", ckpt_path=str(part)), out, "fsdp_resumed")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
