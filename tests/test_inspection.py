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

from lit_ft.callbacks import ConfusionLogger, ThroughputLogger
from lit_ft.callbacks import throughput as throughput_module
from lit_ft.callbacks.figures import confusion_matrix_figure, figure_to_array, image_grid_figure, unnormalize
from lit_ft.callbacks.run_record import flatten_config
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
                 "--test_after_fit", "true", "--confusion.misclassified", "6"],
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
    rates = [e.value for e in run.acc.Scalars("throughput/images_per_sec")]
    assert rates and all(r > 0 for r in rates)


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
    assert not any(t.startswith("val/per_class") for t in acc.Tags()["tensors"])
    assert "throughput/images_per_sec" not in acc.Tags()["scalars"]
    assert "val/acc" in acc.Tags()["scalars"]


def test_inspection_options_are_in_the_printed_config(capsys):
    with pytest.raises(SystemExit):
        main(["fit", *TINY, "--confusion.misclassified", "4", "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["confusion"]["misclassified"] == 4 and cfg["confusion"]["every_n_epochs"] == 1
    assert cfg["train_samples"]["num_images"] == 16 and cfg["throughput"]["enabled"] is True


# ---------------------------------------------------------------------------- units
def _fake_trainer(tmp_path, reduced: list):
    def reduce(t, reduce_op):
        reduced.append(reduce_op)
        return t

    return SimpleNamespace(
        sanity_checking=False, current_epoch=0, global_step=7, is_global_zero=True, datamodule=None,
        loggers=[TensorBoardLogger(str(tmp_path), name="", version="")], strategy=SimpleNamespace(reduce=reduce),
    )


def test_confusion_counts_and_most_confident_mistakes(tmp_path):
    cb = ConfusionLogger(misclassified=2)
    reduced: list = []
    trainer = _fake_trainer(tmp_path, reduced)
    module = SimpleNamespace(class_names=["a", "b", "c"], data_config={"mean": (0.5,) * 3, "std": (0.5,) * 3})
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
    assert torch.equal(cb._cm, expected)
    images, true, pred, score = cb._worst
    assert true.tolist() == [0, 1] and pred.tolist() == [1, 2]  # the two most confident of the 3 mistakes
    assert images[:, 0, 0, 0].tolist() == [3.0, 1.0]
    cb.on_validation_epoch_end(trainer, module)
    assert reduced == ["sum"]  # summed over ranks before drawing
    trainer.loggers[0].experiment.flush()
    acc = _events(Path(trainer.loggers[0].log_dir))
    assert set(acc.Tags()["images"]) == {"val/confusion_matrix", "val/misclassified"}
    assert acc.Images("val/confusion_matrix")[0].step == 7


def test_sanity_check_and_runs_without_tensorboard_are_not_drawn(tmp_path):
    cb = ConfusionLogger()
    trainer = _fake_trainer(tmp_path, [])
    trainer.sanity_checking = True
    cb.on_validation_epoch_start(trainer, None)
    cb.on_validation_batch_end(trainer, None, torch.zeros(2, 3), (torch.zeros(2, 3, 2, 2), torch.zeros(2).long()), 0)
    assert cb._cm is None
    trainer.sanity_checking, trainer.loggers = False, []
    cb.on_validation_epoch_start(trainer, None)
    assert not cb._active


def test_throughput_is_images_over_the_window_of_batches(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 4.0, 8.0])  # batch start, then the ends of four batches
    monkeypatch.setattr(throughput_module.time, "perf_counter", lambda: next(clock))
    logged = []
    module = SimpleNamespace(log=lambda name, value, **kw: logged.append((name, value, kw["prog_bar"])))
    trainer = SimpleNamespace(log_every_n_steps=2, world_size=1)
    cb = ThroughputLogger()
    cb.on_train_epoch_start(trainer, module)
    batch = (torch.zeros(8, 3, 2, 2), torch.zeros(8))
    cb.on_train_batch_start(trainer, module, batch, 0)
    for i in range(4):
        cb.on_train_batch_end(trainer, module, None, batch, i)
    # windows of 2 batches: 8/1, 16/2, 16/3, 16/6 images per second
    assert [v for _, v, _ in logged] == pytest.approx([8.0, 8.0, 16 / 3, 16 / 6])
    assert all(name == "throughput/images_per_sec" and bar for name, _, bar in logged)


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
