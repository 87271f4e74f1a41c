"""Parameter-efficient fine-tuning: LoRA, DoRA and (IA)^3 adapters from HF ``peft``, and BitFit,
inside lit-ft's layer groups, freeze plans, learning rates and checkpoints.

Owns: the :class:`PEFT` config (``model.peft`` in YAML); choosing the modules to adapt (per-family
defaults, the user's ``target_modules``); injecting peft's adapters into the timm model in place
(:func:`adapt`); the layer groups after the injection (each adapter in the group of the module it
adapts, the base weights listed in :attr:`LayerGroup.fixed <lit_ft.backbones.LayerGroup>`, so no
freeze plan ever trains them); merging adapters into a plain timm model (:func:`merge`); the
adapter file (:func:`save_adapters`, :func:`load_adapters`).

Must not: hand-write adapter layers or merge arithmetic (peft's layers and their ``merge()`` do
both); touch the optimizer, the plan or Lightning; import ``peft`` before a PEFT model is built
(it is an optional extra, ``pip install 'lit-ft[peft]'``, and pulls in ``transformers``).

Why in place (``peft.inject_adapter_in_model``) and not ``get_peft_model``: the latter wraps the
timm model in a ``PeftModel`` whose parameter names start ``base_model.model.`` and which has no
``group_matcher``/``forward_head``. In place, the timm model keeps its contract; only the adapted
modules change: ``blocks.0.attn.qkv`` becomes a peft layer holding ``base_layer`` (the original
``nn.Linear``) and ``lora_A.default``/``lora_B.default``. Layer groups are computed on the plain
model first and then carried over by name (:func:`regroup`), so no ``group_matcher`` regex has to
cope with the inserted names.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import torch
from torch import nn

from lit_ft.backbones import LayerGroup, data_config, module_owners
from lit_ft.errors import UserError

Method = Literal["lora", "dora", "ia3", "bitfit"]
ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "lit_ft_adapter.json"

# Default modules to adapt per timm family (model class name -> globs over module names; a glob
# also matches any name ending in "." + glob). Transformers: attention and MLP projections (timm
# fuses q, k and v into one `qkv` Linear: one rank-r update covers all three, which peft handles
# as a plain Linear; peft#691). ConvNeXt: the pointwise MLP of each block (its 7x7 depthwise conv
# has groups > 1, which peft's LoRA cannot merge). EfficientNet/MobileNet: the 1x1 expansion and
# projection convs and the head conv (depthwise convs: same reason). ResNet: the block convs.
# Any other family: every adaptable Linear/Conv2d outside the first group (the stem) and the head.
VIT_TARGETS = ["attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "mlp.fc1", "mlp.fc2"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{k: VIT_TARGETS for k in ("VisionTransformer", "Eva", "Beit", "SwinTransformer", "SwinTransformerV2")},
    "ConvNeXt": ["mlp.fc1", "mlp.fc2"],
    **{k: ["blocks.*.conv_pw", "blocks.*.conv_pwl", "blocks.*.conv_exp", "blocks.*.conv", "conv_head"] for k in ("EfficientNet", "MobileNetV3")},
    "ResNet": ["layer*.conv1", "layer*.conv2", "layer*.conv3"],
}


@dataclass
class PEFT:
    """Parameter-efficient fine-tuning of the backbone: ``model.peft: {method: lora, r: 8}``.

    The backbone's weights stay as loaded (never trained, whatever the freeze plan says); small
    adapters (LoRA/DoRA/(IA)^3, from HF peft) or the biases (BitFit) train, and the head always
    trains fully. Adapters belong to the layer group of the module they adapt, so ``lr_mult``,
    ``layer_decay`` and freeze plans (e.g. ``FreezeUnfreeze``: head first, then the adapters) act on
    them. Normalization layers follow the plan as in full fine-tuning: BatchNorm statistics update
    in trainable groups unless the plan says ``freeze_bn_stats: true`` (adapter files keep them).
    A BatchNorm in training mode divides any per-channel scale of its input away, so DoRA's
    magnitudes on a conv followed by BatchNorm learn nothing there (its direction part does).

    Args:
        method: ``lora`` (W + alpha/r * B A, B = 0 at the start), ``dora`` (LoRA with a learnt
            per-output magnitude), ``ia3`` (learnt per-channel scales; no rank), ``bitfit`` (only
            the biases train; no adapters).
        r: rank of the LoRA/DoRA update.
        alpha: LoRA scale numerator (update = alpha / r * B A); default ``r`` (scale 1).
        dropout: dropout on the input of the LoRA/DoRA branch.
        target_modules: which modules to adapt: full module names, name endings (``qkv`` matches
            ``blocks.0.attn.qkv``) or globs (``blocks.1*.attn.qkv``). Default: per family
            (``DEFAULT_TARGETS``). Adaptable: ``nn.Linear`` and ungrouped ``nn.Conv2d`` outside
            the head. For ``bitfit``: the modules whose biases train (default: every bias). For
            ``ia3``, convs and targets named ``fc2`` get their input scaled (for ``fc2``: the MLP's
            hidden units), the others their output.
        base: where the base weights come from, written into adapter files
            (:func:`save_adapters`); default the model's ``pretrained``, filled in when the model is
            built and kept in its checkpoints.
    """

    method: Method = "lora"
    r: int = 8
    alpha: Optional[float] = None
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None
    base: Union[bool, str, None] = None

    def __post_init__(self) -> None:
        if self.method not in ("lora", "dora", "ia3", "bitfit"):
            raise UserError(f"unknown PEFT method {self.method!r}", "use one of lora, dora, ia3, bitfit")
        if not (isinstance(self.r, int) and self.r >= 1):
            raise UserError(f"peft.r must be a positive integer, got {self.r!r}", "typical ranks are 4-32")
        if self.alpha is not None and not self.alpha > 0:
            raise UserError(f"peft.alpha must be > 0, got {self.alpha}", "leave it unset for alpha = r")
        if not 0 <= self.dropout < 1:
            raise UserError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            raise UserError(f"peft.target_modules must be a list, got {self.target_modules!r}", f"write [{self.target_modules}]")
        if self.target_modules is not None and not self.target_modules:
            raise UserError("peft.target_modules is empty: nothing would be adapted", "leave it unset for the family's default")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.r)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for ``hparams``: checkpoints load with ``weights_only=True``)."""
        return asdict(self)

    @classmethod
    def coerce(cls, value: Union["PEFT", dict, None], base: Union[bool, str, None] = None) -> Optional["PEFT"]:
        """A :class:`PEFT` from itself or from its :meth:`to_dict` (a checkpoint's ``hparams``), a
        copy with ``base`` filled in (when unset) from the model's ``pretrained``."""
        if value is None:
            return None
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise UserError(f"unknown peft option(s) {unknown}", f"valid options: {', '.join(sorted(known))}")
            value = cls(**value)
        if not isinstance(value, cls):
            raise UserError(f"model.peft must be a PEFT config, got {type(value).__name__}", "e.g. peft: {method: lora, r: 8}")
        return replace(value, base=value.base if value.base is not None else (base or None))

    def describe(self) -> str:
        if self.method == "bitfit":
            return "bitfit"
        if self.method == "ia3":
            return "ia3"
        return f"{self.method} r={self.r} alpha={self.lora_alpha:g}" + (f" dropout={self.dropout:g}" if self.dropout else "")


# --------------------------------------------------------------------------- choosing modules


def adaptable(module: nn.Module) -> bool:
    """True for a module peft's LoRA/DoRA/(IA)^3 can adapt *and merge back*: ``nn.Linear``, or an
    ``nn.Conv2d`` with ``groups == 1`` (peft refuses to merge grouped/depthwise convs), whose class
    keeps torch's ``forward``. A subclass that changes it (timm's ``Conv2dSame`` pads inside
    ``forward``) would give the adapter branch other inputs than the base layer sees."""
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and type(module).forward is nn.Conv2d.forward
    return False


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _group_of_params(groups: list[LayerGroup]) -> dict[str, int]:
    return {n: i for i, g in enumerate(groups) for n in g.param_names}


def body_modules(model: nn.Module, groups: list[LayerGroup], with_bias: bool = False) -> dict[str, nn.Module]:
    """Modules whose own parameters lie in body groups (not the head), by name, in model order:
    adaptable ones that the forward pass calls (:func:`called_modules`), or (``with_bias``) any
    that owns a ``bias`` parameter."""
    where = _group_of_params(groups)
    head = len(groups) - 1
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False)]
        if not own or any(where.get(n, head) == head for n in own):
            continue
        if (with_bias and isinstance(getattr(m, "bias", None), nn.Parameter)) or (not with_bias and adaptable(m)):
            out[name] = m
    if not with_bias:
        called = called_modules(model, out)
        out = {n: m for n, m in out.items() if n in called}
    return out


def called_modules(model: nn.Module, modules: dict[str, nn.Module]) -> set[str]:
    """Which of ``modules`` a forward pass of ``model`` calls (one image of the model's input
    size, eval mode, no gradient, a private generator: no state or RNG changes). An adapter
    lives in its module's ``forward``; a parent that reads the weight itself bypasses it: timm's
    EVA and BEiT compute ``F.linear(x, self.qkv.weight, qkv_bias)`` when q and v have their own
    biases, so a LoRA on their ``qkv`` would train nothing and merge into something else."""
    seen: set[str] = set()
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.add(name)) for name, m in modules.items()]
    was_training = model.training
    try:
        model.eval()
        size = tuple(data_config(model)["input_size"])
        x = torch.randn((1, *size), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(x.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen


def default_targets(model: nn.Module, groups: list[LayerGroup], candidates: dict[str, nn.Module]) -> list[str]:
    """The family's default target globs, or every candidate (:func:`body_modules`) outside the
    stem (the first group: a 3-channel input conv has nothing to compress)."""
    for cls in type(model).__mro__:
        if cls.__name__ in DEFAULT_TARGETS:
            return list(DEFAULT_TARGETS[cls.__name__])
    stem = set(groups[0].param_names) if len(groups) > 2 else set()
    return [n for n, m in candidates.items() if not any(f"{n}.{p}" in stem for p, _ in m.named_parameters(recurse=False))]


def resolve_targets(model: nn.Module, groups: list[LayerGroup], patterns: Optional[list[str]], bitfit: bool = False) -> list[str]:
    """Full names of the modules to adapt (model order) from ``patterns`` (default: the family's).

    Raises:
        UserError: a pattern matches no adaptable module (naming the candidates, and why a module
            of that name cannot be adapted: the head, a ``ConvNormAct`` container, a depthwise
            conv, a module the forward pass never calls).
    """
    candidates = body_modules(model, groups, with_bias=bitfit)
    if bitfit and patterns is None:  # BitFit: every bias of the body
        return list(candidates)
    chosen = patterns if patterns is not None else default_targets(model, groups, candidates)
    out: set[str] = set()
    for pattern in chosen:
        hit = [n for n in candidates if _matches(n, pattern)]
        if hit:
            out.update(hit)
        elif patterns is not None:  # a default glob a variant of the family lacks is fine
            raise _no_target(model, groups, pattern, candidates, bitfit)
    if not out:
        raise UserError(
            f"PEFT found no module to adapt in {type(model).__name__} (tried {chosen})",
            f"set peft.target_modules, e.g. [{', '.join(_short_names(candidates)[:4])}]",
        )
    return [n for n in candidates if n in out]


def _short_names(names: Iterable[str]) -> list[str]:
    """``blocks.3.attn.qkv`` -> ``attn.qkv``: the distinct name endings without indices, in order."""
    short = []
    for n in names:
        parts = n.split(".")
        tail = [p for p in parts if not p.isdigit()]
        s = ".".join(tail[-2:]) if len(tail) > 1 and not parts[-1].isdigit() else n
        short.append(s)
    return list(dict.fromkeys(short))


def _no_target(model: nn.Module, groups: list[LayerGroup], pattern: str, candidates: dict[str, nn.Module], bitfit: bool) -> UserError:
    what = "module with a bias" if bitfit else "adaptable module (nn.Linear, ungrouped nn.Conv2d)"
    named = [(n, m) for n, m in model.named_modules() if n and _matches(n, pattern)]
    where = _group_of_params(groups)
    why = ""
    if named:
        n, m = named[0]
        params = [f"{n}.{p}" for p, _ in m.named_parameters()]
        if params and all(where.get(p) == len(groups) - 1 for p in params):
            why = f"; {n} is the classifier, which always trains fully"
        elif adaptable(m) and not bitfit:
            why = (f"; the forward pass never calls {n} (its parent reads {n}.weight itself), so an adapter "
                   "there would be bypassed")
        elif isinstance(m, nn.Conv2d) and m.groups > 1:
            why = f"; {n} is a grouped/depthwise conv (groups={m.groups}): peft cannot merge an adapter into it"
        elif not bitfit:
            inner = [f"{n}.{c}" for c, sub in m.named_modules() if c and f"{n}.{c}" in candidates]
            why = f"; {n} is a {type(m).__name__}" + (f": target its {', '.join(inner[:3])}" if inner else "")
    names = list(candidates)
    close = difflib.get_close_matches(pattern, _short_names(names) + names, n=4, cutoff=0.5)
    return UserError(
        f"peft.target_modules: {pattern!r} matches no {what} of {type(model).__name__}{why}",
        f"candidates: {', '.join(_short_names(names)[:12])}" + (f" (closest: {', '.join(close)})" if close else "")
        + "; a name ending (qkv), a full name (blocks.0.attn.qkv) or a glob (blocks.1*.attn.qkv)",
    )


# --------------------------------------------------------------------------- injecting


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - the extra is part of `make install`
        raise UserError("model.peft needs the peft package", "pip install 'lit-ft[peft]'") from err
    return peft


def _tuner_layer_class():
    return _peft().tuners.tuners_utils.BaseTunerLayer


def peft_config(config: PEFT, targets: list[str], model: Optional[nn.Module] = None):
    """peft's config for ``config`` adapting exactly the modules ``targets`` (full names, matched
    as one anchored regex: peft's list form also matches any name *ending* in an entry)."""
    peft = _peft()
    regex = "^(?:" + "|".join(re.escape(t) for t in targets) + ")$"
    if config.method == "ia3":
        # Scale the input of convs (their output feeds a BatchNorm, which in training mode divides
        # any per-channel output scale away again) and of a transformer MLP's fc2 (its hidden
        # units, as in the (IA)^3 paper); the output of the others (attention's q, k, v).
        mods = dict(model.named_modules()) if model is not None else {}
        ff = [t for t in targets if t.rsplit(".", 1)[-1] == "fc2" or isinstance(mods.get(t), nn.Conv2d)]
        ff_regex = "^(?:" + "|".join(re.escape(t) for t in ff) + ")$" if ff else []
        return peft.IA3Config(target_modules=regex, feedforward_modules=ff_regex)
    return peft.LoraConfig(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.dropout, target_modules=regex,
        use_dora=config.method == "dora", bias="none",
    )


def adapt(config: PEFT, model: nn.Module, groups: list[LayerGroup]) -> list[LayerGroup]:
    """Apply ``config`` to ``model`` in place and return its new layer groups.

    ``groups`` are the plain model's (computed before this call). LoRA/DoRA/(IA)^3: peft's layers
    replace the target modules; BitFit changes no module. In the returned groups every adapter
    parameter sits in the group of the module it adapts, and :attr:`LayerGroup.fixed` lists the
    group's parameters that never train: every parameter the plain model had outside the head,
    except, for BitFit, the chosen biases. ``requires_grad`` is set to match (the plan's
    :func:`lit_ft.freezing.set_trainable` keeps the fixed ones off from then on).
    """
    before = {n for n, _ in model.named_parameters()}
    targets = resolve_targets(model, groups, config.target_modules, bitfit=config.method == "bitfit")
    if config.method == "bitfit":
        trainable_base = {f"{t}.bias" if t else "bias" for t in targets}
    else:
        _peft().inject_adapter_in_model(peft_config(config, targets, model), model)
        adapted = set(tuner_layers(model))
        assert adapted == set(targets), f"peft adapted {sorted(adapted ^ set(targets))[:3]} unexpectedly"
        trainable_base = set()
    new = regroup(model, groups, before, trainable_base)
    fixed = set(fixed_names(new))
    for n, p in model.named_parameters():
        p.requires_grad_(n not in fixed)
    return new


def tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft's layers in ``model`` (the adapted modules), by name."""
    try:
        cls = _tuner_layer_class()
    except UserError:  # pragma: no cover - peft not installed: no model holds its layers
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def _origin(name: str, hosts: list[str]) -> tuple[Optional[str], Optional[str]]:
    """(the name a parameter had before injection or None for an adapter, its host module)."""
    for host in hosts:  # longest first
        if name.startswith(host + "."):
            rest = name[len(host) + 1 :]
            if rest.startswith("base_layer."):
                return f"{host}.{rest[len('base_layer.'):]}", host
            return None, host
    return name, None


def regroup(model: nn.Module, groups: list[LayerGroup], before: set[str], trainable_base: set[str]) -> list[LayerGroup]:
    """The layer groups of the adapted ``model`` from the plain model's ``groups`` (whose parameter
    names were ``before``): base parameters keep their group under their new names, adapters join
    their host module's group; ``fixed`` = base parameters outside the head not in ``trainable_base``.
    Asserted: every parameter in exactly one group."""
    where = _group_of_params(groups)
    head = len(groups) - 1
    hosts = sorted(tuner_layers(model), key=len, reverse=True)
    host_group = {h: next(where[n] for n in before if n.startswith(h + ".")) for h in hosts}
    members: list[list[str]] = [[] for _ in groups]
    fixed: list[list[str]] = [[] for _ in groups]
    for name, _ in model.named_parameters():
        origin, host = _origin(name, hosts)
        if origin is None:  # an adapter parameter
            members[host_group[host]].append(name)
            continue
        assert origin in before, f"parameter {name} ({origin}) is new but not under a peft layer"
        i = where[origin]
        members[i].append(name)
        if i != head and origin not in trainable_base:
            fixed[i].append(name)
    params = dict(model.named_parameters())
    scales = [
        [n for n in members[i] if _origin(n, hosts)[0] is None and sum(s > 1 for s in params[n].shape) <= 1]
        for i in range(len(groups))
    ]  # adapter vectors: (IA)^3's (C, 1) scales, DoRA's magnitudes
    new = [
        LayerGroup(
            g.name, members[i], list(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else "" for n in members[i])),
            fixed=fixed[i], no_decay=scales[i],
        )
        for i, g in enumerate(groups)
    ]
    all_names = [n for g in new for n in g.param_names]
    assert len(all_names) == len(set(all_names)) == len(dict(model.named_parameters())), "a parameter is in no or two groups"
    for g, owned in zip(new, module_owners(model, new)):
        g.modules = owned
    return new


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapter parameters (those under a peft layer but not its ``base_layer``)."""
    hosts = sorted(tuner_layers(model), key=len, reverse=True)
    return [n for n, _ in model.named_parameters() if _origin(n, hosts)[0] is None]


def summary(model: nn.Module, groups: list[LayerGroup], config: PEFT) -> str:
    """One line for the plan table: method, adapted modules, adapter and trainable fractions."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    adapters = sum(params[n].numel() for n in adapter_names(model))
    base = total - adapters
    can_train = sum(params[n].numel() for g in groups for n in g.param_names if n not in set(g.fixed))
    hosts = list(tuner_layers(model))
    where = f" on {len(hosts)} modules ({', '.join(_short_names(hosts)[:6])})" if hosts else ""
    return (
        f"PEFT {config.describe()}{where}: adapters {adapters:,} parameters = {100 * adapters / max(base, 1):.2f}% of the "
        f"base model's {base:,}; trainable {can_train:,} of {total:,} ({100 * can_train / max(total, 1):.2f}%, head "
        "included); base weights fixed"
    )


# --------------------------------------------------------------------------- merging and files


def _network(model: nn.Module) -> nn.Module:
    """The timm model of an :class:`~lit_ft.ImageClassifier` (its ``model``), or ``model`` itself."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "forward_features") else model


def merge(model: nn.Module) -> nn.Module:
    """A plain timm model (same class, same state-dict keys as ``timm.create_model``) computing
    what the adapted ``model`` (an ImageClassifier or its timm model) computes; ``model`` is left
    untouched. Each peft layer's own ``merge()`` folds its adapter into the base weight; the layer
    is then replaced by its base module. (peft's ``merge_and_unload`` lives on the tuner object that
    ``inject_adapter_in_model`` does not return; this is its unload step, through peft's public
    layer API.) BitFit's trained biases are already in the model: it is copied as is.
    """
    merged = copy.deepcopy(_network(model))
    layers = tuner_layers(merged)
    for name, layer in layers.items():
        if any(name.startswith(other + ".") for other in layers):  # inside another peft layer: merged with it
            continue
        layer.merge(safe_merge=True)  # peft's arithmetic; raises on NaN/inf in the merged weight
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent) if parent else merged, child, layer.get_base_layer())
    if hasattr(merged, "peft_config"):  # peft records its config on the model it adapted
        del merged.peft_config
    merged.requires_grad_(True)
    return merged


def fixed_names(groups: Iterable[LayerGroup]) -> list[str]:
    return [n for g in groups for n in g.fixed]


def base_fingerprint(model: nn.Module, names: Iterable[str]) -> str:
    """SHA-256 of the fixed base tensors (name, shape, bytes): an adapter file records it, and
    loading it onto other base weights is refused instead of silently giving other predictions."""
    params = dict(_network(model).named_parameters())
    h = hashlib.sha256()
    for n in sorted(names):
        t = params[n].detach().to("cpu", torch.float32).contiguous()
        h.update(n.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_adapters(module: nn.Module, directory: Union[str, Path]) -> Path:
    """Write the adapters alone: ``adapters.safetensors`` (every tensor of the adapted timm model
    but the fixed base weights: adapters, the head, BitFit's biases, normalization statistics) and
    ``lit_ft_adapter.json`` (the base reference: backbone, base weights, classes, the PEFT config,
    the base's fingerprint, the trained preprocessing); for LoRA/DoRA/(IA)^3 also peft's own
    ``adapter_config.json``. :func:`load_adapters` rebuilds the model from them.

    ``module``: an :class:`~lit_ft.ImageClassifier` built with ``peft``.

    Raises:
        UserError: the model has no PEFT config, or its base weights have no reference (random
            init: nothing outside this model could rebuild them; export the merged model instead).
    """
    from safetensors.torch import save_file

    config = PEFT.coerce(getattr(module, "peft", None))
    hp = getattr(module, "hparams", {})
    if config is None:
        raise UserError("the model has no adapters (model.peft is not set)", "export the full model instead")
    base = config.base if config.base is not None else hp.get("pretrained")
    if base in (None, False, ""):
        raise UserError(
            "the adapters' base model was randomly initialised (pretrained: false): an adapter file could not be "
            "applied to anything else",
            "export the merged model instead, or fine-tune from a weights file/package (model.pretrained)",
        )
    net = _network(module)
    fixed = fixed_names(module.groups)
    skip = set(fixed)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items() if k not in skip}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / ADAPTER_FILE))
    record = {
        "format": "lit-ft adapters 1",
        "backbone": hp.get("backbone"),
        "base": base,
        "num_classes": getattr(module, "num_classes", hp.get("num_classes")),
        "class_names": list(getattr(module, "class_names", None) or hp.get("class_names") or []),
        "group_granularity": hp.get("group_granularity", "coarse"),
        "peft": {**config.to_dict(), "base": base},
        "base_sha256": base_fingerprint(net, fixed),
        "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in (getattr(module, "data_config", None) or {}).items()},
    }
    (out / CONFIG_FILE).write_text(json.dumps(record, indent=2))
    if getattr(net, "peft_config", None):
        net.peft_config["default"].save_pretrained(str(out))  # peft's adapter_config.json, for the record
    return out


def load_adapters(directory: Union[str, Path]) -> nn.Module:
    """The adapted timm model from :func:`save_adapters`' files: the base rebuilt from its
    reference, the adapters injected and loaded (call :func:`merge` for a plain timm model).

    Raises:
        UserError: missing files, or base weights that differ from those the adapters were trained on.
    """
    from safetensors.torch import load_file

    from lit_ft.backbones import create_backbone, layer_groups

    d = Path(directory)
    if not (d / CONFIG_FILE).is_file() or not (d / ADAPTER_FILE).is_file():
        raise UserError(f"{d} holds no lit-ft adapters ({CONFIG_FILE} + {ADAPTER_FILE})", "write them with lit_ft.peft.save_adapters")
    record = json.loads((d / CONFIG_FILE).read_text())
    config = PEFT.coerce(record["peft"])
    net = create_backbone(record["backbone"], record["num_classes"], record["base"])
    groups = adapt(config, net, layer_groups(net, record.get("group_granularity", "coarse")))
    fixed = fixed_names(groups)
    if base_fingerprint(net, fixed) != record["base_sha256"]:
        raise UserError(
            f"the base weights {record['base']!r} differ from those the adapters in {d} were trained on",
            "point lit_ft_adapter.json's `base` at the original weights",
        )
    missing, unexpected = net.load_state_dict(load_file(str(d / ADAPTER_FILE)), strict=False)
    assert set(missing) == set(fixed) and not unexpected, f"adapter file does not fit: {unexpected[:3] or sorted(set(missing) - set(fixed))[:3]}"
    return net
