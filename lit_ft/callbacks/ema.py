"""Weight averaging: an exponential moving average (EMA) or a stochastic weight average (SWA)
of the timm model, used for validation and saved as the checkpoint's weights.

Why not Lightning's ``WeightAveraging``: it deep-copies the whole LightningModule (metrics,
regularizer anchors, a DELTA teacher), EMAs integer buffers, has no EMA warm-up (with few
fine-tuning steps a 0.999 EMA stays at the random head), and when ``trainer.test`` runs on a
checkpoint inside the same fit process it reloads the *live* weights, not the averaged ones.

What this callback guarantees:

- Only ``module.model`` (the timm network: parameters and, by default, BN statistics) is
  averaged. A parameter that does not require grad (frozen by the plan) is copied, so its
  average is the parameter itself; integer buffers are copied too.
- Validation during fit runs on the averaged weights, so ``val/*`` metrics, the monitored
  "best" checkpoint and early stopping judge the average.
- Every checkpoint's ``state_dict`` holds the averaged weights, so ``lit-ft test/predict
  --ckpt_path best|last`` (and ``trainer.test(ckpt_path=...)``) use them with no callback
  needed. The live weights travel in the callback's checkpoint state, and resuming a fit
  restores both (and the update count), so a resumed run continues exactly.
- When training ends the model holds the averaged weights.

Add to ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: lit_ft.callbacks.EMA
          init_args: {decay: 0.998}
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from lit_ft.errors import UserError


class WeightAverage(L.Callback):
    """Base class: the averaging machinery; subclasses decide when and with what weight.

    Args:
        use_buffers: also average buffers (BatchNorm running statistics); otherwise they are
            copied from the live model at each update.
    """

    def __init__(self, use_buffers: bool = True) -> None:
        self.use_buffers = use_buffers
        self.n_averaged = 0
        self._last_step = 0  # global step of the last update (one update per optimizer step)
        self._avg: Optional[dict[str, torch.Tensor]] = None  # "model.<name>" -> tensor
        self._swapped = False  # True while validation runs on the average
        self._live_final: Optional[dict[str, torch.Tensor]] = None  # live weights after on_train_end

    # ------------------------------------------------------------------ subclass API
    def update_weight(self) -> float:
        """Fraction of the new weights mixed into the average at the next update."""
        raise NotImplementedError

    def should_update_after_step(self, trainer: L.Trainer) -> bool:
        return False

    # ------------------------------------------------------------------ tensors
    @staticmethod
    def _tensors(pl_module: L.LightningModule) -> dict[str, tuple[torch.Tensor, bool]]:
        """``model.<name>`` -> (tensor, is_parameter), keys as in the LightningModule's state_dict."""
        model = pl_module.model
        out = {f"model.{n}": (p, True) for n, p in model.named_parameters()}
        out.update({f"model.{n}": (b, False) for n, b in model.named_buffers()})
        return out

    @property
    def average(self) -> Optional[dict[str, torch.Tensor]]:
        """The averaged tensors (``model.<name>`` keys), or None before fitting."""
        return self._avg

    def _init(self, pl_module: L.LightningModule) -> None:
        self._avg = {k: t.detach().clone() for k, (t, _) in self._tensors(pl_module).items()}

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule) -> None:
        """Mix the live weights into the average."""
        if self._avg is None:
            self._init(pl_module)
        w = self.update_weight()
        for key, (t, is_param) in self._tensors(pl_module).items():
            a = self._avg[key]
            if a.device != t.device:
                a = self._avg[key] = a.to(t.device)
            frozen = is_param and not t.requires_grad
            if frozen or not a.is_floating_point() or (not is_param and not self.use_buffers):
                a.copy_(t)  # a frozen parameter's average is the parameter itself
            else:
                a.lerp_(t.detach(), w)
        self.n_averaged += 1

    @torch.no_grad()
    def follow(self, pl_module: L.LightningModule) -> None:
        """Make the average equal to the live weights (without counting an update)."""
        assert self._avg is not None
        for key, (t, _) in self._tensors(pl_module).items():
            self._avg[key] = self._avg[key].to(t.device)
            self._avg[key].copy_(t)

    @torch.no_grad()
    def _swap(self, pl_module: L.LightningModule) -> None:
        assert self._avg is not None
        for key, (t, _) in self._tensors(pl_module).items():
            a = self._avg[key]
            tmp = t.detach().clone()
            t.copy_(a)
            a.copy_(tmp)
        self._swapped = not self._swapped

    def _live_and_average(self, pl_module: L.LightningModule) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model = {k: t.detach() for k, (t, _) in self._tensors(pl_module).items()}
        assert self._avg is not None
        if self._live_final is not None:  # training ended: the model already holds the average
            return self._live_final, model
        if self._swapped:  # inside validation: the roles are exchanged
            return self._avg, model
        return model, self._avg

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "model"):
            raise UserError(f"{type(self).__name__} averages `module.model`; {type(pl_module).__name__} has none")
        if self._avg is None:
            self._init(pl_module)
        self._live_final = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step > self._last_step and self.should_update_after_step(trainer):
            self.update(pl_module)
            self._last_step = trainer.global_step
            self._log(pl_module)

    def _log(self, pl_module: L.LightningModule) -> None:
        """Subclasses log their own state."""

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self.n_averaged > 0 and not self._swapped and self._live_final is None:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self._swap(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._swapped:
            self._swap(pl_module)

    @torch.no_grad()
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._avg is None or self.n_averaged == 0:
            return
        self._live_final = {k: t.detach().clone() for k, (t, _) in self._tensors(pl_module).items()}
        for key, (t, _) in self._tensors(pl_module).items():
            t.copy_(self._avg[key])

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"n_averaged": self.n_averaged, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_averaged = int(state_dict.get("n_averaged", 0))
        self._last_step = int(state_dict.get("last_step", 0))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._avg is None or self.n_averaged == 0:
            return  # nothing averaged yet: the live weights are the average
        live, avg = self._live_and_average(pl_module)
        state = checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, self.state_dict())
        state["live_state_dict"] = {k: v.detach().clone() for k, v in live.items()}
        checkpoint["state_dict"].update({k: v.detach().clone() for k, v in avg.items()})

    @torch.no_grad()
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Outside fit (validate/test/predict) the model keeps the checkpoint's state_dict: the average.
        if trainer.state.fn != TrainerFn.FITTING:
            return
        state = checkpoint.get("callbacks", {}).get(self.state_key) or {}
        live = state.get("live_state_dict")
        if live is None:
            if int(state.get("n_averaged", 0)) > 0 or not state:  # saved before any update: nothing lost
                rank_zero_warn(f"{type(self).__name__}: the checkpoint has no averaging state; averaging starts afresh from its weights")
            self._avg, self.n_averaged = None, 0
            return
        tensors = self._tensors(pl_module)
        # The module was just loaded from state_dict, i.e. with the average: keep it, then put the live weights back.
        self._avg = {k: t.detach().clone() for k, (t, _) in tensors.items()}
        for key, (t, _) in tensors.items():
            t.copy_(live[key].to(t.device))
        self._swapped = False
        self._live_final = None


class EMA(WeightAverage):
    """Exponential moving average of the weights, updated after every ``every_n_steps`` optimizer steps.

    ``avg = decay_t * avg + (1 - decay_t) * w``. With ``warmup`` the decay ramps up as
    ``decay_t = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (as in TF/timm), so a short
    fine-tuning run is not dominated by the starting weights and the random head. Logs ``ema/decay``.

    Args:
        decay: the final decay; the average spans roughly ``1 / (1 - decay)`` updates.
        warmup: ramp the decay up from 0.1 as above.
        every_n_steps: update every this many optimizer steps.
        start_step: averaging starts after this many optimizer steps, from the weights at that
            point; until then the average is the live weights (so validating before it validates
            the live model, and the fit-start weights never enter the average).
        use_buffers: also average BatchNorm statistics (else copy them).
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        every_n_steps: int = 1,
        start_step: int = 0,
        use_buffers: bool = True,
    ) -> None:
        super().__init__(use_buffers)
        if not 0 <= decay < 1:
            raise UserError(f"EMA.decay must be in [0, 1), got {decay}", "typical: 0.99 to 0.9999")
        if every_n_steps < 1 or start_step < 0:
            raise UserError(f"EMA.every_n_steps must be >= 1 and start_step >= 0, got {every_n_steps}, {start_step}")
        self.decay = decay
        self.warmup = warmup
        self.every_n_steps = every_n_steps
        self.start_step = start_step

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.n_averaged
        return min(self.decay, (1 + n) / (10 + n))

    def update_weight(self) -> float:
        return 1.0 - self.current_decay()

    def should_update_after_step(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step  # optimizer steps taken so far
        return step > self.start_step and (step - self.start_step) % self.every_n_steps == 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step <= self.start_step and self._avg is not None:
            self.follow(pl_module)  # not yet averaging: the average is the live weights
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def update(self, pl_module: L.LightningModule) -> None:
        self._decay_used = self.current_decay()
        super().update(pl_module)

    def _log(self, pl_module: L.LightningModule) -> None:
        pl_module.log("ema/decay", self._decay_used, on_step=True, on_epoch=False)


class SWA(WeightAverage):
    """Stochastic weight averaging: the equal-weight mean of the weights at the end of every
    epoch from ``start_epoch`` on (taken after the epoch's last optimizer step, before its
    validation). Until the first snapshot, validation and checkpoints use the live weights.

    Pair it with a flat or cyclic learning rate over the averaging epochs (the averaged points
    should differ). BatchNorm statistics are averaged too, which approximates recomputing them.
    Logs ``swa/n_averaged``.

    Args:
        start_epoch: first epoch whose end weights join the average.
        use_buffers: also average BatchNorm statistics (else copy them).
    """

    def __init__(self, start_epoch: int = 0, use_buffers: bool = True) -> None:
        super().__init__(use_buffers)
        if start_epoch < 0:
            raise UserError(f"SWA.start_epoch must be >= 0, got {start_epoch}")
        self.start_epoch = start_epoch

    def update_weight(self) -> float:
        return 1.0 / (self.n_averaged + 1)

    def should_update_after_step(self, trainer: L.Trainer) -> bool:
        return trainer.current_epoch >= self.start_epoch and bool(trainer.is_last_batch)

    def _log(self, pl_module: L.LightningModule) -> None:
        pl_module.log("swa/n_averaged", float(self.n_averaged), on_step=True, on_epoch=False)
