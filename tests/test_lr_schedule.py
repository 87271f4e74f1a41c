"""The LR schedule over a whole run: any torch scheduler keeps the per-group ratios at every
step (restarts included), lengths are filled in or refused up front, extensions re-plan."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from torch.optim import lr_scheduler as S

from lit_ft import backbones as B
from lit_ft import optim as O
from lit_ft.errors import UserError
from lit_ft.lr_schedule import PlannedLR, check_over_run


def _optimizer(opt=torch.optim.AdamW, **kw):
    model = timm.create_model("test_resnet", num_classes=3)
    groups = B.layer_groups(model)
    return O.build_optimizer(lambda p: opt(p, lr=1e-2, **kw), model, groups, layer_decay=0.5)


def _yaml(cls, **init_args):
    """A factory as the CLI builds it from class_path + init_args (a functools.partial)."""
    return functools.partial(cls, **init_args)


# Each: (factory, optimizer kwargs). The run is 24 steps with an LP-FT restart at step 8.
SCHEDULERS = {
    "warmup_cosine_auto": (_yaml(O.WarmupCosineLR, warmup_steps=3), {}),
    "warmup_cosine_floor": (_yaml(O.WarmupCosineLR, warmup_steps=3, min_lr_ratio=0.1), {}),
    "onecycle_scalar_max_lr_auto": (_yaml(S.OneCycleLR, max_lr=0.1), {}),
    "cosine": (lambda o: S.CosineAnnealingLR(o, T_max=10), {}),
    "warm_restarts": (lambda o: S.CosineAnnealingWarmRestarts(o, T_0=4, eta_min=0), {}),
    "step": (lambda o: S.StepLR(o, step_size=2, gamma=0.7), {}),
    "plateau_scalar_min_lr": (lambda o: S.ReduceLROnPlateau(o, patience=0, factor=0.5, min_lr=1e-4), {}),
    "cyclic_scalar": (lambda o: S.CyclicLR(o, base_lr=1e-4, max_lr=1e-2, step_size_up=3), {"momentum": 0.9}),
    "sequential_yaml": (
        _yaml(O.SequentialLR, schedulers=[_yaml(S.LinearLR, start_factor=0.1, total_iters=3), _yaml(S.ExponentialLR, gamma=0.9)], milestones=[3]),
        {},
    ),
    "chained_yaml": (_yaml(O.ChainedScheduler, schedulers=[_yaml(S.ExponentialLR, gamma=0.9), _yaml(S.StepLR, step_size=3, gamma=0.5)]), {}),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_keeps_the_group_ratios_over_a_whole_run_with_a_restart(name):
    factory, kw = SCHEDULERS[name]
    opt = _optimizer(torch.optim.SGD if kw else torch.optim.AdamW, **kw)
    sched = PlannedLR(opt, factory)
    sched.bind(24, restart_at=8)
    seen = set()
    for step in range(24):
        if step == 8:
            sched.restart()
        scales = [g["lr_scale"] for g in opt.param_groups]
        lrs = [g["lr"] for g in opt.param_groups]
        base = lrs[-1] / scales[-1]
        seen.add(round(base, 12))
        for lr, s, g in zip(lrs, scales, opt.param_groups):
            assert lr == pytest.approx(base * s, rel=1e-9, abs=1e-15), (name, step, g["name"])
        opt.step()
        sched.step(1.0)  # a metric that never improves: ReduceLROnPlateau goes down to its floors
    assert len(seen) > 3, "the schedule never moved: the test would not see a broken ratio"


def test_the_restart_starts_the_schedule_again_over_the_remaining_steps():
    opt = _optimizer()
    sched = PlannedLR(opt, _yaml(S.OneCycleLR, max_lr=0.1))
    sched.bind(20, restart_at=5)
    head = []
    for step in range(20):
        if step == 5:
            sched.restart()
        head.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    assert head[5] == pytest.approx(head[0])  # a fresh OneCycle starts again at max_lr / div_factor
    assert head[-1] < head[0] / 100  # and anneals over the 15 remaining steps, not the whole run


def test_a_scalar_cosine_floor_is_refused():
    opt = _optimizer()
    with pytest.raises(UserError, match=r"CosineAnnealingLR\(eta_min=0.001\) ends every param group at the same LR"):
        PlannedLR(opt, lambda o: S.CosineAnnealingLR(o, T_max=10, eta_min=1e-3)).bind(10)


def test_a_scheduler_that_flattens_the_groups_mid_run_is_refused_before_training():
    class FlattenLater(S.LRScheduler):
        def get_lr(self):
            if self.last_epoch < 5:
                return [g["lr"] for g in self.optimizer.param_groups]
            return [1e-3 for _ in self.optimizer.param_groups]

    opt = _optimizer()
    before = [g["lr"] for g in opt.param_groups]
    with pytest.raises(UserError, match="breaks the per-group LR ratios at step 5 of 10"):
        PlannedLR(opt, FlattenLater).bind(10)
    assert [g["lr"] for g in opt.param_groups] == before  # the check ran on a stand-in optimizer


def test_onecycle_length_is_filled_in_from_yaml_and_explained_from_python():
    opt = _optimizer()
    sched = PlannedLR(opt, _yaml(S.OneCycleLR, max_lr=0.1))
    sched.bind(30)
    assert sched.inner.total_steps == 30
    with pytest.raises(UserError, match="(?s)cannot build the LR scheduler: You must define either total_steps.*HINT: in YAML leave total_steps unset"):
        PlannedLR(_optimizer(), lambda o: S.OneCycleLR(o, max_lr=0.1)).bind(30)


@pytest.mark.parametrize(
    "factory",
    [_yaml(S.OneCycleLR, max_lr=0.1, total_steps=10), _yaml(O.WarmupCosineLR, warmup_steps=2, total_steps=10)],
    ids=["onecycle_fails", "cosine_reaches_zero"],
)
def test_a_schedule_shorter_than_the_run_is_refused_up_front(factory):
    with pytest.raises(UserError, match="(fails at step 11|reaches LR 0 at step 10) of a 15-step run"):
        PlannedLR(_optimizer(), factory).bind(15)


def test_an_auto_length_schedule_needs_a_finite_run():
    with pytest.raises(UserError, match="(?s)needs the run's length.*HINT: set trainer.max_epochs"):
        PlannedLR(_optimizer(), _yaml(O.WarmupCosineLR, warmup_steps=2)).bind(None)


def test_an_extended_run_re_plans_an_auto_length_schedule():
    opt = _optimizer()
    sched = PlannedLR(opt, _yaml(O.WarmupCosineLR, warmup_steps=2))
    sched.bind(8)
    for _ in range(8):
        opt.step()
        sched.step()
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the end of the 8-step schedule
    state = sched.state_dict()

    opt2 = _optimizer()
    resumed = PlannedLR(opt2, _yaml(O.WarmupCosineLR, warmup_steps=2))
    resumed.load_state_dict(state)
    with pytest.warns(UserWarning, match="planned for 8 scheduler steps and now has 12"):
        resumed.bind(12)
    fresh = PlannedLR(_optimizer(), _yaml(O.WarmupCosineLR, warmup_steps=2))
    fresh.bind(12)
    for _ in range(8):
        fresh.step()
    # The resumed run continues on the 12-step schedule, as if planned that way (LR > 0, not 0).
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in fresh.optimizer.param_groups])
    assert opt2.param_groups[-1]["lr"] > 0


def test_resume_restores_the_schedule_exactly():
    def run(stop=None, state=None):
        opt = _optimizer()
        sched = PlannedLR(opt, _yaml(S.OneCycleLR, max_lr=0.1))
        if state is not None:
            sched.load_state_dict(state)
        sched.bind(16, restart_at=6)
        lrs = []
        for step in range(sched.last_epoch, 16):
            if step == 6 and sched.restarted_at is None:
                sched.restart()
            lrs.append([g["lr"] for g in opt.param_groups])
            if step + 1 == stop:
                return sched.state_dict(), lrs
            opt.step()
            sched.step()
        return None, lrs

    _, full = run()
    state, first = run(stop=10)
    state["last_epoch"] = 9  # stopped before the 10th step's scheduler update
    _, rest = run(state=state)
    assert first[:9] + rest == full[:9] + full[9:]


def test_check_over_run_leaves_an_endless_run_alone():
    check_over_run(_yaml(S.StepLR, step_size=2), _optimizer(), None)


def test_unfreeze_warmup_factors_ride_on_the_clean_schedule():
    opt = _optimizer()
    n = len(opt.param_groups)
    sched = PlannedLR(opt, lambda o: S.StepLR(o, step_size=1, gamma=0.5), factors=lambda step: [0.5] * (n - 2) + [1.0, 1.0])
    sched.bind(4)
    for _ in range(3):
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    clean = [g["initial_lr"] * 0.5**3 for g in opt.param_groups]
    assert lrs == pytest.approx([c * 0.5 for c in clean[:-2]] + clean[-2:])  # the factor never compounds
