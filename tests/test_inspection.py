"""TensorBoard inspection: what a CLI run writes (images, text, hparams, throughput), read back
from the event files, plus the callbacks' arithmetic on known inputs."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata

from lit_ft.callbacks import ConfusionLogger, throughput_monitor
from lit_ft.callbacks.figures import confusion_matrix_figure, figure_to_array, image_grid_figure, unnormalize
from lit_ft.callbacks.plan_monitor import layer_group_lrs
from lit_ft.callbacks.run_record import flatten_config
from lit_ft.callbacks.throughput import TAG as THROUGHPUT_TAG
from lit_ft.cli import main
from tests.test_cli import TINY

EPOCHS = 2


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short CLI fit + test; random labels so there are mistakes to show."""
    root = tmp_path_factory.mktemp("inspection")
    cwd, out = os.getcwd(), io.StringIO()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out):
            cli = main(
                ["fit", *TINY, "--trainer.max_epochs", str(EPOCHS), "--data.difficulty", "random",
                 "--data.train_size", "64", "--data.val_size", "48", "--data.test_size", "16",
                 "--test_after_fit", "true", "--confusion.misclassified", "6", "--throughput.window_size", "3",
                 # a plan and layer decay, so the LR and trainable-parameter curves have something to show
                 "--model.layer_decay", "0.5", "--model.freeze", "lit_ft.schedules.Gradual"],
                return_cli=True,
            )
    finally:
        os.chdir(cwd)
    log_dir = root / cli.trainer.log_dir
    return SimpleNamespace(cli=cli, root=root, dir=log_dir, acc=_events(log_dir), stdout=out.getvalue())


def _png(acc: EventAccumulator, tag: str, index: int = -1) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(acc.Images(tag)[index].encoded_image_string)))


def test_images_confusion_matrix_per_epoch_mistakes_and_one_input_grid(run):
    acc = run.acc
    assert {"val/confusion_matrix", "val/misclassified", "train/inputs"} <= set(acc.Tags()["images"])
    steps_per_epoch = 64 // 16
    cm = acc.Images("val/confusion_matrix")
    val_steps = [e.step for e in acc.Scalars("val/acc")]
    assert [e.step for e in cm] == val_steps == [steps_per_epoch * (k + 1) - 1 for k in range(EPOCHS)]  # per epoch
    assert len(acc.Images("val/misclassified")) == EPOCHS
    assert [e.step for e in acc.Images("train/inputs")] == [0]  # once, at the start
    img = _png(acc, "val/confusion_matrix")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert img.std() > 10  # a drawing, not a blank canvas


def test_scalars_cover_losses_metrics_lrs_trainable_params_and_throughput(run):
    tags = set(run.acc.Tags()["scalars"])
    groups = [g.name for g in run.cli.model.groups]
    assert {f"lr/{g}" for g in groups} | {"trainable_params", "train/loss", "val/loss", "val/acc"} <= tags
    assert not any(t.startswith("lr/") and t.endswith("/no_decay") for t in tags)  # one curve per layer group
    # Lightning's ThroughputMonitor: images/s over the last 3 batches, from the 3rd batch on
    # (log_every_n_steps 2 in TINY: odd logger steps), consistent with its own counters.
    rates = {e.step: e.value for e in run.acc.Scalars(THROUGHPUT_TAG)}
    assert sorted(rates) == [3, 5, 7] and all(r > 0 for r in rates.values())
    samples = {e.step: e.value for e in run.acc.Scalars("train/samples")}
    seconds = {e.step: e.value for e in run.acc.Scalars("train/time")}
    for step, rate in rates.items():
        assert rate == pytest.approx((samples[step] - samples[step - 2]) / (seconds[step] - seconds[step - 2]), rel=1e-4)


def test_lr_curves_keep_the_layer_decay_ratio_and_trainable_params_follow_the_plan(run):
    acc, groups = run.acc, [g.name for g in run.cli.model.groups]
    head = [e.value for e in acc.Scalars("lr/head")]
    stem = [e.value for e in acc.Scalars("lr/stem")]
    assert head and all(s / h == pytest.approx(0.5 ** (len(groups) - 1), rel=1e-6) for s, h in zip(stem, head))
    counts = [e.value for e in acc.Scalars("trainable_params")]
    assert counts == sorted(counts) and counts[0] < counts[-1]  # gradual: more groups over time
    assert counts[0] == sum(p.numel() for p in run.cli.model.model.get_classifier().parameters())
    assert any("lit-ft/plan" in t for t in acc.Tags()["tensors"])


def test_config_text_is_the_resolved_config(run):
    tensors = run.acc.Tags()["tensors"]
    tag = next(t for t in tensors if t.startswith("lit-ft/config"))
    text = run.acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
    saved = yaml.safe_load((run.dir / "config.yaml").read_text())
    parsed = yaml.safe_load("\n".join(line[4:] for line in text.splitlines()))
    assert parsed == saved and parsed["model"]["backbone"] == "test_resnet"
    assert any(t.startswith("lit-ft/plan") for t in tensors)


def test_hparams_hold_config_values_and_final_metrics(run):
    content = run.acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    start = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    params = {k: v.string_value or v.number_value or v.bool_value for k, v in start.hparams.items()}
    assert params["model.backbone"] == "test_resnet"
    assert params["data"] == "SyntheticDataModule" and params["data.difficulty"] == "random"
    assert params["model.optimizer"] == "AdamW" and params["model.optimizer.lr"] == pytest.approx(1e-3)
    assert params["trainer.max_epochs"] == EPOCHS
    assert not any(k.startswith(("trainer.logger", "checkpoint", "confusion")) for k in params)
    experiment = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    declared = {m.name.tag for m in experiment.metric_infos}
    assert {"hp/val/acc", "hp/val/loss", "hp/best/val/acc", "hp/test/acc"} <= declared
    last = {t: run.acc.Scalars(t)[-1].value for t in declared}
    assert last["hp/val/acc"] == pytest.approx(run.acc.Scalars("val/acc")[-1].value)
    assert last["hp/test/acc"] == pytest.approx(run.acc.Scalars("test/acc")[-1].value)
    assert last["hp/best/val/acc"] == pytest.approx(max(e.value for e in run.acc.Scalars("val/acc")))
    # The logger's hparams.yaml stays the model's arguments (what load_from_checkpoint reads).
    hparams = yaml.safe_load((run.dir / "hparams.yaml").read_text())
    assert hparams["backbone"] == "test_resnet" and not any("." in k for k in hparams)


def test_summary_line_names_best_checkpoint_and_its_metrics(run):
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("lit-ft: best checkpoint"))
    match = re.fullmatch(r"lit-ft: best checkpoint (\S+) val/acc=([\d.]+) (.*) \(epoch (\d+)\)", line)
    assert match, line
    path, acc, others, epoch = match.groups()
    assert path == run.cli.trainer.checkpoint_callback.best_model_path and (run.root / path).is_file()
    metrics = dict(kv.split("=") for kv in others.split())
    assert {"val/loss", "val/f1"} <= set(metrics) and "val/acc" not in metrics
    step = 4 * (int(epoch) + 1) - 1
    val_loss = {e.step: e.value for e in run.acc.Scalars("val/loss")}[step]
    assert float(metrics["val/loss"]) == pytest.approx(val_loss, abs=1e-4)  # the best epoch's, not the last
    assert float(acc) == pytest.approx(max(e.value for e in run.acc.Scalars("val/acc")), abs=1e-4)


def test_each_inspection_callback_can_be_switched_off_from_the_command_line():
    cli = main(["fit", *TINY, "--trainer.max_epochs", "1", "--data.train_size", "32", "--data.val_size", "16",
                "--confusion.every_n_epochs", "0", "--train_samples.num_images", "0", "--throughput.enabled", "false",
                "--reliability.every_n_epochs", "0", "--per_class.every_n_epochs", "0", "--cam.every_n_epochs", "0"],
               return_cli=True)
    acc = _events(Path(cli.trainer.log_dir))
    assert acc.Tags()["images"] == []
    assert not any(t.startswith("train/") and "sec" in t for t in acc.Tags()["scalars"])
    assert not any(t.startswith("val/per_class") for t in acc.Tags()["tensors"])
    assert "val/acc" in acc.Tags()["scalars"]


def test_inspection_options_are_in_the_printed_config(capsys):
    with pytest.raises(SystemExit):
        main(["fit", *TINY, "--confusion.misclassified", "4", "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["confusion"]["misclassified"] == 4 and cfg["confusion"]["every_n_epochs"] == 1
    assert cfg["train_samples"]["num_images"] == 16 and cfg["throughput"]["enabled"] is True


# ---------------------------------------------------------------------------- units
def _fake_trainer(tmp_path):
    return SimpleNamespace(
        sanity_checking=False, current_epoch=0, global_step=7, is_global_zero=True, datamodule=None,
        loggers=[TensorBoardLogger(str(tmp_path), name="", version="")],
    )


def test_confusion_counts_and_most_confident_mistakes(tmp_path):
    cb = ConfusionLogger(misclassified=2)
    trainer = _fake_trainer(tmp_path)
    module = SimpleNamespace(class_names=["a", "b", "c"], num_classes=3, device=torch.device("cpu"),
                             data_config={"mean": (0.5,) * 3, "std": (0.5,) * 3})
    cb.on_validation_epoch_start(trainer, module)
    # batch 1: truths 0,1,2,0 ; predictions 0,2,2,1 with confidences from the logits
    logits1 = torch.tensor([[5.0, 0, 0], [0, 1, 2], [0, 0, 3], [0, 9, 0]])
    y1 = torch.tensor([0, 1, 2, 0])
    x1 = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)  # image k is filled with k
    cb.on_validation_batch_end(trainer, module, {"logits": logits1}, (x1, y1), 0)
    # batch 2 (soft targets): truth 1 predicted 0 (mildly confident); truth 2 predicted 2
    logits2 = torch.tensor([[0.5, 0, 0], [0, 0, 1]])
    y2 = torch.tensor([[0.0, 1, 0], [0, 0, 1]])
    x2 = torch.full((2, 3, 2, 2), 10.0) + torch.arange(2.0).view(2, 1, 1, 1)
    cb.on_validation_batch_end(trainer, module, logits2, (x2, y2), 1)
    expected = torch.zeros(3, 3, dtype=torch.long)
    for t, p in [(0, 0), (1, 2), (2, 2), (0, 1), (1, 0), (2, 2)]:
        expected[t, p] += 1
    images, true, pred, score = cb._worst
    assert true.tolist() == [0, 1] and pred.tolist() == [1, 2]  # the two most confident of the 3 mistakes
    assert images[:, 0, 0, 0].tolist() == [3.0, 1.0]
    cb.on_validation_epoch_end(trainer, module)
    assert torch.equal(cb.matrix, expected)  # [true, pred] counts (summed over ranks: tests/test_budget.py)
    trainer.loggers[0].experiment.flush()
    acc = _events(Path(trainer.loggers[0].log_dir))
    assert set(acc.Tags()["images"]) == {"val/confusion_matrix", "val/misclassified"}
    assert acc.Images("val/confusion_matrix")[0].step == 7


def test_sanity_check_and_runs_without_tensorboard_are_not_drawn(tmp_path):
    cb = ConfusionLogger()
    trainer = _fake_trainer(tmp_path)
    trainer.sanity_checking = True
    module = SimpleNamespace(num_classes=3, device=torch.device("cpu"))
    cb.on_validation_epoch_start(trainer, module)
    cb.on_validation_batch_end(trainer, module, torch.zeros(2, 3), (torch.zeros(2, 3, 2, 2), torch.zeros(2).long()), 0)
    cb.on_validation_epoch_end(trainer, module)
    assert cb.matrix is None
    trainer.sanity_checking, trainer.loggers = False, []
    cb.on_validation_epoch_start(trainer, module)
    assert not cb._active


def test_throughput_monitor_is_lightnings_and_can_be_switched_off():
    from lightning.pytorch.callbacks import Callback, ThroughputMonitor

    from lit_ft.callbacks.throughput import batch_size
    from lit_ft.errors import UserError

    assert isinstance(throughput_monitor(), ThroughputMonitor)
    off = throughput_monitor(enabled=False)
    assert type(off) is Callback  # no hook of its own: nothing measured, nothing logged
    with pytest.raises(UserError, match="window_size must be >= 2"):
        throughput_monitor(window_size=1)
    assert batch_size((torch.zeros(8, 3, 2, 2), torch.zeros(8))) == 8
    assert batch_size(({"image": torch.zeros(5, 3)}, torch.zeros(5))) == 5


def test_one_lr_per_layer_group_from_the_named_param_groups():
    groups = [
        {"name": "stem", "layer_group": 0, "lr": 0.1},
        {"name": "stem/no_decay", "layer_group": 0, "lr": 0.1},
        {"name": "head/no_decay", "layer_group": 1, "lr": 0.4},  # a group with only no-decay params
        {"lr": 0.7},
    ]
    assert layer_group_lrs(groups) == {"stem": 0.1, "head": 0.4, "pg3": 0.7}


def test_flatten_config_keeps_experiment_values_and_short_class_names():
    cfg = {
        "seed_everything": 1,
        "trainer": {"max_epochs": 3, "logger": {"class_path": "x.TensorBoardLogger"}, "callbacks": None, "devices": "auto"},
        "model": {"backbone": "resnet18", "lr_range": [1e-5, 1e-3], "drop_path_rate": None,
                  "freeze": {"class_path": "lit_ft.schedules.Gradual", "init_args": {"every": 2}}},
        "data": {"class_path": "lit_ft.data.SyntheticDataModule", "init_args": {"batch_size": 8}},
        "checkpoint": {"monitor": "val/acc"},
        "config": ["a.yaml"],
    }
    assert flatten_config(cfg) == {
        "seed_everything": 1, "trainer.max_epochs": 3, "trainer.devices": "auto",
        "model.backbone": "resnet18", "model.lr_range": "[1e-05, 0.001]",
        "model.freeze": "Gradual", "model.freeze.every": 2,
        "data": "SyntheticDataModule", "data.batch_size": 8,
    }


def test_figures_are_rgb_arrays_for_many_classes_and_gray_images():
    many = confusion_matrix_figure(np.eye(60, dtype=int) * 3, [f"c{i}" for i in range(60)])
    assert figure_to_array(many).shape[2] == 3
    gray = unnormalize(torch.zeros(3, 1, 8, 8), (0.5,), (0.25,))
    assert gray.shape == (3, 8, 8, 1) and np.allclose(gray, 0.5)
    img = figure_to_array(image_grid_figure(gray, ["a", "b", "c"]))
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
