"""The LR finder: one factor on every param group, nothing leaks, suggestions that train."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from lit_ft import optim as O
from lit_ft.cli import main
from lit_ft.errors import UserError
from lit_ft.lr_finder import lr_find, smooth_losses, steepest, valley
from lit_ft.schedules import FreezeUnfreeze
from tests.helpers import snapshot, tiny_data, tiny_model, trainer as make_trainer
from tests.test_cli import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def configured_lrs(model) -> dict[str, float]:
    """Each param group's starting LR as a run builds it."""
    hp = model.hparams
    opt = O.build_optimizer(model.optimizer_factory, model.model, model.groups, hp.lr_mult, hp.layer_decay, hp.lr_range,
                            hp.no_decay_norm_bias)
    return {g["name"]: g["lr"] for g in opt.param_groups}


@pytest.mark.parametrize("options", [dict(layer_decay=0.5, lr_mult={"head": 3.0}), dict(lr_range=(1e-4, 1e-2))], ids=["decay", "range"])
def test_every_param_group_keeps_its_configured_ratio_at_every_step(options):
    L.seed_everything(0)
    model = tiny_model(**options)
    configured = configured_lrs(model)
    assert len(set(configured.values())) >= 5  # really discriminative: stem ... head differ
    result = lr_find(model, tiny_data(), num_steps=25, min_lr=1e-6, max_lr=1e-1, diverge=None)
    assert result.group_names == list(configured)
    assert len(result.group_lrs) == len(result.lrs) == 25
    ref = result.configured  # the reference LR: optimizer lr, or the head's LR under lr_range
    for lr, used in zip(result.lrs, result.group_lrs):
        for name, got in zip(result.group_names, used):
            assert math.isclose(got / lr, configured[name] / ref, rel_tol=1e-9), (name, got, lr)
    # the decay / no-decay halves of a layer group move together
    pairs = {n: lr for n, lr in zip(result.group_names, result.group_lrs[-1])}
    assert all(pairs[n] == pairs[n.split("/")[0]] for n in pairs if n.endswith("/no_decay"))
    assert math.isclose(result.lrs[0], 1e-6) and math.isclose(result.lrs[-1], 1e-1)
    if "lr_range" in options:
        assert result.key == "model.lr_range" and result.configured == 1e-2
        low, high = result.override()["model"]["lr_range"]
        assert math.isclose(high / low, 100, rel_tol=0.01)  # the spread is kept, both ends move
    else:
        assert result.key == "model.optimizer.init_args.lr" and result.configured == 0.05


def rng_state():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()


def test_model_optimizer_rng_and_a_following_fit_are_as_if_lr_find_never_ran(tmp_path):
    L.seed_everything(0)
    model = tiny_model(freeze=FreezeUnfreeze(epochs=1))
    twin = copy.deepcopy(model)
    dm = tiny_data()
    # A model mid-notebook: fitted once, so it has a trainer, an optimizer with state, gradients.
    first = make_trainer(tmp_path / "a", max_epochs=1)
    first.fit(model, dm)
    first_twin = make_trainer(tmp_path / "b", max_epochs=1)
    first_twin.fit(twin, tiny_data())
    weights, opt_state = snapshot(model), copy.deepcopy(first.optimizers[0].state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = rng_state()

    result = lr_find(model, dm, num_steps=20, phase="all")

    assert result.trainable == [g.name for g in model.groups]  # the sweep did train every group
    after = snapshot(model)
    assert all(torch.equal(weights[k], after[k]) for k in weights)  # BN running stats included
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all((a is None and p.grad is None) or torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    assert [m.training for m in model.modules()] == modes
    after_rng = rng_state()
    assert rng[0] == after_rng[0] and np.array_equal(rng[1], after_rng[1]) and torch.equal(rng[2], after_rng[2])
    assert str(first.optimizers[0].state_dict()) == str(opt_state)
    # ... and training on from here is bit-identical to the twin that never ran lr_find.
    make_trainer(tmp_path / "a2", max_epochs=3).fit(model, dm)
    make_trainer(tmp_path / "b2", max_epochs=3).fit(twin, tiny_data())
    a, b = snapshot(model), snapshot(twin)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_default_phase_is_the_plans_first_and_all_is_the_phase_after_unfreezing():
    L.seed_everything(0)
    model = tiny_model(freeze=FreezeUnfreeze(epochs=1))
    dm = tiny_data()
    start = lr_find(model, dm, num_steps=15, diverge=None)
    after = lr_find(model, dm, num_steps=15, diverge=None, phase="all")
    head = lr_find(tiny_model(), dm, num_steps=15, diverge=None, phase="head")  # Full plan, head only
    assert start.phase == "start" and start.trainable == ["head"]  # FreezeUnfreeze starts head-only
    assert after.trainable == [g.name for g in model.groups]
    assert head.trainable == ["head"]
    assert start.losses != after.losses  # a different network is being trained


def test_suggestion_rules_on_known_curves():
    lrs = list(np.logspace(-6, 0, 61))
    x = np.log10(lrs)
    # flat until 1e-4, falls until 1e-2, blows up after: the fall is the answer
    curve = [2.0 if v < -4 else (2.0 - 0.75 * (v + 4) if v < -2 else 0.5 + 3 * (v + 2) ** 2) for v in x]
    i = valley(curve)
    assert 1e-4 < lrs[i] < 1e-2
    j = steepest(lrs, curve)
    assert 1e-4 < lrs[j] <= 1e-2
    # an early spike (Lightning#1767): a huge fall right after it must not be the suggestion
    spiky = list(curve)
    spiky[3] = 9.0
    smoothed = smooth_losses(spiky)
    assert 1e-4 < lrs[steepest(lrs, smoothed)] <= 1e-2
    assert 1e-4 < lrs[valley(smoothed)] < 1e-2


def final_loss(model, dm, lr: float, steps: int) -> float:
    """Train a copy at one constant reference LR (groups at their ratios); mean loss of the last steps."""
    model = copy.deepcopy(model)
    opt = O.build_optimizer(model.optimizer_factory, model.model, model.groups, None, model.hparams.layer_decay, None)
    for g in opt.param_groups:
        g["lr"] *= lr / opt.defaults["lr"]
    dm.setup("fit")
    model.train()
    losses = []
    batches = [b for b in dm.train_dataloader()]
    for k in range(steps):
        opt.zero_grad()
        loss = model.step_loss(batches[k % len(batches)], k).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    tail = losses[-5:]
    return sum(tail) / len(tail) if all(math.isfinite(v) for v in tail) else math.inf


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_suggestions_fall_in_the_range_where_training_works(seed):
    # The "known good range" is measured, not assumed: train 30 steps at each LR of a grid; the
    # range is the longest stretch of the grid whose LRs all get at least half of the best
    # improvement in loss (1e-3..1e-1 here, 2 of the sweep's 9 decades; on some CPUs seed 1's
    # range reaches 1.0: 3 decades, still a third of the sweep, so a wrong suggestion fails).
    L.seed_everything(seed)
    model = tiny_model(layer_decay=0.7, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    dm = tiny_data(seed=seed, train_size=128)
    grid = list(np.logspace(-5, 0, 11))
    start = math.log(4)  # a zero-initialised head: ln C for every image
    finals = [final_loss(model, dm, lr, 30) for lr in grid]
    best = min(finals)
    ok = [start - f >= 0.5 * (start - best) for f in finals]
    runs = [(j - i, i, j) for i in range(len(grid)) for j in range(i + 1, len(grid) + 1) if all(ok[i:j])]
    _, lo, hi = max(runs)
    good = grid[lo:hi]
    assert best < start - 0.3 and 2 <= len(good) <= 7, finals
    result = lr_find(model, dm, num_steps=100, max_lr=10)
    for name in ("valley", "steepest"):
        lr = result.suggestion(name)
        assert min(good) <= lr <= max(good), (name, lr, good, finals)


def test_a_range_that_diverges_at_once_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(UserError, match="diverged after"):
        lr_find(model, tiny_data(), min_lr=1e6, max_lr=1e9, num_steps=10)


def test_lr_find_command_prints_saves_the_curve_logs_it_and_writes_an_override_fit_uses(capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["lr_find", *TINY, "--num_steps", "30", "--max_lr", "10", "--apply", "true"])
    out = capsys.readouterr().out
    assert "valley" in out and "steepest" in out
    (run,) = Path("runs/default").iterdir()
    assert (run / "lr_find.png").stat().st_size > 10_000
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "lr_find/curve" in acc.Tags()["images"]
    assert len(acc.Scalars("lr_find/loss")) >= 10
    override = run / "experiment_lr.yaml"
    lr = yaml.safe_load(override.read_text())["model"]["optimizer"]["init_args"]["lr"]
    suggested = float(out.split("valley ")[1].split(",")[0])
    assert math.isclose(lr, suggested, rel_tol=0.01)
    with pytest.raises(SystemExit):
        main(["fit", *TINY, "--config", str(override), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["optimizer"]["init_args"]["lr"] == lr


def test_lr_find_is_in_the_notebook_api():
    from lit_ft import notebook

    assert notebook.lr_find is lr_find and "lr_find" in notebook.__all__
