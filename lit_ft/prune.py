"""``lit-ft prune``: remove whole channels from a trained model with torch-pruning, and measure what it saved.

    lit-ft prune --config x.yaml --ckpt_path best --ratio 0.5 [--importance taylor] [--steps 4]
    lit-ft fit --config x.yaml --model.pretrained runs/x/version_0/checkpoints/best-...-pruned50.ckpt

Unlike ``torch.nn.utils.prune`` and Lightning's ``ModelPruning``, which zero weights behind a
mask (same tensors, same speed), this removes channels: every convolution, norm and linear
layer coupled to a removed channel gets smaller, found by torch-pruning's dependency graph
(no hand-written graph here). The classifier keeps its classes; its inputs shrink with the
features.

``ratio`` is the fraction of the *parameters* to remove. torch-pruning's own knob is a
per-layer channel ratio (a convolution loses ~(1 - r)^2 of its weights when both its inputs
and outputs lose r), so the channel ratio that removes ``ratio`` of the parameters is found
by trying it on copies; which channels go is decided by ``importance``: ``magnitude`` (L2
norm of each channel's weights, no data) or ``taylor`` (|weight x gradient| summed over the
channel, first-order loss change, from a few training batches). ``steps`` > 1 prunes in
that many rounds, re-scoring the channels left after each (Taylor: with fresh gradients).

The result is an ordinary lit-ft checkpoint (``state_dict`` under ``model.``, class names,
the trained preprocessing) whose timm model carries the marker of :mod:`lit_ft.channels`;
``--model.pretrained`` rebuilds the smaller architecture from it. Parameters, MACs
(torch-pruning's counter) and CPU latency at batch 1 and 32 are measured before and after,
side by side in one process; layers that were not pruned are listed with the reason. The
BatchNorm statistics are recomputed on training images after pruning (``bn_batches``), where
pruning changed what the layer sees.

Owns: choosing and removing channels, the report, the pruned checkpoint. Must not: train
(fine-tuning is an ordinary ``lit-ft fit``), or touch :class:`ImageClassifier`'s internals
(it reads ``model.model``, ``class_names``, ``data_config`` and ``hparams``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveInt
from torch import nn

from lit_ft import channels as C
from lit_ft.errors import UserError

if TYPE_CHECKING:  # type hints only
    from lit_ft.cli import LitFTCLI
    from lit_ft.models import ImageClassifier

Importance = Literal["magnitude", "taylor"]
MAX_CHANNEL_RATIO = 0.95  # never empty a layer: keep at least 5% of every group's channels
RATIO_TOLERANCE = 0.05  # a ratio the prunable layers miss by more than this (as a fraction of the parameters) is refused


# --------------------------------------------------------------------------- what a model costs


def param_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def macs(net: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass at ``input_size`` (C, H, W), torch-pruning's counter."""
    tp = C.torch_pruning()
    count, _ = tp.utils.count_ops_and_params(net, C.example_input(net, input_size))
    return int(count)


@torch.no_grad()
def measure_latency(
    nets: Mapping[str, nn.Module], input_size: Sequence[int], batch_sizes: Sequence[int] = (1, 32),
    rounds: int = 5, repeats: int = 3, channels_last: bool = False,
) -> dict[str, dict[int, float]]:
    """Median milliseconds per forward pass of each network at each batch size, on the CPU.

    Side by side (``lit_ft.export.measure_latency``): each of ``rounds`` rounds times every
    network ``repeats`` times in turn, after three warm-up calls each, so a load change on a
    shared machine hits all of them alike. The networks run in eval mode with torch's current thread count, all in one memory format
    (NHWC with ``channels_last``), so the format is not what is compared.
    """
    from lit_ft.export import measure_latency as time_side_by_side

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cpu = {name: copy.deepcopy(net).cpu().eval().to(memory_format=fmt) for name, net in nets.items()}
    return time_side_by_side(cpu, input_size, batch_sizes, rounds=rounds, repeats=repeats, memory_format=fmt)


# --------------------------------------------------------------------------- the report


@dataclass
class PruneReport:
    """What :func:`prune_network` removed and what it saved (also stored in the pruned checkpoint)."""

    ratio: float  # requested fraction of the parameters to remove
    channel_ratio: float  # torch-pruning's per-layer channel ratio that achieves it
    importance: str
    steps: int
    input_size: list[int]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    unpruned: list[dict[str, str]] = field(default_factory=list)  # {"name", "reason"}: layers left whole
    notes: list[dict[str, str]] = field(default_factory=list)  # {"name", "reason"}: pruned by a default guess
    latency_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # {"before"/"after": {batch: ms}}
    threads: int = 0
    source: Optional[str] = None
    out: Optional[str] = None
    bn: Optional[str] = None  # what became of the BatchNorm statistics, in words (None: no BN layer)

    @property
    def removed(self) -> float:
        """Fraction of the parameters actually removed."""
        return 1 - self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A plain-text table for the terminal: before, after and the ratio of each measure."""
        rows = [
            ("parameters", f"{self.params_before:,}", f"{self.params_after:,}", _ratio(self.params_before, self.params_after)),
            ("MACs", f"{self.macs_before:,}", f"{self.macs_after:,}", _ratio(self.macs_before, self.macs_after)),
        ]
        for b in sorted(self.latency_ms.get("before", {})):
            before, after = self.latency_ms["before"][b], self.latency_ms["after"][b]
            rows.append((f"CPU ms, batch {b}", f"{before:.2f}", f"{after:.2f}", _ratio(before, after)))
        width = max(len(r[0]) for r in rows)
        lines = [
            f"pruned {self.removed:.1%} of the parameters (asked {self.ratio:.0%}; channel ratio {self.channel_ratio:.3f}, "
            f"importance {self.importance}, {self.steps} step(s)), input {tuple(self.input_size)}"
            + (f", {self.threads} CPU thread(s)" if self.latency_ms else ""),
            f"{'':<{width}}  {'before':>14}  {'after':>14}  {'smaller by':>10}",
        ]
        lines += [f"{name:<{width}}  {b:>14}  {a:>14}  {r:>10}" for name, b, a, r in rows]
        if self.unpruned:
            lines.append(f"not pruned ({len(self.unpruned)}):")
            lines += [f"  {u['name']}: {u['reason']}" for u in self.unpruned]
        if self.notes:
            lines.append("pruned by torch-pruning's default guess (check them):")
            lines += [f"  {u['name']}: {u['reason']}" for u in self.notes]
        if self.bn:
            lines.append(f"BatchNorm statistics: {self.bn}")
        return "\n".join(lines)


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x" if after else "-"


# --------------------------------------------------------------------------- pruning a timm network


def prune_network(
    net: nn.Module,
    ratio: float,
    importance: Importance = "magnitude",
    steps: int = 1,
    input_size: Optional[Sequence[int]] = None,
    calibration: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None,
    round_to: Optional[int] = None,
) -> PruneReport:
    """Remove ``ratio`` of ``net``'s parameters as whole channels, in place; the classifier keeps its classes.

    Args:
        net: a timm model (``get_classifier()`` names the head).
        ratio: fraction of the parameters to remove, in (0, 1).
        importance: ``magnitude`` (no data) or ``taylor`` (needs ``calibration``).
        steps: prune in this many rounds, re-scoring the remaining channels after each.
        input_size: (C, H, W) for tracing and MACs; default: the model's data config.
        calibration: (images, labels) batches whose loss gradients score channels (Taylor).
        round_to: keep channel counts multiples of this (vector units like multiples of 8).

    Raises:
        UserError: a ratio outside (0, 1), Taylor without data, a model torch-pruning cannot
            trace, or a ratio the prunable layers cannot reach.
    """
    tp = C.torch_pruning()
    if not 0 < ratio < 1:
        raise UserError(f"--ratio must be between 0 and 1 (a fraction of the parameters), got {ratio}", "e.g. --ratio 0.5")
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if importance not in ("magnitude", "taylor"):
        raise UserError(f"unknown importance {importance!r}", "use magnitude or taylor")
    if importance == "taylor" and not calibration:
        raise UserError("taylor importance needs training batches for its gradients", "give the command data with a training split, or use --importance magnitude")
    if C.pruned_from(net) is not None:
        raise UserError(
            "this model was pruned already; pruning a pruned model again would lose its original size",
            "prune the unpruned checkpoint with a larger --ratio (or more --steps) instead",
        )
    input_size = list(input_size or C.example_input(net).shape[1:])
    example = C.example_input(net, input_size)
    head = net.get_classifier()
    net.eval()
    params_before, macs_before = param_count(net), macs(net, input_size)
    target = (1 - ratio) * params_before

    def pruner(model: nn.Module, channel_ratio: float, scorer: Any) -> Any:
        try:
            return tp.pruner.BasePruner(
                model, C.example_input(model, input_size), importance=scorer, pruning_ratio=channel_ratio,
                iterative_steps=steps, ignored_layers=[model.get_classifier()], round_to=round_to,
            )
        except Exception as err:  # tracing failures come in many types
            raise UserError(
                f"torch-pruning cannot trace {type(model).__name__}: {type(err).__name__}: {_first_line(err)}",
                "structured pruning here supports convolutional timm backbones (resnet, efficientnet, mobilenet, ...)",
            ) from err

    # The widths a channel ratio leads to do not depend on which channels go (each group loses
    # the same count whatever its scores), so the search prunes copies by magnitude, no data.
    counts: dict[float, int] = {}

    def params_at(channel_ratio: float) -> int:
        if channel_ratio not in counts:
            trial = copy.deepcopy(net)
            p = pruner(trial, channel_ratio, tp.importance.MagnitudeImportance(p=2))
            for _ in range(steps):
                p.step()
            counts[channel_ratio] = param_count(trial)
        return counts[channel_ratio]

    lo, hi = 0.0, MAX_CHANNEL_RATIO
    at_hi = params_at(hi)
    graph_info = _coverage(net, C.dependency_graph(net, example), head)
    if 1 - at_hi / params_before < ratio - RATIO_TOLERANCE:
        raise UserError(
            f"removing whole channels can take at most {1 - at_hi / params_before:.0%} of this model's parameters, "
            f"not {ratio:.0%}" + (f" ({len(graph_info['unpruned'])} layer(s) cannot be pruned, e.g. "
                                  f"{graph_info['unpruned'][0]['name']}: {graph_info['unpruned'][0]['reason']})"
                                  if graph_info["unpruned"] else ""),
            "ask for a smaller --ratio",
        )
    for _ in range(10):  # bisection on a monotone count: 2^-10 of the range is about one channel in a thousand
        mid = (lo + hi) / 2
        if params_at(mid) > target:
            lo = mid
        else:
            hi = mid
    channel_ratio = min((lo, hi), key=lambda r: abs(params_at(r) - target))

    widths_before = _widths(net, head)
    scorer = tp.importance.TaylorImportance() if importance == "taylor" else tp.importance.MagnitudeImportance(p=2)
    p = pruner(net, channel_ratio, scorer)
    for _ in range(steps):
        if importance == "taylor":
            _accumulate_gradients(net, calibration)
        p.step()
    net.zero_grad(set_to_none=True)
    try:
        with torch.no_grad():
            logits = net(example)
    except Exception as err:
        raise UserError(
            f"after pruning, {type(net).__name__} no longer runs: {type(err).__name__}: {_first_line(err)}",
            "torch-pruning does not handle every layer of this architecture (e.g. attention heads); "
            "structured pruning here supports convolutional timm backbones (resnet, efficientnet, mobilenet, ...)",
        ) from err
    assert logits.shape[-1] == _out_width(head), "the classifier lost classes"  # ignored_layers keeps them
    C.mark(net, params_before)
    widths_after = _widths(net, head)
    unpruned = list(graph_info["unpruned"])
    for name, width in widths_before.items():
        if widths_after.get(name) == width and name not in {u["name"] for u in unpruned}:
            unpruned.append({"name": name, "reason": f"kept all {width} output channels (too few to remove any at this ratio, "
                                                     "or coupled to a layer that cannot lose any)"})
    head_name = next(n for n, m in net.named_modules() if m is head)
    unpruned.insert(0, {"name": head_name, "reason": f"the classifier keeps its {_out_width(head)} classes (its inputs shrink with the features)"})
    return PruneReport(
        ratio=float(ratio), channel_ratio=float(channel_ratio), importance=importance, steps=int(steps),
        input_size=[int(s) for s in input_size], params_before=params_before, params_after=param_count(net),
        macs_before=macs_before, macs_after=macs(net, input_size), unpruned=unpruned, notes=graph_info["notes"],
    )


def _accumulate_gradients(net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Loss gradients of every parameter over ``batches``, for Taylor scores. Eval mode: BatchNorm
    statistics stay as trained (train mode would update them from these few batches)."""
    net.zero_grad(set_to_none=True)
    device = next(net.parameters()).device
    for p in net.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        for x, y in batches:
            F.cross_entropy(net(x.to(device)), y.to(device)).backward()


def _widths(net: nn.Module, head: nn.Module) -> dict[str, int]:
    """Output channels of every convolution and linear layer but the classifier."""
    return {n: _out_width(m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not head}


def _out_width(m: nn.Module) -> int:
    return int(m.weight.shape[0])


def _coverage(net: nn.Module, graph: Any, head: nn.Module) -> dict[str, list[dict[str, str]]]:
    """Layers whose parameters no pruning group reaches (``unpruned``), and parameters outside any
    layer that torch-pruning prunes along a guessed dimension (``notes``)."""
    covered: set[int] = set()
    for group in graph.get_all_groups(ignored_layers=list(head.modules()), root_module_types=[nn.Conv2d, nn.Linear]):
        for dep, _ in group:
            target = dep.target.module
            if isinstance(target, nn.Parameter):
                covered.add(id(target))
            elif isinstance(target, nn.Module):
                covered.update(id(p) for p in target.parameters(recurse=False))
    covered.update(id(p) for p in head.parameters())
    unpruned: dict[str, dict[str, str]] = {}
    for name, module in net.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in covered]
        if own:
            unpruned[name] = {
                "name": name or type(net).__name__,
                "reason": f"{type(module).__name__} ({', '.join(n for n, _ in own)}) is in no pruning group: torch-pruning "
                          "found no channel dependency it can follow through it",
            }
    names = {id(p): n for n, p in net.named_parameters()}
    notes = [  # torch-pruning's (parameter, dim) pairs for tensors that no layer type owns, e.g. layer scales
        {"name": names.get(id(u.parameters), "?"), "reason": f"a parameter outside any layer, pruned along dimension {u.pruning_dim}"}
        for u in graph.unwrapped_parameters
    ]
    return {"unpruned": list(unpruned.values()), "notes": notes}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# --------------------------------------------------------------------------- a trained lit-ft model


def prune(
    model: "ImageClassifier",
    ratio: float = 0.5,
    importance: Importance = "magnitude",
    steps: int = 1,
    out: Optional[str | Path] = None,
    datamodule: Any = None,
    calibration_batches: int = 8,
    round_to: Optional[int] = None,
    latency_rounds: int = 5,
    source: Optional[str] = None,
    input_size: Optional[Sequence[int]] = None,
    bn_batches: int = 32,
) -> PruneReport:
    """Prune a copy of ``model``'s network (``model`` is left as it is), measure both side by
    side, and (with ``out``) save the smaller one as a lit-ft checkpoint.

    From Python::

        report = prune(model, ratio=0.5, out="pruned.ckpt", datamodule=dm)
        print(report.summary())
        small = ImageClassifier("efficientnet_lite0", pretrained="pruned.ckpt")  # then fit it

    Args:
        model: a trained :class:`~lit_ft.ImageClassifier` (e.g. from ``--ckpt_path``).
        ratio, importance, steps, round_to: see :func:`prune_network`.
        out: where to write the pruned checkpoint; ``None``: do not write one.
        datamodule: a lit-ft datamodule; its training batches score channels for Taylor, and
            its ``grayscale_to_rgb`` goes into the checkpoint's preprocessing.
        calibration_batches: training batches for Taylor scores.
        latency_rounds: rounds of the side-by-side CPU latency measurement (0: skip it).
        source: where ``model`` came from (recorded in the report).
        input_size: (C, H, W) for tracing, MACs and latency; default: the model's trained
            preprocessing (``model.data_config``).
        bn_batches: batches (of ``eval_batch_size`` training images, eval transform) over which
            the BatchNorm statistics are recomputed after pruning (:func:`recalibrate_bn_after_pruning`);
            0, or no ``datamodule``: keep the unpruned model's (the report says which).
    """
    if bn_batches < 0:
        raise UserError(f"--bn_batches must be >= 0, got {bn_batches}", "0 keeps the unpruned model's BatchNorm statistics")
    input_size = list(input_size or model.data_config["input_size"])
    original = model.model
    net = copy.deepcopy(original).cpu()
    calibration = None
    if importance == "taylor" and datamodule is not None:
        calibration = _training_batches(model, datamodule, calibration_batches)
    report = prune_network(net, ratio, importance, steps, input_size, calibration, round_to)
    report.bn = recalibrate_bn_after_pruning(original, net, model, datamodule, bn_batches)
    if latency_rounds > 0:
        nhwc = getattr(model, "memory_format", None) == torch.channels_last  # as the model runs
        latency = measure_latency({"before": original, "after": net}, input_size, rounds=latency_rounds, channels_last=nhwc)
        report.latency_ms, report.threads = latency, torch.get_num_threads()
    report.source = source
    if out is not None:
        report.out = str(out)
        save_pruned(model, net, out, report, grayscale_to_rgb=getattr(datamodule, "grayscale_to_rgb", True))
    return report


def _prepare(model: "ImageClassifier", dm: Any) -> None:
    if hasattr(dm, "set_data_config") and getattr(dm, "trainer", None) is None:
        dm.set_data_config(model.data_config)  # the checkpoint's trained preprocessing
    dm.setup("fit")


def bn_layers_with_intact_inputs(before: nn.Module, after: nn.Module) -> list[str]:
    """Names of the BN layers of ``after`` (the pruned copy of ``before``) that come before the
    first convolution or linear layer whose input channels were cut, in module order.

    Up to that layer every kept channel computes what it computed before pruning (a depthwise
    convolution that lost whole channels still sees its own input unchanged), so those BN layers'
    statistics still hold; everything after it sees other features.
    """
    from lit_ft.weight_space import named_bn_layers

    fan_in = {n: m.weight.shape[1] for n, m in before.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    bns = named_bn_layers(after)
    intact = []
    for name, m in after.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[1] != fan_in.get(name):
            break
        if name in bns:
            intact.append(name)
    return intact


def recalibrate_bn_after_pruning(
    before: nn.Module, after: nn.Module, model: "ImageClassifier", datamodule: Any, bn_batches: int
) -> Optional[str]:
    """Recompute the BatchNorm statistics of the pruned network ``after`` on training images.

    Removing channels changes what every later layer sees, so the unpruned model's running
    statistics no longer fit (a 50%-pruned EfficientNet-Lite0 tests at chance with them). The
    layers whose inputs pruning left intact (:func:`bn_layers_with_intact_inputs`) keep theirs:
    the layers after them were trained against those (frozen ImageNet statistics, say).
    Returns what was done, in words, or None when the network has no BN layer.
    """
    from lit_ft.weight_space import named_bn_layers, recalibrate_bn

    total = len(named_bn_layers(after))
    if not total:
        return None
    if not bn_batches:
        return "kept from the unpruned model (bn_batches: 0); they no longer fit the pruned layers, fine-tune before use"
    if datamodule is None or not hasattr(datamodule, "eval_dataloader"):
        return "kept from the unpruned model (no data to recompute them on); fine-tune before use"
    _prepare(model, datamodule)
    keep = bn_layers_with_intact_inputs(before, after)
    loader = datamodule.eval_dataloader("train", limit=bn_batches * datamodule.eval_batch_size)
    recalibrate_bn(after, loader, transform=datamodule.batch_transform("eval"), keep=keep)
    images = min(bn_batches * datamodule.eval_batch_size, len(datamodule.train_dataset))
    kept = f"; the {len(keep)} before the first pruned input kept theirs" if keep else ""
    return f"recomputed on {images} training images in {total - len(keep)} of {total} BN layers{kept}"


def _training_batches(model: "ImageClassifier", dm: Any, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    _prepare(model, dm)
    batches = []
    for x, y in dm.train_dataloader():
        batches.append((x, y))
        if len(batches) >= n:
            break
    return batches


def save_pruned(
    model: "ImageClassifier", net: nn.Module, path: str | Path, report: PruneReport, grayscale_to_rgb: bool = True
) -> Path:
    """Write ``net`` (the pruned copy of ``model.model``) as an ordinary lit-ft checkpoint.

    The hyper-parameters are the network's own (backbone, classes, dropout), not the training
    options of the run it came from: regularizers, mixup or a teacher belong to the fine-tuning
    run that follows. ``checkpoint["lit_ft"]["pruned"]`` holds the report.
    """
    from lit_ft.callbacks.checkpointing import atomic_save

    hp = dict(model.hparams)
    hyper = {
        "backbone": hp.get("backbone"),
        "pretrained": False,
        "num_classes": model.num_classes,
        "class_names": list(model.class_names),
        **{k: hp[k] for k in ("drop_rate", "drop_path_rate", "head_init") if k in hp},
    }
    checkpoint = {
        "pytorch-lightning_version": L.__version__,
        "epoch": 0,
        "global_step": 0,
        "state_dict": {f"model.{k}": v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "hyper_parameters": hyper,
        "lit_ft": {
            "class_names": list(model.class_names),
            "data_config": {**_plain(model.data_config), "grayscale_to_rgb": bool(grayscale_to_rgb)},
            "pruned": _plain(report.to_dict()),
        },
    }
    path = Path(path)
    atomic_save(checkpoint, path)
    return path


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively: a checkpoint holds plain data only (``weights_only`` loading)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_report(path: str | Path) -> Optional[dict[str, Any]]:
    """The pruning report stored in a pruned checkpoint, or None for any other checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return (ckpt.get("lit_ft") or {}).get("pruned")


# --------------------------------------------------------------------------- the command


def prune_command(
    cli: "LitFTCLI",
    ratio: OpenUnitInterval = 0.5,
    importance: Importance = "magnitude",
    steps: PositiveInt = 1,
    out: Optional[str] = None,
    calibration_batches: PositiveInt = 8,
    round_to: Optional[PositiveInt] = None,
    latency_rounds: NonNegativeInt = 5,
    bn_batches: NonNegativeInt = 32,
) -> None:
    """Remove whole channels from a trained model (torch-pruning) and write a smaller checkpoint.

    Prints parameters, MACs and CPU latency (batch 1 and 32) before and after, and every layer
    left whole with the reason. Fine-tune the result with ``lit-ft fit --model.pretrained OUT``
    (optionally with the unpruned checkpoint as teacher: ``--model.distill.teacher CKPT``).

    Args:
        ratio: fraction of the parameters to remove (0.5 = half); torch-pruning's per-layer
            channel ratio that achieves it is found by search and reported.
        importance: which channels go: ``magnitude`` (L2 norm of their weights) or ``taylor``
            (|weight x loss gradient|, from ``calibration_batches`` training batches).
        steps: prune in this many rounds, re-scoring the channels left after each.
        out: the pruned checkpoint; default: beside ``--ckpt_path`` as ``<name>-pruned<pct>.ckpt``.
        calibration_batches: training batches whose gradients score channels (taylor only).
        round_to: keep channel counts multiples of this (e.g. 8 for CPU vector units).
        latency_rounds: rounds of the side-by-side CPU latency measurement; 0 skips it.
        bn_batches: batches of training images (of data.eval_batch_size, eval transform) over
            which the BatchNorm statistics are recomputed after pruning, so that the pruned
            checkpoint is usable before fine-tuning; 0 keeps the unpruned model's (which no
            longer fit). BN layers before the first pruned input keep theirs.
    """
    ckpt = cli.config.get("ckpt_path")
    if out is None:
        if not ckpt:
            raise UserError("lit-ft prune needs --ckpt_path (the trained model) or --out", "e.g. lit-ft prune -c x.yaml --ckpt_path best")
        out = str(Path(ckpt).with_name(f"{Path(ckpt).stem}-pruned{round(ratio * 100)}.ckpt"))
    report = prune(
        cli.model, ratio, importance, steps, out=out, datamodule=cli.datamodule, calibration_batches=calibration_batches,
        round_to=round_to, latency_rounds=latency_rounds, source=ckpt, bn_batches=bn_batches,
    )
    print(report.summary())
    print(f"lit-ft: pruned checkpoint {out}\n  fine-tune it: lit-ft fit <your config> --model.pretrained {out}", flush=True)
