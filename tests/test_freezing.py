"""Freeze plans in real training: frozen is bit-identical and cheap, unfrozen moves, resume is exact."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_ft.schedules import LPFT, FreezeUnfreeze, Full, Gradual, LinearProbe, Milestones, Surgical
from tests.helpers import StopAfter, snapshot, tiny_data, tiny_model, trainer


class RecordTrainable(L.Callback):
    """Which layer groups had requires_grad at each epoch (checked mid-epoch, after the plan applied)."""

    def __init__(self):
        self.by_epoch: dict[int, frozenset[int]] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        params = dict(module.model.named_parameters())
        on = frozenset(i for i, g in enumerate(module.groups) if all(params[n].requires_grad for n in g.param_names))
        self.by_epoch.setdefault(trainer.current_epoch, on)


def _group_tensors(module, snap, group_idx):
    """Params and BN buffers (running stats) of one layer group: name -> (before, after)."""
    after = module.model.state_dict()
    g = module.groups[group_idx]
    prefixes = tuple(m + "." for m in g.module_names)
    keys = [k for k in after if k.startswith(prefixes) and not k.endswith("num_batches_tracked")]
    return {k: (snap["model." + k], after[k]) for k in keys}


PLANS = {
    "linear_probe": (LinearProbe(), {0: "H", 1: "H", 2: "H"}),
    "freeze_unfreeze": (FreezeUnfreeze(epochs=2), {0: "H", 1: "H", 2: "A"}),
    "gradual": (Gradual(every=1), {0: 1, 1: 2, 2: 3}),
    "milestones": (Milestones({1: ["layer4"], 2: ["stem"]}), {0: "H", 1: {4, 5}, 2: {0, 4, 5}}),
    "lp_ft": (LPFT(lp_epochs=1), {0: "H", 1: "A", 2: "A"}),
    "surgical": (Surgical(groups=["layer2"]), {0: {2, 5}, 1: {2, 5}, 2: {2, 5}}),
    "full": (Full(), {0: "A", 1: "A", 2: "A"}),
}


def _expected(spec, n):
    if spec == "H":
        return frozenset({n - 1})
    if spec == "A":
        return frozenset(range(n))
    if isinstance(spec, int):
        return frozenset(range(n - spec, n))
    return frozenset(spec)


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_plan_trains_exactly_the_planned_groups(plan_name, tmp_path):
    plan, expect = PLANS[plan_name]
    model = tiny_model(freeze=plan)
    n = len(model.groups)
    before = snapshot(model)
    rec = RecordTrainable()
    trainer(tmp_path, max_epochs=3, callbacks=[rec]).fit(model, tiny_data())
    assert rec.by_epoch == {e: _expected(s, n) for e, s in expect.items()}
    ever = frozenset().union(*rec.by_epoch.values())  # groups that trained at some point of this run
    for i in range(n):
        pairs = _group_tensors(model, before, i)
        assert pairs, model.groups[i].name
        if i in ever:
            assert any(not torch.equal(a, b) for a, b in pairs.values()), f"group {model.groups[i].name} never changed"
        else:
            # Frozen for the whole run: weights AND BatchNorm running stats bit-identical.
            for k, (a, b) in pairs.items():
                assert torch.equal(a, b), f"frozen {k} changed"


def test_frozen_until_unfreeze_epoch_is_bit_identical_then_moves(tmp_path):
    model = tiny_model(freeze=FreezeUnfreeze(epochs=1))
    before = snapshot(model)
    mid = {}

    class Grab(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == 0:
                mid.update(snapshot(module))

    trainer(tmp_path, max_epochs=2, callbacks=[Grab()]).fit(model, tiny_data())
    body = [k for k in before if k.startswith("model.") and not k.startswith("model.fc.") and "num_batches" not in k]
    assert all(torch.equal(before[k], mid[k]) for k in body)  # epoch 0: frozen (BN stats too)
    assert not torch.equal(before["model.fc.weight"], mid["model.fc.weight"])
    after = snapshot(model)
    assert any(not torch.equal(mid[k], after[k]) for k in body)  # epoch 1: unfrozen
    # ...and its BatchNorm layers are back in train mode: running stats move again.
    assert not torch.equal(mid["model.conv1.1.running_mean"], after["model.conv1.1.running_mean"])


def test_train_bn_true_lets_frozen_bn_stats_move(tmp_path):
    model = tiny_model(freeze=LinearProbe(train_bn=True))
    before = snapshot(model)
    trainer(tmp_path, max_epochs=1).fit(model, tiny_data())
    after = snapshot(model)
    assert not torch.equal(before["model.bn1.running_mean"], after["model.bn1.running_mean"])
    assert not torch.equal(before["model.bn1.weight"], after["model.bn1.weight"])
    assert torch.equal(before["model.conv1.0.weight"], after["model.conv1.0.weight"])


def test_frozen_prefix_gets_no_backward_and_no_weight_decay(tmp_path):
    model = tiny_model(
        freeze=Gradual(every=100), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5)
    )
    calls = []
    model.model.layer1.register_full_backward_hook(lambda *a: calls.append("layer1"))
    model.model.layer4.register_full_backward_hook(lambda *a: calls.append("layer4"))
    before = snapshot(model)
    trainer(tmp_path, max_epochs=1).fit(model, tiny_data())
    assert "layer1" not in calls and "layer4" not in calls  # head only: backward stops at the head
    after = snapshot(model)
    # AdamW applies decoupled weight decay to every param it steps: frozen ones must be skipped.
    assert torch.equal(before["model.layer1.0.conv1.weight"], after["model.layer1.0.conv1.weight"])
    assert not torch.equal(before["model.fc.weight"], after["model.fc.weight"])


def test_unfreeze_warmup_ramps_lr_of_new_groups(tmp_path):
    data = tiny_data()
    model = tiny_model(freeze=FreezeUnfreeze(epochs=1, unfreeze_warmup_steps=4))
    seen = []

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            stem = next(g for g in optimizer.param_groups if g["name"] == "stem")
            head = next(g for g in optimizer.param_groups if g["name"] == "head")
            seen.append((trainer.global_step, stem["lr"], head["lr"]))

    trainer(tmp_path, max_epochs=3, callbacks=[Spy()]).fit(model, data)
    by_step = {s: (a, b) for s, a, b in seen}
    spe = 4  # 64 images / batch 16
    assert [round(by_step[spe + i][0] / by_step[spe + i][1], 6) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert all(abs(by_step[s][0] - by_step[s][1]) < 1e-12 for s in range(spe))  # no ramp before (frozen anyway)


def test_lp_ft_restarts_the_lr_schedule_at_phase_two(tmp_path):
    from lit_ft.optim import WarmupCosineLR

    model = tiny_model(
        freeze=LPFT(lp_epochs=1), lr_scheduler=lambda o: WarmupCosineLR(o, warmup_steps=2), scheduler_interval="step"
    )
    lrs = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[-1]["lr"])

    trainer(tmp_path, max_epochs=3, callbacks=[Spy()]).fit(model, tiny_data())
    spe = 4
    assert lrs[0] == 0.0 and lrs[spe] == 0.0, lrs  # warm-up starts again at the phase change
    assert lrs[1] > 0 and lrs[spe + 1] > 0
    # phase two's cosine spans the remaining 8 steps, ending near zero
    assert lrs[-1] < 0.3 * max(lrs[spe:])


def _fit_and_resume(tmp_path, plan_factory, stop_epochs, total_epochs, **model_kw):
    ckpt_dir = tmp_path / "ck"
    L.seed_everything(0)
    full = tiny_model(freeze=plan_factory(), **model_kw)
    trainer(tmp_path / "a", max_epochs=total_epochs).fit(full, tiny_data())

    L.seed_everything(0)
    part = tiny_model(freeze=plan_factory(), **model_kw)
    t = trainer(tmp_path / "b", max_epochs=total_epochs, callbacks=[StopAfter(stop_epochs)])
    t.fit(part, tiny_data())  # same config as the full run, interrupted after `stop_epochs`
    assert t.current_epoch == stop_epochs
    t.save_checkpoint(ckpt_dir / "last.ckpt")

    L.seed_everything(123)  # a different global RNG state must not matter
    resumed = tiny_model(freeze=plan_factory(), **model_kw)
    t2 = trainer(tmp_path / "c", max_epochs=total_epochs)
    t2.fit(resumed, tiny_data(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    return full, resumed


@pytest.mark.parametrize(
    "plan_factory",
    [lambda: FreezeUnfreeze(epochs=1, unfreeze_warmup_steps=3), lambda: Gradual(every=1), lambda: LPFT(lp_epochs=1)],
    ids=["freeze_unfreeze", "gradual", "lp_ft"],
)
def test_resume_after_unfreeze_matches_uninterrupted_run(tmp_path, plan_factory):
    from lit_ft.optim import WarmupCosineLR

    full, resumed = _fit_and_resume(
        tmp_path,
        plan_factory,
        stop_epochs=2,
        total_epochs=3,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05),
        lr_scheduler=lambda o: WarmupCosineLR(o, warmup_steps=2),
        layer_decay=0.7,
    )
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert all(p.requires_grad for p in resumed.model.parameters()) == all(p.requires_grad for p in full.model.parameters())


FAMILIES = ["test_efficientnet", "test_convnext", "test_vit", "regnetx_002", "mobilenetv3_small_050"]


@pytest.mark.parametrize("backbone", FAMILIES)
def test_gradual_plan_on_each_family(backbone, tmp_path):
    """Frozen groups (weights and norm statistics) bit-identical, trained ones moved, per family."""
    model = tiny_model(backbone, freeze=Gradual(every=1, start=2))
    n = len(model.groups)
    before = snapshot(model)
    rec = RecordTrainable()
    trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[rec]).fit(model, tiny_data())
    assert rec.by_epoch == {0: frozenset({n - 2, n - 1}), 1: frozenset({n - 3, n - 2, n - 1})}
    for i in range(n):
        pairs = _group_tensors(model, before, i)
        if i >= n - 3:
            assert any(not torch.equal(a, b) for a, b in pairs.values()), model.groups[i].name
        else:
            for k, (a, b) in pairs.items():
                assert torch.equal(a, b), f"{backbone}: frozen {k} changed"


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=16),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    ],
    ids=["onecycle", "warm_restarts"],
)
def test_group_lr_ratios_hold_during_training(make_sched, tmp_path):
    model = tiny_model(freeze=FreezeUnfreeze(epochs=1), layer_decay=0.5, lr_mult={"stem": 0.1}, lr_scheduler=make_sched)
    seen = []

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
            seen.append(groups)

    trainer(tmp_path, max_epochs=2, callbacks=[Spy()]).fit(model, tiny_data())
    n = len(model.groups)
    assert len({round(s["head"], 10) for s in seen}) >= 3  # the schedule moved
    for s in seen:
        assert s["stem"] / s["head"] == pytest.approx(0.1 * 0.5 ** (n - 1))
        assert s["layer4"] / s["head"] == pytest.approx(0.5)
        assert s["layer4/no_decay"] == s["layer4"]


def test_freeze_bn_stats_keeps_pretrained_statistics_while_weights_train(tmp_path):
    model = tiny_model(freeze=FreezeUnfreeze(epochs=1, freeze_bn_stats=True))
    before = snapshot(model)
    trainer(tmp_path, max_epochs=2).fit(model, tiny_data())
    after = snapshot(model)
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert not torch.equal(before["model.conv1.1.weight"], after["model.conv1.1.weight"])  # BN affine trains
    assert not torch.equal(before["model.conv1.0.weight"], after["model.conv1.0.weight"])
