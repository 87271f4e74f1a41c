"""The schedule plot: replayed LR/freeze plans per strategy, drawn with the right shape, and
equal to what a real training run logs."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmarks.plot_schedules import main as plot_schedules_main, strategies
from lit_ft import ImageClassifier
from lit_ft.cli import main
from lit_ft.notebook import plot_schedule, schedule_data
from lit_ft.optim import WarmupCosineLR
from lit_ft.schedules import Gradual
from tests.test_cli import TINY

SPE, EPOCHS = 5, 8
GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]  # test_resnet, coarse


def model_for(plan, **kw) -> ImageClassifier:
    return ImageClassifier(
        "test_resnet", num_classes=4, freeze=plan, layer_decay=0.5,
        optimizer=partial(torch.optim.AdamW, lr=1e-3), lr_scheduler=partial(WarmupCosineLR, warmup_steps=SPE), **kw,
    )


def frozen_until(epoch: int) -> list[tuple[int, int]]:
    return [(0, epoch * SPE)] if epoch > 0 else []


# What each plan means, written out by hand: frozen [start, end) step spans per group.
EXPECTED_FROZEN = {
    "Full": {g: [] for g in GROUPS},
    "LinearProbe": {**{g: [(0, SPE * EPOCHS)] for g in GROUPS[:-1]}, "head": []},
    "FreezeUnfreeze(epochs=2)": {**{g: frozen_until(2) for g in GROUPS[:-1]}, "head": []},
    # one more group from the top every epoch: layer4 at 1, layer3 at 2, ..., stem at 5
    "Gradual(every=1, warm-up 50)": {g: frozen_until(5 - i) for i, g in enumerate(GROUPS)},
    "LPFT(lp_epochs=3)": {**{g: frozen_until(3) for g in GROUPS[:-1]}, "head": []},
    "Milestones{2: layer4, 5: layer3}": {
        "stem": [(0, SPE * EPOCHS)], "layer1": [(0, SPE * EPOCHS)], "layer2": [(0, SPE * EPOCHS)],
        "layer3": frozen_until(5), "layer4": frozen_until(2), "head": [],
    },
    "Surgical([layer1])": {
        "stem": [(0, SPE * EPOCHS)], "layer1": [], "layer2": [(0, SPE * EPOCHS)],
        "layer3": [(0, SPE * EPOCHS)], "layer4": [(0, SPE * EPOCHS)], "head": [],
    },
}


@pytest.mark.parametrize("name", list(strategies()))
def test_each_strategy_plots_one_lr_line_per_group_and_frozen_spans_where_the_plan_says(name):
    data = schedule_data(model_for(strategies()[name]), SPE, EPOCHS)
    assert data.group_names == GROUPS and data.lr.shape == data.trainable.shape == (len(GROUPS), SPE * EPOCHS)
    expected = EXPECTED_FROZEN[name]
    assert {g: data.frozen_spans(i) for i, g in enumerate(GROUPS)} == expected

    fig = plot_schedule(data)
    ax_lr, ax_plan = fig.axes[:2]
    lines = [ln for ln in ax_lr.get_lines() if (ln.get_gid() or "").startswith("lr:")]
    assert [ln.get_gid() for ln in lines] == [f"lr:{g}" for g in GROUPS]
    for i, (g, line) in enumerate(zip(GROUPS, lines)):
        y = np.asarray(line.get_ydata(), dtype=float)
        drawn = ~np.isnan(y)
        assert (drawn == data.trainable[i]).all()  # drawn exactly while the group trains
        np.testing.assert_allclose(y[drawn], data.lr[i][drawn])
        bars = [c for c in ax_plan.collections if isinstance(c, PolyCollection) and c.get_gid() == f"frozen:{g}"]
        assert len(bars) == 1
        spans = sorted((round(p.vertices[:, 0].min()), round(p.vertices[:, 0].max())) for p in bars[0].get_paths())
        assert spans == expected[g]


def test_replayed_lrs_follow_scales_warmups_and_the_lpft_restart():
    data = schedule_data(model_for(strategies()["LPFT(lp_epochs=3)"]), SPE, EPOCHS)
    head, stem = data.lr[-1], data.lr[0]
    running = head > 0
    np.testing.assert_allclose(stem[running] / head[running], 0.5**5, rtol=1e-6)  # layer_decay keeps the ratios
    assert head[0] == 0 and head[SPE] == pytest.approx(1e-3)  # warm-up over the first epoch to the peak
    restart = 3 * SPE
    assert head[restart] == 0 and head[restart + SPE] == pytest.approx(1e-3)  # LP-FT starts the schedule afresh
    assert head[-1] < 1e-4  # cosine decays to ~0 at the end of the run

    ramped = schedule_data(model_for(Gradual(every=1, unfreeze_warmup_steps=3)), SPE, EPOCHS)
    plain = schedule_data(model_for(Gradual(every=1)), SPE, EPOCHS)
    layer4 = GROUPS.index("layer4")  # unfreezes at epoch 1, then ramps its lr over 3 steps
    np.testing.assert_allclose(ramped.lr[layer4, SPE : SPE + 3] / plain.lr[layer4, SPE : SPE + 3], [1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(ramped.lr[layer4, SPE + 3 :], plain.lr[layer4, SPE + 3 :])


def test_replay_leaves_the_model_as_it_was():
    model = model_for(strategies()["LPFT(lp_epochs=3)"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    schedule_data(model, SPE, EPOCHS)
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_plot_is_what_training_logs():
    """The replay is not a model of the trainer: a real run logs the same lr per group at every step."""
    cli = main(
        ["fit", *TINY, "--trainer.max_epochs", "3", "--trainer.log_every_n_steps", "1", "--data.train_size", "64",
         "--data.val_size", "16", "--model.layer_decay", "0.5",
         "--model.freeze", "lit_ft.schedules.Gradual", "--model.freeze.unfreeze_warmup_steps", "2",
         "--model.lr_scheduler", "lit_ft.optim.WarmupCosineLR", "--model.lr_scheduler.warmup_steps", "3",
         "--confusion.every_n_epochs", "0", "--train_samples.num_images", "0"],
        return_cli=True,
    )
    acc = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    model = cli.model
    data = schedule_data(model, steps_per_epoch=4, epochs=3)  # 64 images / batch 16
    for i, name in enumerate(data.group_names):
        logged = {e.step: e.value for e in acc.Scalars(f"lr/{name}")}
        assert sorted(logged) == list(range(12))
        np.testing.assert_allclose([logged[s] for s in range(12)], data.lr[i], rtol=1e-5)
    sizes = np.array([g.num_params(model.model) for g in model.groups])
    counts = {e.step: e.value for e in acc.Scalars("trainable_params")}
    np.testing.assert_allclose([counts[s] for s in range(12)], sizes @ data.trainable)


def test_the_readme_picture_script_draws_every_strategy(tmp_path):
    out = plot_schedules_main(["--out", str(tmp_path / "s.png"), "--backbone", "test_resnet", "--dpi", "30"])
    assert out.is_file() and out.stat().st_size > 10_000
    from PIL import Image

    w, h = Image.open(out).size
    assert w > h  # strategies side by side


def test_the_committed_readme_picture_exists_and_is_small():
    png = Path(__file__).resolve().parents[1] / "docs" / "schedules.png"
    assert png.is_file() and png.stat().st_size < 400_000
