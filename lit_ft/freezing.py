"""Apply a freeze plan to a model: ``requires_grad`` and module train/eval modes, nothing else.

Freezing never touches the optimizer: its param groups were all built up front, and an
optimizer skips parameters whose ``.grad`` is None (so a frozen group gets no update and
no weight decay). Which modules belong to which group is decided in
:func:`lit_ft.backbones.module_owners`; this module only applies a plan's decision to them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import nn

from lit_ft.backbones import LayerGroup, bn_modules, named_modules, named_parameters, tracks_running_stats


def set_trainable(model: nn.Module, groups: Sequence[LayerGroup], trainable: Iterable[int], train_bn: bool) -> None:
    """Make exactly the groups in ``trainable`` require grad.

    With ``train_bn`` the BatchNorm parameters of frozen groups keep training too. A group's
    :attr:`~lit_ft.backbones.LayerGroup.fixed` parameters (PEFT's base weights) never do: the
    plan decides which groups train, the PEFT method which of their parameters can.
    """
    trainable = set(trainable)
    params = named_parameters(model)  # also through FSDP's per-block wrappers
    bn_params = _bn_param_names(model, groups) if train_bn else set()
    for i, group in enumerate(groups):
        on = i in trainable
        fixed = set(group.fixed)
        for name in group.param_names:
            params[name].requires_grad_((on or name in bn_params) and name not in fixed)


def set_modes(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    trainable: Iterable[int],
    train_bn: bool,
    freeze_bn_stats: bool = False,
) -> None:
    """Train/eval mode of every module from the plan: a frozen group is a fixed function.

    * Every module a frozen group owns (:attr:`LayerGroup.modules`: Dropout, DropPath, timm's
      attention dropout, BatchNorm with or without affine weights, ...) goes to eval mode, so a
      frozen backbone injects no noise and keeps its running statistics. ``train_bn`` keeps
      the normalization layers with running statistics of frozen groups in train mode
      (their statistics, and with :func:`set_trainable` their weights, keep training).
    * Modules of trainable groups, and the modules that span several groups (the model
      itself, ``blocks``), follow the model's mode.
    * ``freeze_bn_stats`` keeps every normalization layer with running statistics in eval
      mode, in trainable groups too.

    A pure function of the plan: Lightning restores each submodule's captured mode after
    validation, so a module frozen earlier must be switched back explicitly when its group
    unfreezes. Call after every ``model.train()``; a model in eval mode is left alone.
    Each owned subtree is switched through its own ``train()`` (some timm modules override it
    to clear caches), top-most owned module first.
    """
    if not model.training:
        return
    trainable = set(trainable)
    mods = named_modules(model)
    for i, group in enumerate(groups):
        on = i in trainable
        owned = set(group.modules)
        for name in group.modules:
            if name == "" or name.rpartition(".")[0] not in owned:  # top of an owned subtree
                mods[name].train(on)
        for name in group.modules:
            m = mods[name]
            if tracks_running_stats(m):
                m.train((on or train_bn) and not freeze_bn_stats)


def set_bn_modes(
    model: nn.Module, groups: Sequence[LayerGroup], trainable: Iterable[int], train_bn: bool, freeze_stats: bool = False
) -> None:
    """Deprecated alias of :func:`set_modes` (which also puts Dropout/DropPath of frozen groups in eval)."""
    set_modes(model, groups, trainable, train_bn, freeze_stats)


def _bn_param_names(model: nn.Module, groups: Sequence[LayerGroup]) -> set[str]:
    names = {id(m): n for n, m in named_modules(model).items()}
    out: set[str] = set()
    for group in groups:
        for bn in bn_modules(model, group):
            prefix = names[id(bn)]
            out.update(f"{prefix}.{p}" if prefix else p for p, _ in bn.named_parameters(recurse=False))
    return out
