"""Gradient checkpointing behind frozen layers: the trainable blocks get the same gradients as
without checkpointing, even when the environment asks timm for reentrant checkpointing."""

from __future__ import annotations

import copy
import importlib

import pytest
import timm
import timm.layers
import timm.layers.config
import torch
import torch.nn.functional as F

from lit_ft import backbones as B
from lit_ft.errors import UserError
from lit_ft.freezing import set_trainable

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def reentrant_env(monkeypatch):
    """TIMM_REENTRANT_CKPT=1 as a user would set it: timm reads it when timm.layers.config is imported."""
    before = timm.layers.use_reentrant_ckpt()
    monkeypatch.setenv("TIMM_REENTRANT_CKPT", "1")
    importlib.reload(timm.layers.config)
    assert timm.layers.use_reentrant_ckpt()
    yield
    timm.layers.set_reentrant_ckpt(before)


def _frozen_stem(name: str) -> tuple[torch.nn.Module, list[B.LayerGroup]]:
    torch.manual_seed(0)
    kw = {"img_size": 32} if "vit" in name else {}
    model = timm.create_model(name, num_classes=4, **kw)
    groups = B.layer_groups(model)
    set_trainable(model, groups, range(1, len(groups)), train_bn=False)  # everything but the stem trains
    model.train()
    return model, groups


def _grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor | None]:
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("name", "checkpointed"), [("test_vit", "blocks."), ("test_resnet", "layer"), ("test_efficientnet", "blocks.")])
def test_trainable_blocks_behind_a_frozen_stem_get_their_gradients_under_checkpointing(name, checkpointed, reentrant_env):
    plain, groups = _frozen_stem(name)
    timm_reentrant = copy.deepcopy(plain)
    ours = copy.deepcopy(plain)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    blocks = [n for g in groups[1:-1] for n in g.param_names if n.startswith(checkpointed)]
    assert blocks

    # The failure being guarded against: timm's own switch, reentrant, leaves the blocks without gradient.
    timm_reentrant.set_grad_checkpointing(True)
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        lost = _grads(timm_reentrant, x, y)
    assert all(lost[n] is None for n in blocks)

    B.enable_grad_checkpointing(ours)
    assert not timm.layers.use_reentrant_ckpt()
    want, got = _grads(plain, x, y), _grads(ours, x, y)
    assert want.keys() == got.keys() and set(blocks) <= set(got)
    for n in got:
        assert got[n] is not None, n
        torch.testing.assert_close(got[n], want[n], msg=n)
    for g in groups[1:-1]:  # every trainable block learns something (timm zero-inits some last BN weights)
        assert any(got[n].abs().sum() > 0 for n in g.param_names), g.name


def test_a_model_without_checkpointing_is_a_user_error():
    class NoCkpt(torch.nn.Linear):
        def set_grad_checkpointing(self, enable: bool = True) -> None:
            assert not enable, "gradient checkpointing not supported"

    with pytest.raises(UserError, match="NoCkpt does not support gradient checkpointing"):
        B.enable_grad_checkpointing(NoCkpt(2, 2))
    with pytest.raises(UserError, match="Linear does not support gradient checkpointing"):
        B.enable_grad_checkpointing(torch.nn.Linear(2, 2))
