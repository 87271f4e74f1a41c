"""Per-class numbers and confused pairs against torchmetrics and hand counts, and what a CLI
run writes to TensorBoard and prints (per-class table, reliability diagram, Grad-CAM panel)."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.functional.classification import (
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from lit_ft.callbacks.class_report import format_pairs, most_confused, per_class_figure, per_class_stats, per_class_table
from lit_ft.callbacks.figures import figure_to_array
from lit_ft.cli import main
from tests.test_cli import TINY


def test_per_class_stats_equal_torchmetrics_including_a_class_never_predicted():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (300,), generator=g)
    pred = torch.where(torch.rand(300, generator=g) < 0.6, target, torch.randint(0, 4, (300,), generator=g))
    pred[pred == 4] = 0  # class 4 is never predicted: precision 0, not NaN
    cm = multiclass_confusion_matrix(pred, target, 5).numpy()
    stats = per_class_stats(cm)
    for ours, fn in ((stats.precision, multiclass_precision), (stats.recall, multiclass_recall), (stats.f1, multiclass_f1_score)):
        np.testing.assert_allclose(ours, fn(pred, target, 5, average=None).numpy(), atol=1e-6)
    assert stats.precision[4] == 0.0
    assert stats.support.tolist() == torch.bincount(target, minlength=5).tolist()


def test_most_confused_lists_the_largest_off_diagonal_counts_with_their_share_of_the_true_class():
    cm = np.array([[50, 3, 0], [9, 40, 1], [0, 9, 20]])
    assert most_confused(cm, 3) == [(1, 0, 9, 9 / 50), (2, 1, 9, 9 / 29), (0, 1, 3, 3 / 53)]
    assert most_confused(np.eye(3, dtype=int) * 5, 3) == []  # no mistakes: nothing to list
    names = ["t-shirt", "shirt", "coat"]
    assert format_pairs(most_confused(cm, 1), names) == "shirt -> t-shirt 18.0% (9)"
    table = per_class_table(per_class_stats(cm), names)
    assert "| shirt | 0.769 | 0.800 | 0.784 | 50 |" in table  # 40/52, 40/50
    assert figure_to_array(per_class_figure(per_class_stats(cm), names)).std() > 10


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short CLI fit + test on random labels (mistakes to show), CAM panels at test too."""
    root = tmp_path_factory.mktemp("trust")
    cwd, out = os.getcwd(), io.StringIO()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out):
            cli = main(["fit", *TINY, "--trainer.max_epochs", "2", "--data.difficulty", "random",
                        "--data.train_size", "64", "--data.val_size", "48", "--data.test_size", "32",
                        "--test_after_fit", "true", "--cam.num_images", "6", "--cam.on_test", "true",
                        "--cam.target_layer", "layer3"], return_cli=True)
    finally:
        os.chdir(cwd)
    log_dir = root / cli.trainer.log_dir
    return SimpleNamespace(cli=cli, dir=log_dir, acc=_events(log_dir), stdout=out.getvalue())


@pytest.mark.slow
def test_cli_run_logs_per_class_reliability_and_gradcam_every_epoch_and_at_test(run):
    acc = run.acc
    val_steps = [e.step for e in acc.Scalars("val/acc")]
    for tag in ("val/per_class", "val/reliability", "val/gradcam"):
        assert [e.step for e in acc.Images(tag)] == val_steps, tag  # once per validation epoch, with its scalars
    for tag in ("test/per_class", "test/reliability", "test/gradcam"):
        assert len(acc.Images(tag)) == 1, tag
    for tag in ("val/per_class", "val/reliability", "val/gradcam"):
        img = np.asarray(Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string)))
        assert img.ndim == 3 and img.std() > 10, tag  # a drawing, not a blank canvas
    tensors = acc.Tags()["tensors"]
    assert "val/per_class/text_summary" in tensors and "test/per_class/text_summary" in tensors
    text = acc.Tensors("val/per_class/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| class_0 |" in text and "most confused:" in text
    assert "test/ece" in run.cli.trainer.callback_metrics and "val/ece" in set(acc.Tags()["scalars"])


@pytest.mark.slow
def test_fit_ends_with_the_most_confused_pairs_and_test_prints_the_per_class_table(run):
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("lit-ft: most confused on validation (epoch 1)"))
    assert "->" in line  # random labels: there are mistakes to name
    assert "lit-ft: per-class test results" in run.stdout
    assert "lit-ft: most confused on test:" in run.stdout
    # the printed counts are the test split's: supports add up to its size
    block = run.stdout.split("lit-ft: per-class test results\n", 1)[1].splitlines()[1:5]
    assert sum(int(r.split()[-1]) for r in block) == 32
