"""Frozen is frozen: a frozen layer group injects no noise and keeps its statistics in train mode.

Dropout, DropPath, timm's attention/patch dropout and BatchNorm (with or without affine
weights) of frozen groups go to eval mode; trainable groups keep following the model's mode.
Pure functions on plain timm models, plus the path the classifier takes (its plan runner).
"""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from torch import nn

from lit_ft import backbones as B
from lit_ft.freezing import set_bn_modes, set_modes, set_trainable
from lit_ft.schedules import LinearProbe
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Every stochastic knob each family has, so a module left in train mode shows up as noise.
# efficientnet_lite0 rather than test_efficientnet: the tiny one has no residual block, so its
# DropPath never runs; resnet10t without timm's zero-initialised last BN of each block, which
# would zero the residual branch and hide DropPath/DropBlock.
NOISY = {
    "efficientnet_lite0": dict(drop_rate=0.3, drop_path_rate=0.3),
    "test_vit": dict(drop_rate=0.3, drop_path_rate=0.3, attn_drop_rate=0.3, proj_drop_rate=0.3, patch_drop_rate=0.3, img_size=64),
    "resnet10t": dict(drop_rate=0.3, drop_path_rate=0.3, drop_block_rate=0.3, zero_init_last=False),
    "test_convnext": dict(drop_rate=0.3, drop_path_rate=0.3),
}


def _probe_state(model: nn.Module, train_bn: bool = False, freeze_bn_stats: bool = False) -> list[B.LayerGroup]:
    """The state a LinearProbe plan puts the model in: only the head trains, model in train mode."""
    groups = B.layer_groups(model)
    head = {len(groups) - 1}
    set_trainable(model, groups, head, train_bn)
    model.train()
    set_modes(model, groups, head, train_bn, freeze_bn_stats)
    return groups


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("name", list(NOISY))
def test_a_frozen_backbone_is_a_fixed_function_in_train_mode(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, **NOISY[name])
    x = torch.randn(4, 3, 64, 64)  # large enough that train-mode BatchNorm does not normalise the noise away

    # Control: with every group trainable the same batch gives different features (the knobs bite).
    model.train()
    assert not torch.equal(model.forward_features(x), model.forward_features(x))

    _probe_state(model)
    before = _buffers(model)
    f1, f2 = model.forward_features(x), model.forward_features(x)
    assert torch.equal(f1, f2)  # no Dropout / DropPath / DropBlock / PatchDropout active in frozen groups
    after = _buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics untouched
    # The trainable head still follows the model's mode: its dropout (drop_rate) is active.
    assert not torch.equal(model(x), model(x))


def test_the_classifier_path_freezes_dropout_and_drop_path_too():
    # The classifier's hooks apply the plan through its PlanRunner, and model.train() re-applies it.
    from lit_ft.plan import TrainingPlan

    torch.manual_seed(0)
    model = tiny_model("test_vit", drop_rate=0.3, drop_path_rate=0.3, freeze=LinearProbe())
    model.runner.apply(TrainingPlan(model.freeze).trainable(0, 0))
    model.train()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.features(x), model.features(x))


def _non_affine_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4, norm_layer=functools.partial(nn.BatchNorm2d, affine=False))
    assert any(isinstance(m, nn.BatchNorm2d) and not m.affine for m in model.modules())
    return model


@pytest.mark.parametrize("via", ["set_modes", "set_bn_modes"])
def test_batchnorm_without_affine_weights_in_a_frozen_group_keeps_its_running_stats(via):
    model = _non_affine_resnet()
    groups = B.layer_groups(model)
    head = {len(groups) - 1}
    set_trainable(model, groups, head, train_bn=False)
    model.train()
    (set_modes if via == "set_modes" else set_bn_modes)(model, groups, head, False, False)
    before = _buffers(model)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    after = _buffers(model)
    stats = [k for k in before if k.endswith("running_mean")]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)


@pytest.mark.parametrize(
    ("train_bn", "freeze_bn_stats", "moves"), [(True, False, True), (False, True, False)], ids=["train_bn", "freeze_bn_stats"]
)
def test_train_bn_and_freeze_bn_stats_cover_batchnorm_without_affine_weights(train_bn, freeze_bn_stats, moves):
    model = _non_affine_resnet()
    groups = B.layer_groups(model)
    everything = set(range(len(groups))) if freeze_bn_stats else {len(groups) - 1}
    set_trainable(model, groups, everything, train_bn)
    model.train()
    set_modes(model, groups, everything, train_bn, freeze_bn_stats)
    before = _buffers(model)
    model(torch.randn(4, 3, 32, 32))
    after = _buffers(model)
    changed = [k for k in before if k.endswith("running_mean") and not torch.equal(before[k], after[k])]
    assert bool(changed) == moves


def test_a_group_that_unfreezes_follows_the_model_mode_again():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=4, **NOISY["test_vit"])
    groups = _probe_state(model)
    x = torch.randn(4, 3, 64, 64)
    assert torch.equal(model.forward_features(x), model.forward_features(x))
    model.train()  # as Lightning does after validation, then the plan unfreezes everything
    set_modes(model, groups, range(len(groups)), False, False)
    assert all(m.training for m in model.modules())
    assert not torch.equal(model.forward_features(x), model.forward_features(x))


def test_eval_mode_is_left_alone():
    model = timm.create_model("test_vit", num_classes=4, **NOISY["test_vit"])
    groups = B.layer_groups(model)
    model.eval()
    set_modes(model, groups, range(len(groups)), train_bn=True, freeze_bn_stats=False)
    assert not any(m.training for m in model.modules())
