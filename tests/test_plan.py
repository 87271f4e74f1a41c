"""The training plan from explicit numbers, and the DDP settings it refuses."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lit_ft.errors import UserError
from lit_ft.plan import TrainingPlan, check_distributed, steps_per_epoch
from lit_ft.schedules import LPFT, Full, Gradual, Surgical

NAMES = ["stem", "a", "b", "head"]


def test_the_plan_answers_from_explicit_numbers():
    plan = TrainingPlan(Gradual(every=2, unit="step", unfreeze_warmup_steps=2).bind(NAMES), steps_per_epoch=4, epochs=3)
    assert plan.trainable(0, 0) == {3} and plan.trainable(0, 2) == {2, 3} and plan.trainable(1, 6) == {0, 1, 2, 3}
    assert plan.has_phases and plan.ever_trainable == {0, 1, 2, 3}
    assert not plan.head_only(0)  # group b unfreezes at step 2, inside epoch 0
    assert plan.lr_factors([2, 2, 3], 2) == [0.5, 0.5, 1.0] and plan.lr_factors([2], 3) == [1.0]
    lpft = TrainingPlan(LPFT(lp_epochs=2).bind(NAMES), steps_per_epoch=5)
    assert lpft.head_only(1) and not lpft.head_only(2)
    assert lpft.restart_epoch == 2 and lpft.restart_step("step") == 10 and lpft.restart_step("epoch") == 2
    assert not TrainingPlan(Surgical(["a"]).bind(NAMES)).has_phases
    assert not TrainingPlan(Full().bind(NAMES)).head_only(0)
    assert steps_per_epoch(10, accumulate=3) == 4 and steps_per_epoch(float("inf")) == 1


@pytest.fixture(scope="module")
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({}, "DDP without find_unused_parameters"), ({"find_unused_parameters": True, "static_graph": True}, "static_graph=True")],
    ids=["find_unused_off", "static_graph"],
)
def test_ddp_settings_that_break_a_plan_with_phases_are_refused(process_group, kwargs, message):
    wrapped = DistributedDataParallel(torch.nn.Linear(2, 2), **kwargs)
    with pytest.raises(UserError, match=message):
        check_distributed(wrapped, has_phases=True)
    check_distributed(wrapped, has_phases=False)  # a plan without phases is fine under any DDP
    check_distributed(DistributedDataParallel(torch.nn.Linear(2, 2), find_unused_parameters=True), has_phases=True)


def test_the_cli_picks_ddp_with_unused_parameters_for_a_plan_with_phases(caplog):
    from lit_ft.cli import make_cli
    from tests.test_cli import TINY

    with caplog.at_level("INFO"):
        make_cli([*TINY, "--model.freeze", "lit_ft.schedules.FreezeUnfreeze", "--trainer.strategy", "ddp"], run=False)
    assert "strategy ddp -> ddp_find_unused_parameters_true" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):  # no phases: DDP keeps its faster default
        make_cli([*TINY, "--model.freeze", "lit_ft.schedules.Surgical", "--model.freeze.groups", "[layer4]",
                  "--trainer.strategy", "ddp"], run=False)
    assert "find_unused" not in caplog.text
