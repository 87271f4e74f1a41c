"""Channel-pruned architectures: mark them, recognise their weights, rebuild them from a fresh timm model.

A network that ``lit-ft prune`` made smaller is its timm architecture with fewer channels in
some layers. timm's ``create_model`` cannot build it from the name, and pickling the module is
not an option (every weight file is read with ``weights_only=True``). So the architecture
travels as the weights themselves plus a marker:

* :func:`mark` registers a persistent buffer ``lit_ft_pruned_from`` on the timm model (the
  parameter count of the network it was pruned from). Being in the ``state_dict``, it reaches
  every checkpoint of every later run that starts from these weights, without any other
  module having to carry it.
* :func:`rebuild` takes a fresh timm model of the same name and applies torch-pruning's own
  structural change to it (the dependency graph removes coupled channels together) until
  every layer has the widths of the saved tensors; the caller then loads the weights as usual.
  Only shapes matter here: which channel indices are removed from the fresh (random) model is
  irrelevant, because every tensor is overwritten by the load that follows.

Why shapes and not torch-pruning's ``pruning_history``: the history must be stored beside
the weights and copied forward by every checkpoint of a fine-tuned descendant; the shapes
already are.

Owns: the marker and the rebuild. Must not: choose what to prune (:mod:`lit_ft.prune`) or load
weights (:mod:`lit_ft.weights`). torch-pruning is imported only when a pruned model is built,
so lit-ft works without it until then.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lit_ft.errors import UserError

MARKER = "lit_ft_pruned_from"  # buffer on the timm model: parameter count before pruning
EXTRA = "smaller"  # the pyproject extra that installs torch-pruning


def torch_pruning() -> Any:
    """The ``torch_pruning`` module, or a :class:`UserError` saying how to install it."""
    try:
        return importlib.import_module("torch_pruning")
    except ImportError as err:
        raise UserError(
            "structured pruning needs the Python package torch-pruning, which is not installed",
            f"pip install 'lit-ft[{EXTRA}]'  (or: pip install torch-pruning)",
        ) from err


def is_pruned(state_dict: Mapping[str, Any], prefix: str = "") -> bool:
    """True if ``state_dict`` (of a timm model, keys under ``prefix``) is of a pruned network."""
    return f"{prefix}{MARKER}" in state_dict


def mark(net: nn.Module, params_before: int) -> None:
    """Mark ``net`` as pruned from a network of ``params_before`` parameters (see module docstring)."""
    net.register_buffer(MARKER, torch.tensor(int(params_before), dtype=torch.int64))


def pruned_from(net: nn.Module) -> int | None:
    """The parameter count ``net`` was pruned from, or None if it was not pruned."""
    buf = dict(net.named_buffers(recurse=False)).get(MARKER)
    return int(buf) if buf is not None else None


def example_input(net: nn.Module, input_size: Sequence[int] | None = None, batch: int = 1) -> torch.Tensor:
    """A random batch of the model's input size (timm's data config), for tracing the graph."""
    if input_size is None:
        import timm.data

        input_size = timm.data.resolve_data_config({}, model=net)["input_size"]
    param = next(net.parameters())
    return torch.randn(batch, *[int(s) for s in input_size], device=param.device)


def dependency_graph(net: nn.Module, example: torch.Tensor) -> Any:
    """torch-pruning's dependency graph of ``net`` (traced with ``example``), as a UserError if it cannot be traced."""
    tp = torch_pruning()
    try:
        return tp.DependencyGraph().build_dependency(net, example_inputs=example, verbose=False)
    except Exception as err:  # tracing failures come in many types
        raise UserError(
            f"torch-pruning cannot trace {type(net).__name__}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            "structured pruning here supports convolutional timm backbones (resnet, efficientnet, mobilenet, ...)",
        ) from err


def rebuild(net: nn.Module, state_dict: Mapping[str, torch.Tensor], input_size: Sequence[int] | None = None) -> None:
    """Shrink a fresh timm model in place to the channel widths of a pruned ``state_dict``.

    For each convolution and linear layer (the classifier excepted: its classes belong to the
    new task) whose saved weight has fewer output channels, torch-pruning removes the surplus
    together with every coupled channel (norms, depthwise convolutions, residual partners, the
    next layers' inputs). The classifier's input width follows from the features.

    Raises:
        UserError: the saved tensors cannot be reached this way (another architecture).
    """
    modes = {m: m.training for m in net.modules()}  # tracing puts the model in eval mode
    example = example_input(net, input_size)
    graph = dependency_graph(net, example)
    for m, training in modes.items():
        m.training = training
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    for name, module in net.named_modules():
        if module is head or not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        saved = state_dict.get(f"{name}.weight")
        current = module.weight.shape[0]
        if saved is None or saved.shape[0] >= current:
            continue
        pruner = graph.get_pruner_of_module(module)
        group = graph.get_pruning_group(module, pruner.prune_out_channels, idxs=list(range(saved.shape[0], current)))
        group.prune()
    if not is_pruned(dict(net.named_buffers(recurse=False))):
        mark(net, 0)  # the value comes with the weights
    target = net.state_dict()
    wrong = [k for k, v in state_dict.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    wrong = [k for k in wrong if not (head is not None and _belongs_to(net, head, k))]
    if wrong:
        k = wrong[0]
        raise UserError(
            f"the pruned weights do not fit {type(net).__name__} with fewer channels: {len(wrong)} tensor(s) differ, "
            f"e.g. {k}: file {tuple(state_dict[k].shape)} vs rebuilt {tuple(target[k].shape)}",
            "use the backbone the pruned checkpoint was made from (its hyper_parameters name it)",
        )


def _belongs_to(net: nn.Module, module: nn.Module, key: str) -> bool:
    names = {id(m): n for n, m in net.named_modules()}
    prefix = names.get(id(module))
    return prefix is not None and key.startswith(prefix + ".")
