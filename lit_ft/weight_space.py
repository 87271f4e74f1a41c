"""Weight-space operations on lit-ft classifiers: averaging, interpolation, BatchNorm statistics,
and writing the result as an ordinary lit-ft checkpoint.

Owns: reading checkpoints for these operations (:func:`read_checkpoint`), :func:`average` and
:func:`interpolate` of state dicts, :func:`recalibrate_bn` and :func:`derived_checkpoint`. The
recipes built on them are :mod:`lit_ft.soup` (model soups) and :mod:`lit_ft.wise` (WiSE-FT);
nothing here knows about either, and nothing here trains. :class:`WeightEvaluator` (load a state,
recompute BN statistics, validate with Lightning) and :func:`prepare_data` serve both.

Why BatchNorm statistics are recomputed: the running mean/variance of an average of networks is
not the average of their running statistics (the features the averaged layer sees are not the
average of the features each network saw), and BN networks (ResNet, EfficientNet) lose much of
a soup's or an interpolation's accuracy to that mismatch (arXiv 2301.10092; wise-ft#10).

Why not ``torch.optim.swa_utils.update_bn`` (hand-written here in ~30 lines): it puts the whole
network in train mode, so dropout and stochastic depth (drop-path, on in timm's EfficientNets)
are active during the pass and the statistics describe a network that evaluation never runs (and
change from run to run); it has no batch limit and no hook for on-device transforms; and it
restores one mode for every module, losing per-module modes such as lit-ft's frozen BN layers.
Lightning's own SWA BN update had a momentum bug (Lightning#14866): here every BN layer's
momentum is set to ``None`` (cumulative average over the pass) and restored afterwards.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lit_ft.callbacks.checkpointing import atomic_save, refuse_code_pickle
from lit_ft.errors import UserError
from lit_ft.experiment import evaluate

PathLike = Union[str, Path]
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops")
State = dict[str, torch.Tensor]

# What a derived checkpoint keeps from the one it is based on: the model's arguments, lit-ft's
# entry (class names, trained preprocessing) and Lightning's bookkeeping, but no training state
# (optimizer, schedulers, loops, callbacks): like a weights-only checkpoint, it tests, predicts,
# exports and fine-tunes further (--model.pretrained), but does not resume a fit.
KEPT_KEYS = (
    "pytorch-lightning_version", "hyper_parameters", "hparams_name", "datamodule_hyper_parameters",
    "datamodule_hparams_name", "lit_ft", "epoch", "global_step",
)


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """A lit-ft checkpoint, read with ``weights_only=True`` and memory-mapped (the optimizer and
    loop state it may hold are left out: they are never read here, and so never loaded).

    Raises:
        UserError: missing, unreadable, needs code to unpickle, or not a lit-ft classifier checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}", "pass .ckpt files written by lit-ft fit")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise refuse_code_pickle(path, err) from err
    except Exception as err:  # truncated files, not a torch file, ...
        raise UserError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}", "is it a complete lit-ft .ckpt?") from err
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("model.") for k in state) or "hyper_parameters" not in ckpt:
        raise UserError(f"{path} is not a lit-ft checkpoint (no model weights or hyperparameters)", "pass .ckpt files written by lit-ft fit")
    return {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}


def average(states: Sequence[Mapping[str, torch.Tensor]], weights: Optional[Sequence[float]] = None) -> State:
    """The (weighted) mean of state dicts with the same keys and shapes.

    Floating-point tensors are averaged in float64 and cast back, so the average of identical
    states is bit-identical to each of them. Integer tensors (``num_batches_tracked``) are taken
    from the first state.
    """
    if not states:
        raise ValueError("average() needs at least one state dict")
    w = torch.tensor([1.0] * len(states) if weights is None else list(weights), dtype=torch.float64)
    if len(w) != len(states) or float(w.sum()) <= 0 or bool((w < 0).any()):
        raise ValueError(f"weights must be {len(states)} non-negative numbers with a positive sum, got {weights}")
    w = w / w.sum()
    first = states[0]
    for other in states[1:]:
        if other.keys() != first.keys():
            raise ValueError(f"state dicts differ in keys, e.g. {sorted(set(first) ^ set(other))[:3]}")
    out: State = {}
    for key, ref in first.items():
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for wi, state in zip(w.tolist(), states):
            acc += wi * state[key].to(torch.float64)
        out[key] = acc.to(ref.dtype)
    return out


def interpolate(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], alpha: float) -> State:
    """``(1 - alpha) * start + alpha * end`` for every floating-point tensor.

    ``alpha`` 0 and 1 return exact copies of ``start`` and ``end``. Integer tensors come from
    ``end``.
    """
    if start.keys() != end.keys():
        raise ValueError(f"state dicts differ in keys, e.g. {sorted(set(start) ^ set(end))[:3]}")
    if alpha == 0:
        return {k: v.clone() for k, v in start.items()}
    if alpha == 1:
        return {k: v.clone() for k, v in end.items()}
    return {
        k: torch.lerp(start[k].to(torch.float64), v.to(torch.float64), float(alpha)).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in end.items()
    }


def bn_layers(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers that keep running statistics (timm's BatchNormAct2d included)."""
    return list(named_bn_layers(model).values())


def named_bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    """:func:`bn_layers` by module name (the prefix of their state-dict keys)."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


def shared_bn_statistics(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    """Names of the BN layers whose running mean and variance are bit-identical in every state.

    Such a layer was in eval mode throughout every run (a frozen group, a linear-probe phase,
    ``freeze_bn_stats``): the layers after it learnt against those fixed statistics, so an
    average keeps them (recomputing them would change what those layers were trained on).
    """
    shared = []
    for name in named_bn_layers(model):
        keys = (f"{name}.running_mean", f"{name}.running_var")
        if all(k in s for s in states for k in keys) and all(
            torch.equal(s[k], states[0][k]) for s in states[1:] for k in keys
        ):
            shared.append(name)
    return shared


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    keep: Collection[str] = (),
) -> int:
    """Recompute every BatchNorm layer's running statistics from ``batches``; returns how many layers.

    Each BN layer's statistics are reset and become the cumulative average of the batch
    statistics over the whole pass (``momentum=None``), with only the BN layers in train mode:
    dropout and drop-path stay off, as in evaluation. No gradients; the parameters are untouched.
    Afterwards every module's mode and every BN layer's momentum are what they were. Nothing is
    changed when the model has no BN layer (no pass is made) or when ``batches`` is empty (then
    a :class:`UserError`).

    Args:
        model: any module; called as ``model(x)`` on the images of each batch.
        batches: image tensors ``(B, C, H, W)`` or ``(images, ...)`` tuples, e.g. a datamodule's
            ``eval_dataloader("train")``; moved to the model's device.
        transform: applied to each image batch on the device (e.g. ``batch_transform("eval")``).
        keep: names of BN layers (as in ``named_modules``) that keep their statistics: they stay
            in eval mode during the pass (e.g. :func:`shared_bn_statistics`).
    """
    layers = [m for name, m in named_bn_layers(model).items() if name not in set(keep)]
    if not layers:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in layers}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = 0
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: equal weight for every batch
            m.train()
        for batch in batches:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            x = x.to(device)
            model(transform(x) if transform is not None else x)
            n += 1
        if n == 0:
            raise UserError("no batches to recompute the BatchNorm statistics from", "give the data a training split")
    except BaseException:
        for m, (mean, var, count) in saved.items():  # leave the statistics as they were
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            if count is not None:
                m.num_batches_tracked.copy_(count)
        raise
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return len(layers)


def derived_checkpoint(base: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], kind: str, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """An ordinary lit-ft checkpoint holding ``state_dict``, built on checkpoint ``base``.

    Keeps ``base``'s hyperparameters and ``lit_ft`` entry (classes, trained preprocessing), so
    ``lit-ft test --ckpt_path`` and ``ImageClassifier.load_from_checkpoint(..., weights_only=True)``
    load it as they would ``base``; records ``provenance`` under ``lit_ft[kind]`` (plain data).
    """
    ckpt = {k: base[k] for k in KEPT_KEYS if k in base}
    ckpt["state_dict"] = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    lit = dict(ckpt.get("lit_ft") or {})
    lit[kind] = dict(provenance)
    ckpt["lit_ft"] = lit
    return ckpt


def save_checkpoint(checkpoint: Mapping[str, Any], path: PathLike) -> Path:
    """Write ``checkpoint`` atomically (never a half-written file); returns the path."""
    path = Path(path)
    if path.suffix != ".ckpt":
        raise UserError(f"output {path} should end in .ckpt", "e.g. --out runs/soup.ckpt")
    try:
        atomic_save(dict(checkpoint), path)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}", "choose another --out folder") from err
    return path


# ---------------------------------------------------------------------------- judging weights


def snapshot(model: nn.Module) -> State:
    """A detached CPU copy of ``model``'s state dict."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def prepare_data(datamodule: Any, model: nn.Module, ckpt: str, names: Optional[Sequence[str]]) -> None:
    """Set up ``datamodule`` for the training and validation images with the checkpoint's
    trained preprocessing (user options still win), after checking its classes."""
    data_names = getattr(datamodule, "class_names", None)
    if names and data_names and list(names) != list(data_names):
        raise UserError(
            f"{ckpt} was trained on classes {_short(names)} but the data has {_short(data_names)}",
            "use the data the runs were trained on (same config)",
        )
    datamodule.set_data_config(model.data_config)
    datamodule.setup("fit")
    if getattr(datamodule, "val_dataset", None) is None:
        raise UserError("the data has no validation split to judge the weights on", "set data.val_split (e.g. 0.1)")


class WeightEvaluator:
    """Loads a state dict into ``model``, recomputes its BN statistics if asked, and validates it.

    Args:
        model: the classifier that holds each state in turn.
        dm: a datamodule prepared by :func:`prepare_data`.
        bn_batches: batches (of ``eval_batch_size`` training images) for BN statistics; 0: never.
        device: where BN statistics are recomputed (default: CUDA if available, else CPU).
        trainer_kwargs: options of :func:`~lit_ft.experiment.evaluate`'s quiet trainers.
    """

    def __init__(self, model: nn.Module, dm: Any, bn_batches: int, device: Any, trainer_kwargs: Mapping[str, Any]) -> None:
        self.model, self.dm, self.bn_batches = model, dm, bn_batches
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.trainer_kwargs = dict(trainer_kwargs)
        self.has_bn = bool(bn_layers(model))

    def load(self, state: Mapping[str, torch.Tensor], combined: Optional[Sequence[Mapping[str, torch.Tensor]]] = None) -> None:
        """Load ``state``; if it combines the states ``combined`` (two or more), recompute the
        statistics of the BN layers in which those differ (:func:`shared_bn_statistics` keep theirs)."""
        self.model.load_state_dict(state)
        if combined is not None and len(combined) > 1 and self.bn_batches and self.has_bn:
            self.model.to(self.device)
            loader = self.dm.eval_dataloader("train", limit=self.bn_batches * self.dm.eval_batch_size)
            keep = shared_bn_statistics(self.model, combined)
            recalibrate_bn(self.model, loader, transform=self.dm.batch_transform("eval"), keep=keep)
            self.model.cpu()

    def accuracy(
        self, state: Mapping[str, torch.Tensor], combined: Optional[Sequence[Mapping[str, torch.Tensor]]] = None, split: str = "val"
    ) -> float:
        """:meth:`load`, then the ``split`` accuracy (Lightning's validate/test, the classifier's metrics)."""
        self.load(state, combined)
        return evaluate(self.model, self.dm, split=split, **self.trainer_kwargs)[f"{split}/acc"]

    def bn_description(self, combined: Sequence[Mapping[str, torch.Tensor]], averaged: str = "averaged") -> str:
        """How the BN statistics of a state combining ``combined`` came about, in words."""
        if not self.has_bn:
            return "none in this network"
        if len(combined) < 2:
            return "of the single run, unchanged"
        total = len(bn_layers(self.model))
        shared = len(shared_bn_statistics(self.model, combined))
        if not self.bn_batches:
            return f"{averaged} (bn_batches: 0)"
        if shared == total:
            return f"kept: the same in every run in all {total} BN layers (frozen)"
        images = min(self.bn_batches * self.dm.eval_batch_size, len(self.dm.train_dataset))
        kept = f"; the other {shared} were frozen (the same in every run) and kept" if shared else ""
        return f"recomputed on {images} training images in {total - shared} of {total} BN layers{kept}"


def _short(names: Sequence[Any], n: int = 4) -> str:
    names = list(names)
    return "[" + ", ".join(map(str, names[:n])) + (", ..." if len(names) > n else "") + f"] ({len(names)})"
