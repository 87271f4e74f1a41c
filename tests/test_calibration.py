"""Temperature scaling, calibration error and `lit-ft calibrate`: the numbers against known
truths and torchmetrics, the command end to end, and the temperature in checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

from lit_ft.calibration import (
    collect_logits,
    ece_from_bins,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    reliability_figure,
)
from lit_ft.callbacks.figures import figure_to_array
from lit_ft.cli import main
from tests.helpers import tiny_data, tiny_model, trainer
from tests.test_cli import TINY


def _sampled(n: int, classes: int, true_t: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z and labels drawn from softmax(z / true_t): the best temperature is true_t."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g, dtype=torch.float64) * 4
    y = torch.multinomial((z / true_t).softmax(-1), 1, generator=g).squeeze(1)
    return z, y


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_with(true_t):
    z, y = _sampled(20000, 10, true_t)
    t = fit_temperature(z, y)
    assert t == pytest.approx(true_t, rel=0.05)
    assert nll(z, y, t) < nll(z, y, 1.0)


def test_temperature_scaling_lowers_validation_nll_and_never_changes_the_argmax():
    z, y = _sampled(3000, 7, 3.0, seed=1)  # overconfident logits: T > 1
    t = fit_temperature(z, y)
    assert t > 1.5
    assert nll(z, y, t) < nll(z, y) - 0.1
    assert expected_calibration_error(z, y, t) < expected_calibration_error(z, y)
    assert torch.equal((z / t).softmax(-1).argmax(-1), z.argmax(-1))


def test_fit_temperature_never_returns_one_worse_than_none():
    z = torch.zeros(50, 4)  # every temperature fits equally: keep 1
    assert fit_temperature(z, torch.arange(50) % 4) == 1.0


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_reliability_bins_give_torchmetrics_ece_including_confidence_exactly_one(n_bins):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(500, 5, generator=g) * 3
    logits[:20] = torch.tensor([200.0, 0, 0, 0, 0])  # softmax = exactly 1.0: torchmetrics' extra last bin
    labels = torch.randint(0, 5, (500,), generator=g)
    probs = logits.softmax(-1)
    expected = float(multiclass_calibration_error(probs, labels, num_classes=5, n_bins=n_bins, norm="l1"))
    bins = reliability_bins(probs, labels, n_bins)
    assert ece_from_bins(bins) == pytest.approx(expected, abs=1e-6)
    # bins add up over batches (and ranks): two halves summed = the whole
    assert torch.allclose(reliability_bins(probs[:200], labels[:200], n_bins) + reliability_bins(probs[200:], labels[200:], n_bins), bins)
    assert int(bins[0].sum()) == 500
    assert expected_calibration_error(logits, labels, n_bins=n_bins) == pytest.approx(expected, abs=1e-6)
    img = figure_to_array(reliability_figure(bins, "test"))
    assert img.ndim == 3 and img.std() > 10


def test_logged_val_ece_and_loss_equal_torchmetrics_and_nll_on_the_same_logits(tmp_path, one_thread):
    model, dm = tiny_model(), tiny_data()
    tr = trainer(tmp_path, max_epochs=1)
    tr.fit(model, dm)
    model.temperature.fill_(1.7)  # also through the temperature: what is logged is the calibrated model
    logits, labels = collect_logits(tr, model, dm, "val")  # the step's (already divided) logits
    metrics = tr.callback_metrics
    expected = float(multiclass_calibration_error(logits.softmax(-1), labels, num_classes=4, n_bins=15, norm="l1"))
    assert float(metrics["val/ece"]) == pytest.approx(expected, abs=1e-5)
    assert float(metrics["val/ece"]) == pytest.approx(ece_from_bins(reliability_bins(logits.softmax(-1), labels)), abs=1e-5)
    assert float(metrics["val/loss"]) == pytest.approx(float(F.cross_entropy(logits, labels)), abs=1e-5)
    raw = logits * 1.7
    assert float(metrics["val/loss"]) == pytest.approx(nll(raw, labels, 1.7), abs=1e-5)


@pytest.mark.slow
def test_calibrate_stores_the_temperature_and_test_predict_use_it_with_the_same_classes(capsys):
    # Random labels memorised for 4 epochs: an overconfident model, so T > 1 and NLL drops.
    data = ["--data.difficulty", "random", "--data.train_size", "64", "--data.val_size", "64", "--data.test_size", "64"]
    fit = main(["fit", *TINY, *data, "--trainer.max_epochs", "4", "--model.optimizer.lr", "0.01",
                "--cam.every_n_epochs", "0"], return_cli=True)
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    before = main(["predict", *TINY, *data, "--ckpt_path", str(ckpt), "--prediction_writer.output", "before.csv",
                   "--prediction_writer.top_k", "4"], return_cli=True)
    assert float(before.model.temperature) == 1.0
    capsys.readouterr()
    main(["calibrate", *TINY, *data, "--ckpt_path", str(ckpt)])
    out = capsys.readouterr().out
    saved = torch.load(ckpt, weights_only=True)["lit_ft"]
    t = saved["temperature"]
    assert f"temperature {t:.4f}" in out and "validation" in out and "test" in out
    val, test = saved["calibration"]["splits"]
    assert val["nll_after"] < val["nll_before"]  # fitted on validation: it can only go down there
    assert val["images"] == test["images"] == 64
    # `test` with the calibrated checkpoint reports the calibrated NLL the command printed
    tested = main(["test", *TINY, *data, "--ckpt_path", str(ckpt)], return_cli=True)
    assert float(tested.model.temperature) == pytest.approx(t)
    assert float(tested.trainer.callback_metrics["test/loss"]) == pytest.approx(test["nll_after"], abs=1e-4)
    assert float(tested.trainer.callback_metrics["test/ece"]) == pytest.approx(test["ece_after"], abs=1e-4)
    main(["predict", *TINY, *data, "--ckpt_path", str(ckpt), "--prediction_writer.output", "after.csv",
          "--prediction_writer.top_k", "4"])
    rows = {n: list(csv.DictReader(open(n))) for n in ("before.csv", "after.csv")}
    assert [r["class"] for r in rows["before.csv"]] == [r["class"] for r in rows["after.csv"]]  # argmax unchanged
    for b, a in zip(rows["before.csv"], rows["after.csv"]):
        pb = torch.tensor([float(b["prob"])] + [float(b[f"prob_{k}"]) for k in (2, 3, 4)], dtype=torch.float64)
        pa = torch.tensor([float(a["prob"])] + [float(a[f"prob_{k}"]) for k in (2, 3, 4)], dtype=torch.float64)
        # the same probabilities, re-tempered: softmax(log p / T) (6-decimal CSV rounding)
        assert torch.allclose((pb.clamp_min(1e-6).log() / t).softmax(-1), pa, atol=2e-3)


def test_calibrate_without_a_checkpoint_is_a_user_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["calibrate", *TINY])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "calibrate needs a trained model" in err and "--ckpt_path best" in err


def test_temperature_rides_in_the_checkpoint_old_checkpoints_load_as_one_and_fit_resets_it(tmp_path, one_thread):
    model, dm = tiny_model(), tiny_data(train_size=32, val_size=16)
    tr = trainer(tmp_path, max_epochs=1, enable_checkpointing=True)
    tr.fit(model, dm)
    path = tmp_path / "m.ckpt"
    model.temperature.fill_(2.0)
    tr.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["lit_ft"]["temperature"] == 2.0
    assert "temperature" not in ckpt["state_dict"]  # weights only: shape checks and old files unaffected
    loaded = type(model).load_from_checkpoint(path, weights_only=True)
    assert float(loaded.temperature) == 2.0
    del ckpt["lit_ft"]["temperature"]  # a checkpoint from before calibration existed
    torch.save(ckpt, path)
    assert float(type(model).load_from_checkpoint(path, weights_only=True).temperature) == 1.0
    # training on changes the logits the temperature was fitted to: fit starts from 1 again
    model.temperature.fill_(2.0)
    trainer(tmp_path, max_epochs=2).fit(model, dm, ckpt_path=None)
    assert float(model.temperature) == 1.0


@pytest.mark.slow
def test_calibration_report_writes_its_section_once_and_its_images(tmp_path):
    import importlib.util

    from PIL import Image

    main(["fit", *TINY, "--trainer.max_epochs", "1", "--data.image_size", "64", "--cam.every_n_epochs", "0"])
    spec = importlib.util.spec_from_file_location("calibration_report", Path(__file__).resolve().parents[1] / "benchmarks" / "calibration_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    results = tmp_path / "docs" / "results.md"
    results.parent.mkdir()
    results.write_text("# lit-ft results\n\n## Other\n\nkept\n")
    args = ["--ckpt", "runs/default/version_0", "--results", str(results), "--images_dir", str(tmp_path / "docs")]
    report.main(args)
    report.main(args)  # a rerun replaces its section
    text = results.read_text()
    assert text.count(f"## {report.SECTION}") == 1 and "## Other\n\nkept" in text
    section = text.split(f"## {report.SECTION}", 1)[1]
    t = float(section.split("**T = ", 1)[1].split("**", 1)[0])
    ckpt = torch.load(next(Path("runs/default/version_0/checkpoints").glob("best-*.ckpt")), weights_only=True)
    assert "temperature" not in ckpt["lit_ft"] or ckpt["lit_ft"]["temperature"] == 1.0  # the report never writes the checkpoint
    assert t > 0 and "| test | 64 |" in section and "| class_0 |" in section
    assert "layer3" in section  # 64 px: the 2x2 final map is too coarse, the deepest >= 4x4 stage is explained
    for name in ("cam_panel.png", "calibration_reliability.png"):
        assert f"]({name})" in section
        assert np.asarray(Image.open(tmp_path / "docs" / name)).std() > 10


def test_calibrate_after_fit_stores_the_temperature_in_the_best_checkpoint_before_testing():
    import torch as _torch

    from lit_ft.cli import main as _main
    from tests.test_cli import TINY as _TINY

    cli = _main(["fit", *_TINY, "--trainer.max_epochs", "2", "--data.train_size", "64", "--data.val_size", "32",
                 "--calibrate_after_fit", "true", "--test_after_fit", "true"], return_cli=True)
    best = cli.trainer.checkpoint_callback.best_model_path
    state = _torch.load(best, map_location="cpu", weights_only=True)["lit_ft"]
    assert state["temperature"] != 1.0 and state["calibration"]["temperature"] == state["temperature"]
    assert float(cli.model.temperature) == pytest.approx(state["temperature"])  # the test after fit used it
