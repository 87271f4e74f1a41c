"""DELTA (Li et al., ICLR 2019): keep chosen feature maps close to the pretrained network's.

A frozen copy of the pretrained backbone (the "teacher") sees the same batch; forward hooks
collect the feature maps of the chosen layers in both networks, and the penalty is their squared
distance, optionally weighted per channel by how much the target task relies on that channel.
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from lit_ft.errors import UserError
from lit_ft.regularizers.base import Regularizer, StepOutputs, check_nonnegative

if TYPE_CHECKING:  # pragma: no cover
    from lit_ft.models.classifier import ImageClassifier


class _Enough(Exception):
    """Raised by the teacher's last hook: the rest of its forward pass is not needed."""


def channel_view(t: Any) -> torch.Tensor:
    """A hooked output as (B, C, L): conv maps (B, C, H, W) -> (B, C, H*W); tokens (B, N, D) -> (B, D, N)."""
    if isinstance(t, (tuple, list)):
        t = t[0]
    if t.ndim == 4:
        return t.flatten(2)
    if t.ndim == 3:
        return t.transpose(1, 2)
    if t.ndim == 2:
        return t.unsqueeze(-1)
    raise UserError(f"DELTA cannot use a layer output of shape {tuple(t.shape)}", "hook a block/stage output instead")


class DELTA(Regularizer):
    """``alpha/2 * sum_layers mean_batch sum_c w_c * mean_positions (FM_c(w, x) - FM_c(w0, x))^2``.

    ``w0`` is a frozen copy of the backbone taken when the classifier is built (its pretrained
    weights), stored under ``regularizers.<i>.teacher`` so resume restores it. The teacher runs
    only as far as the deepest chosen layer, without gradients, and only while some backbone
    parameter trains (a frozen backbone produces the teacher's features anyway). Its BatchNorm
    layers normalize like the student's in the same step (batch statistics where the student's
    train) and never update their statistics, so the penalty is 0 at the starting point.

    With ``attention`` each channel gets a weight ``w_c`` (mean 1) from how much the task loss
    would rise without it, estimated to first order (``-grad . activation``, summed over the map)
    over the first ``attention_batches`` batches in which the backbone trains; weights are
    ``C * softmax(standardized increases)``. Until then, and without ``attention``, ``w_c = 1``.
    Pair it with LinearProbe-first plans (FreezeUnfreeze, LPFT) so the head that scores the
    channels is already trained. Weights are buffers: saved and restored with checkpoints.

    The term is summed over channels, so its size grows with the hooked layers' width: compare
    ``reg/delta`` with ``train/task_loss`` in TensorBoard. On EfficientNet-Lite0 at 64 px with the
    default layers (512 channels) ``alpha=0.01`` made it ~10x the task loss; 0.001 is comparable.

    Args:
        alpha: penalty weight.
        layers: module names of the timm model to match (e.g. ``[blocks.2, blocks.4]`` for
            EfficientNet, ``[layer3, layer4]`` for ResNet); default the modules of timm's
            ``feature_info`` (one per stage).
        attention: weight channels by their estimated importance for the task.
        attention_batches: batches used to estimate the channel weights.
    """

    name = "delta"

    def __init__(
        self,
        alpha: float = 0.001,
        layers: Optional[Sequence[str]] = None,
        attention: bool = False,
        attention_batches: int = 8,
    ) -> None:
        super().__init__()
        check_nonnegative(alpha=alpha)
        if attention_batches < 1:
            raise UserError(f"DELTA.attention_batches must be >= 1, got {attention_batches}")
        self.alpha = alpha
        self.layers = list(layers) if layers is not None else None
        self.attention = attention
        self.attention_batches = attention_batches
        self._student: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ setup
    def bind(self, module: "ImageClassifier") -> None:
        model = module.model
        if self.layers is None:
            info = getattr(model, "feature_info", None)
            if not info:
                raise UserError(f"{type(model).__name__} has no timm feature_info", "set DELTA.layers to module names")
            self.layers = [f["module"] for f in info]
        names = dict(model.named_modules())
        missing = [n for n in self.layers if n not in names or not n]
        if missing:
            suggest = [f["module"] for f in getattr(model, "feature_info", [])]
            raise UserError(
                f"DELTA.layers {missing} are not modules of {type(model).__name__}",
                f"use module names such as {suggest}" if suggest else "list names with model.named_modules()",
            )
        self.teacher = copy.deepcopy(model)  # the pretrained network, frozen
        self.teacher.requires_grad_(False)
        if self.attention:
            channels = self._channels(module)
            for i, c in enumerate(channels):
                self.register_buffer(f"attention_{i}", torch.ones(c))  # (C,), mean 1
                self.register_buffer(f"importance_{i}", torch.zeros(c))  # running sum of estimates
            self.register_buffer("attention_seen", torch.zeros((), dtype=torch.long))

    def _channels(self, module: "ImageClassifier") -> list[int]:
        size = tuple(module.data_config.get("input_size", (3, 224, 224)))
        with torch.no_grad():
            maps = self._teacher_maps(torch.zeros(1, *size))
        return [channel_view(maps[n]).shape[1] for n in self.layers]

    # ------------------------------------------------------------------ hooks
    @staticmethod
    def _hooks(model: nn.Module, layers: Sequence[str], store: dict, stop: bool) -> list:
        modules = dict(model.named_modules())

        def make(name: str) -> Callable:
            def hook(_mod: nn.Module, _inp: Any, output: Any) -> None:
                store[name] = output
                if stop and len(store) == len(layers):
                    raise _Enough

            return hook

        return [modules[n].register_forward_hook(make(n)) for n in layers]

    @contextlib.contextmanager
    def _hooked(self, model: nn.Module, store: dict, stop: bool) -> Iterator[None]:
        handles = self._hooks(model, self.layers, store, stop)
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _teacher_maps(self, x: torch.Tensor, student: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
        """Feature maps of the teacher; with ``student``, its BatchNorm layers normalize the way the
        student's do in this step (batch statistics where the student's BN trains), without ever
        updating the teacher's running statistics. At ``w = w0`` the penalty is then exactly 0."""
        store: dict[str, torch.Tensor] = {}
        switched = []
        # The teacher's module flags follow the classifier's (so Lightning sees no module stuck
        # in eval mode); for its own pass it is in eval mode: no dropout, no statistics updates.
        was_training = self.teacher.training
        self.teacher.eval()
        if student is not None:
            mods = dict(self.teacher.named_modules())
            for name, bn in student.named_modules():
                if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training:
                    t = mods[name]
                    t.training, t.track_running_stats = True, False  # batch statistics, no update
                    switched.append(t)
        try:
            with self._hooked(self.teacher, store, stop=True):
                try:
                    self.teacher.forward_features(x)
                except _Enough:
                    pass
        finally:
            for t in switched:
                t.track_running_stats = True
            self.teacher.train(was_training)
        return store

    @staticmethod
    def _active(module: "ImageClassifier") -> bool:
        params = dict(module.model.named_parameters())
        return any(params[n].requires_grad for g in module.groups[:-1] for n in g.param_names)

    @contextlib.contextmanager
    def capture(self, module: "ImageClassifier") -> Iterator[None]:
        self._student = {}
        if not self._active(module) or self.alpha == 0:
            yield
            return
        with self._hooked(module.model, self._student, stop=False):
            yield

    # ------------------------------------------------------------------ penalty
    def penalty(self, module: "ImageClassifier", out: StepOutputs) -> torch.Tensor:
        student, self._student = self._student, {}
        if len(student) != len(self.layers):
            return out.loss.new_zeros(())  # backbone frozen: nothing to pull back
        with torch.no_grad():
            teacher = self._teacher_maps(out.x.contiguous(memory_format=module.memory_format), module.model)
        if self.attention and int(self.attention_seen) < self.attention_batches:
            self._update_attention(student, out.loss)
        total = out.loss.new_zeros(())
        for i, name in enumerate(self.layers):
            s, t = channel_view(student[name]), channel_view(teacher[name])  # (B, C, L)
            per_channel = ((s - t) ** 2).mean(-1)  # (B, C)
            if self.attention:
                per_channel = per_channel * getattr(self, f"attention_{i}")
            total = total + per_channel.sum(1).mean(0)
        return 0.5 * self.alpha * total

    def _update_attention(self, student: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        acts = [student[n] if torch.is_tensor(student[n]) else student[n][0] for n in self.layers]
        grads = torch.autograd.grad(loss, acts, retain_graph=True, allow_unused=True)
        seen = int(self.attention_seen) + 1
        for i, (a, g) in enumerate(zip(acts, grads)):
            if g is None:
                continue
            # First-order loss increase when channel c is zeroed: -sum(grad * act) over its map.
            rise = -(channel_view(g.detach()) * channel_view(a.detach())).sum(-1).mean(0)  # (C,)
            imp = getattr(self, f"importance_{i}")
            imp += rise.to(imp.dtype)
            z = (imp - imp.mean()) / imp.std().clamp_min(1e-12)
            getattr(self, f"attention_{i}").copy_(imp.numel() * torch.softmax(z, 0))
        self.attention_seen.fill_(seen)
