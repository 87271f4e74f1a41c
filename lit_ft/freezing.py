"""Apply a freeze plan to a model: ``requires_grad`` and BatchNorm modes, nothing else.

Freezing never touches the optimizer: its param groups were all built up front, and an
optimizer skips parameters whose ``.grad`` is None (so a frozen group gets no update and
no weight decay).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import nn

from lit_ft.backbones import LayerGroup, bn_modules, named_modules, named_parameters


def set_trainable(model: nn.Module, groups: Sequence[LayerGroup], trainable: Iterable[int], train_bn: bool) -> None:
    """Make exactly the groups in ``trainable`` require grad.

    With ``train_bn`` the BatchNorm parameters of frozen groups keep training too.
    """
    trainable = set(trainable)
    params = named_parameters(model)  # also through FSDP's per-block wrappers
    bn_params = _bn_param_names(model, groups) if train_bn else set()
    for i, group in enumerate(groups):
        on = i in trainable
        for name in group.param_names:
            params[name].requires_grad_(on or name in bn_params)


def set_bn_modes(
    model: nn.Module, groups: Sequence[LayerGroup], trainable: Iterable[int], train_bn: bool, freeze_stats: bool = False
) -> None:
    """BatchNorm layers of frozen groups in eval mode (running stats fixed) unless ``train_bn``;
    those of trainable groups follow the model's mode, unless ``freeze_stats`` keeps every BN
    layer in eval mode.

    A pure function of the plan: Lightning restores each submodule's captured mode after
    validation, so a BN layer frozen earlier must be switched back explicitly when its group
    unfreezes. Call after every ``model.train()``.
    """
    if not model.training:
        return
    trainable = set(trainable)
    for i, group in enumerate(groups):
        on = (train_bn or i in trainable) and not freeze_stats
        for bn in bn_modules(model, group):
            bn.train(on)


def _bn_param_names(model: nn.Module, groups: Sequence[LayerGroup]) -> set[str]:
    names = {id(m): n for n, m in named_modules(model).items()}
    out: set[str] = set()
    for group in groups:
        for bn in bn_modules(model, group):
            prefix = names[id(bn)]
            out.update(f"{prefix}.{p}" if prefix else p for p, _ in bn.named_parameters(recurse=False))
    return out
