"""Stop a run whose loss becomes NaN/Inf, before the bad step touches the weights or a checkpoint."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lit_ft.callbacks.checkpointing import describe_last_good
from lit_ft.errors import UserError

HINT = (
    "lower the learning rate (e.g. --model.optimizer.init_args.lr), clip gradients "
    "(--trainer.gradient_clip_val 1.0), or train in 32-bit (--trainer.precision 32-true) if you use 16-bit; "
    "to continue from the good weights start a new run with --model.pretrained <that checkpoint>"
)


class NaNGuard(Callback):
    """Raise a :class:`UserError` naming the step as soon as the training loss is not finite.

    The loss is checked before ``backward`` (one scalar device sync per step), so the step that
    produced it never updates the weights, and no checkpoint (``last.ckpt`` included) is ever
    written while a weight is NaN/Inf: the last good checkpoint stays in place.
    Under DDP the decision is shared, so all ranks stop together.

    Args:
        enabled: check at all.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._clean_at: Optional[int] = None  # global step at which the weights were last found finite

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._clean_at = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            loop = trainer.fit_loop.epoch_loop
            value = loss.detach().float().cpu()
            raise UserError(
                f"the training loss became {_name(value)} at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}, batch {loop.batch_idx}); training stopped before this step "
                f"changed the weights, and {describe_last_good(trainer)}",
                HINT,
            )

    # Weights can turn non-finite on a step whose loss was still finite (a huge update): check them
    # after validation (this callback runs before ModelCheckpoint) and before any checkpoint is written.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check_weights(trainer, _tensors(pl_module))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._check_weights(trainer, checkpoint.get("state_dict", {}).items())

    def _check_weights(self, trainer: L.Trainer, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        if not self.enabled or trainer.state.fn != TrainerFn.FITTING or self._clean_at == trainer.global_step:
            return  # weights only change in optimizer steps: one check per step is enough
        floats = [(n, t) for n, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]
        bad = bool(floats) and not bool(torch.stack([torch.isfinite(t).all() for _, t in floats]).all())  # one sync
        if trainer.world_size > 1:  # BatchNorm buffers differ between ranks: decide together
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self._clean_at = trainer.global_step
            return
        name = next((n for n, t in floats if not bool(torch.isfinite(t).all())), "on another rank")
        raise UserError(
            f"model tensor {name} became NaN/Inf by global step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"training stopped without writing a checkpoint, and {describe_last_good(trainer)}",
            HINT,
        )


def _tensors(module: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()  # BatchNorm statistics go NaN too


def _name(value: torch.Tensor) -> str:
    v = value.flatten()[0].item() if value.numel() else float("nan")
    return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
