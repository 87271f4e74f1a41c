import math

import pytest
import timm
import torch
from torch.optim import lr_scheduler as S

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


SCHEDULERS = {
    "cosine": lambda o: S.CosineAnnealingLR(o, T_max=10),
    "onecycle": lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=20),
    "cosine_warmup": lambda o: O.WarmupCosineLR(o, warmup_steps=3, total_steps=20),
    "sequential_warmup_cosine": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=3), S.CosineAnnealingLR(o, T_max=17)], milestones=[3]
    ),
    "warm_restarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=4),
    "plateau": lambda o: S.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "step": lambda o: S.StepLR(o, step_size=2, gamma=0.3),
    "cyclic": lambda o: S.CyclicLR(o, base_lr=1e-4, max_lr=1e-2, step_size_up=3),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_keeps_group_ratios_at_every_step(name):
    opt_cls = torch.optim.SGD if name == "cyclic" else torch.optim.AdamW
    kwargs = {"momentum": 0.9} if name == "cyclic" else {}
    model, groups, scales, opt = _setup(layer_decay=0.5, opt=lambda p, lr: opt_cls(p, lr=lr, **kwargs))
    sched = SCHEDULERS[name](opt)
    O.check_scheduler_ratios(sched, opt)
    seen = set()
    for step in range(12):
        lrs = [g["lr"] for g in opt.param_groups]
        base = lrs[-1] / opt.param_groups[-1]["lr_scale"]
        seen.add(round(base, 12))
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(base * g["lr_scale"], rel=1e-9, abs=1e-15), (name, step, g["name"])
        opt.step()
        sched.step(1.0) if name == "plateau" else sched.step()
    assert len(seen) > 1, "the schedule never changed the lr: the test would not see a broken ratio"


def test_scheduler_that_flattens_groups_is_refused():
    model, groups, scales, opt = _setup(layer_decay=0.5)

    class Flatten(S.LRScheduler):
        def get_lr(self):
            return [1e-3 for _ in self.optimizer.param_groups]

    with pytest.raises(UserError, match="same learning rate on every param group"):
        O.check_scheduler_ratios(Flatten(opt), opt)


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
