import math

import pytest
import timm
import torch

from lit_ft import backbones as B
from lit_ft import optim as O
from lit_ft.errors import UserError


def _setup(layer_decay=0.5, lr_mult=None, opt=torch.optim.AdamW):
    model = timm.create_model("test_resnet", num_classes=3)
    groups = B.layer_groups(model)
    scales = O.group_lr_scales([g.name for g in groups], lr_mult, layer_decay)
    optimizer = opt(O.build_param_groups(model, groups, scales), lr=1e-2)
    O.apply_lr_scales(optimizer)
    return model, groups, scales, optimizer


def _ratios(optimizer):
    return [g["lr"] / g["lr_scale"] for g in optimizer.param_groups]


def test_groups_are_named_scaled_and_split_by_decay():
    model, groups, scales, opt = _setup(layer_decay=0.5)
    names = [g["name"] for g in opt.param_groups]
    assert names[:2] == ["stem", "stem/no_decay"] and names[-2:] == ["head", "head/no_decay"]
    n = len(groups)
    assert scales == [0.5 ** (n - 1 - i) for i in range(n)]
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-2 * scales[g["layer_group"]])
        if g["name"].endswith("/no_decay"):
            assert g["weight_decay"] == 0.0
            assert all(p.ndim <= 1 for p in g["params"])
        else:
            assert g["weight_decay"] == 0.01


def test_lr_mult_by_name_and_index_multiply_with_layer_decay():
    names = ["stem", "a", "b", "head"]
    scales = O.group_lr_scales(names, {"stem": 0.1, -1: 10}, layer_decay=0.5)
    assert scales == pytest.approx([0.125 * 0.1, 0.25, 0.5, 10.0])


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_non_positive_lr_mult_is_refused(bad):
    with pytest.raises(UserError, match="must be a positive number"):
        O.group_lr_scales(["stem", "head"], {"stem": bad})


def test_lr_range_is_geometric_from_stem_to_head():
    scales = O.lr_range_scales(3, 1e-5, 1e-3, base_lr=1e-3)
    assert [s * 1e-3 for s in scales] == pytest.approx([1e-5, 1e-4, 1e-3])


def test_warmup_cosine_shape_and_state_roundtrip():
    model, groups, scales, opt = _setup(layer_decay=None)
    sched = O.WarmupCosineLR(opt, warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(1e-2)
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # cosine falls
    state = sched.state_dict()
    fresh = O.WarmupCosineLR(opt, warmup_steps=0, total_steps=1)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == sched.last_epoch and fresh.total_steps == 12 and fresh.warmup_steps == 4
    assert math.isclose(fresh.factor(8), sched.factor(8))


def test_lr_range_with_layer_decay_is_refused_and_with_lr_mult_warns():
    names = ["stem", "a", "head"]
    with pytest.raises(UserError, match="both spread the LR"):
        O.check_lr_options(names, None, 0.7, (1e-5, 1e-3))
    with pytest.warns(UserWarning, match="lr_mult .* multiplies the LRs that lr_range"):
        O.check_lr_options(names, {"head": 10}, None, (1e-5, 1e-3))
