import pytest

from lit_ft.errors import UserError
from lit_ft.schedules import (
    LPFT,
    FreezeUnfreeze,
    Full,
    Gradual,
    LinearProbe,
    Milestones,
    Surgical,
    warmup_factor,
)

NAMES = ["stem", "s1", "s2", "s3", "head"]  # 5 groups, head = 4


def bound(plan):
    return plan.bind(NAMES)


def test_full_and_linear_probe():
    assert bound(Full()).trainable(3, 100) == {0, 1, 2, 3, 4}
    lp = bound(LinearProbe())
    assert lp.trainable(0, 0) == lp.trainable(9, 999) == {4}
    assert lp.ever_trainable() == {4}


def test_freeze_unfreeze():
    p = bound(FreezeUnfreeze(epochs=2))
    assert p.trainable(0, 0) == p.trainable(1, 50) == {4}
    assert p.trainable(2, 0) == {0, 1, 2, 3, 4}
    assert p.unfreeze_step(0, steps_per_epoch=10) == 20
    assert p.unfreeze_step(4, steps_per_epoch=10) == 0
    assert p.describe(0) == "epoch 2" and p.describe(4) == "start"


def test_gradual_by_epoch_and_by_step():
    p = bound(Gradual(every=2))
    assert [sorted(p.trainable(e, 0)) for e in (0, 1, 2, 4, 8, 50)] == [
        [4], [4], [3, 4], [2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]
    ]
    s = bound(Gradual(every=5, unit="step", start=2))
    assert s.trainable(0, 0) == {3, 4}
    assert s.trainable(0, 5) == {2, 3, 4}
    assert s.unfreeze_step(0, steps_per_epoch=100) == 15
    assert s.describe(1) == "step 10"


def test_milestones_cumulative_with_names_and_indices():
    p = bound(Milestones({1: ["s3"], 3: [0, "s1", -3]}))
    assert p.trainable(0, 0) == {4}
    assert p.trainable(1, 0) == p.trainable(2, 0) == {3, 4}
    assert p.trainable(3, 0) == {0, 1, 2, 3, 4}
    with pytest.raises(UserError, match="no layer group 'nope'"):
        bound(Milestones({1: ["nope"]}))


def test_surgical_only_named_groups_ever_train():
    p = bound(Surgical(groups=["s1"]))
    assert p.trainable(0, 0) == p.trainable(7, 70) == {1, 4}
    assert p.ever_trainable() == {1, 4}
    assert p.describe(0) == "never"
    assert bound(Surgical(groups=["s1"], include_head=False)).trainable(0, 0) == {1}


def test_lpft_restarts_schedule_at_phase_two():
    p = bound(LPFT(lp_epochs=3))
    assert p.trainable(2, 0) == {4} and p.trainable(3, 0) == {0, 1, 2, 3, 4}
    assert p.restart_schedule_at_epoch == 3
    assert bound(Full()).restart_schedule_at_epoch is None


def test_unfreeze_warmup_ramps_from_zero_only_for_late_groups():
    p = bound(FreezeUnfreeze(epochs=1, unfreeze_warmup_steps=4))
    spe = 10
    assert warmup_factor(p, 4, 0, spe) == 1.0  # head trains from the start: scheduler handles warm-up
    assert [warmup_factor(p, 0, s, spe) for s in (10, 11, 13, 20)] == [0.25, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("bad", [lambda: Gradual(every=0), lambda: FreezeUnfreeze(epochs=-1), lambda: Full(unfreeze_warmup_steps=-2)])
def test_bad_values_are_user_errors(bad):
    with pytest.raises(UserError):
        bad()
