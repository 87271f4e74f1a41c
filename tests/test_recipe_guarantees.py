"""The core guarantees under the settings users actually run, not the tests' minimal ones:
the shipped recipe's scheduler with its length filled in automatically, augmentation on,
loader worker processes, dropout and drop-path, a plan that unfreezes mid-run with an LR
warm-up. Resume is bit-exact; an extended run keeps training; a second fit of the same
module follows its plan; test/predict use the preprocessing the model was trained with."""

from __future__ import annotations

import signal
import warnings
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_ft.cli import main
from tests.cli_args import synthetic_run
from lit_ft.schedules import FreezeUnfreeze
from tests.helpers import StopAfter, snapshot, tiny_data, tiny_model, trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# 40 images / batch 8 = 5 steps per epoch, 2 epochs; the shipped recipe's moving parts.
RECIPE = [
    "--model.drop_rate", "0.2", "--model.drop_path_rate", "0.1", "--model.label_smoothing", "0.1",
    "--model.layer_decay", "0.7",
    "--model.optimizer", "torch.optim.AdamW", "--model.optimizer.lr", "0.003", "--model.optimizer.weight_decay", "0.02",
    "--model.lr_scheduler", "lit_ft.optim.WarmupCosineLR", "--model.lr_scheduler.warmup_steps", "3",
    "--model.freeze", "lit_ft.schedules.FreezeUnfreeze", "--model.freeze.epochs", "1",
    "--model.freeze.unfreeze_warmup_steps", "2",
    # augmentation on, as in every shipped config, and loader workers
    *synthetic_run("test_efficientnet", batch_size=8, train_size=40, val_size=16, test_size=16, augment=True,
                   scale="[0.5, 1.0]", hflip=0.5, num_workers=2, trainer={"max_epochs": 2, "log_every_n_steps": 1}),
    "--confusion.every_n_epochs", "0", "--train_samples.num_images", "0",
]
STEPS = 10


def _fit(*extra: str):
    return main(["fit", *RECIPE, *extra], return_cli=True)


def _without(args: list[str], option: str) -> list[str]:
    """``args`` without ``option`` and its value."""
    i = args.index(option)
    return args[:i] + args[i + 2 :]


@pytest.mark.slow
@pytest.mark.parametrize("batch_transforms", ["false", "true"], ids=["pil", "batch_transforms"])
def test_mid_epoch_interrupt_and_resume_with_the_shipped_recipe_equals_an_uninterrupted_run(tmp_path, monkeypatch, batch_transforms):
    data = ("--data.batch_transforms", batch_transforms)
    ref = tmp_path / "ref"
    ref.mkdir()
    monkeypatch.chdir(ref)
    full = snapshot(_fit(*data).model)

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    with pytest.raises(SystemExit) as exit_:  # Ctrl-C in epoch 1, after its 2nd batch (unfrozen, warming up)
        _fit(*data, "--trainer.callbacks+=tests.test_interrupt.SignalAt", "--trainer.callbacks.step", "7",
             "--trainer.callbacks.signum", str(int(signal.SIGINT)))
    assert exit_.value.code == 128 + signal.SIGINT
    cli = _fit(*data, "--ckpt_path", "last")
    assert cli.trainer.global_step == STEPS
    got = snapshot(cli.model)
    different = [k for k in got if not torch.equal(got[k], full[k])]
    assert not different, f"{len(different)} of {len(got)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


@pytest.mark.slow
def test_extending_a_finished_run_re_plans_the_schedule_instead_of_training_at_lr_zero():
    first = _fit("--data.num_workers", "0")
    log_dir = Path(first.trainer.log_dir)
    with pytest.warns(UserWarning, match="planned for 10 scheduler steps and now has 15"):
        _fit("--data.num_workers", "0", "--trainer.max_epochs", "3", "--ckpt_path", "last")
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    head = {e.step: e.value for e in acc.Scalars("lr/head")}
    assert set(range(10, 15)) <= set(head)
    assert all(head[s] > 0 for s in range(10, 15)), head  # epoch 3 trains; it used to run at LR 0


def test_an_endless_run_with_an_auto_length_schedule_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        _fit("--data.num_workers", "0", "--trainer.max_epochs", "-1")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "WarmupCosineLR needs the run's length" in err and "HINT: set trainer.max_epochs" in err


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        (["--model.lr_scheduler", "torch.optim.lr_scheduler.CosineAnnealingLR", "--model.lr_scheduler.T_max", "10",
          "--model.lr_scheduler.eta_min", "0.0001"], "ends every param group at the same LR"),
        (["--model.lr_scheduler", "torch.optim.lr_scheduler.OneCycleLR", "--model.lr_scheduler.max_lr", "0.01",
          "--model.lr_scheduler.total_steps", "6"], "fails at step 7 of a 10-step run"),
    ],
    ids=["scalar_floor", "too_short"],
)
def test_a_schedule_that_would_go_wrong_mid_run_is_refused_before_training(scheduler, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _fit("--data.num_workers", "0", *scheduler)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "HINT:" in err and "Traceback" not in err


def test_onecycle_and_sequential_schedulers_configure_from_the_command_line(tmp_path):
    cli = _fit("--data.num_workers", "0", "--trainer.max_epochs", "1", "--model.lr_scheduler", "torch.optim.lr_scheduler.OneCycleLR",
               "--model.lr_scheduler.max_lr", "0.01")
    assert cli.trainer.lr_scheduler_configs[0].scheduler.inner.total_steps == 5  # filled in: 1 epoch of 5 steps
    config = tmp_path / "seq.yaml"
    config.write_text(
        "model:\n  lr_scheduler:\n    class_path: lit_ft.optim.SequentialLR\n    init_args:\n      schedulers:\n"
        "        - {class_path: torch.optim.lr_scheduler.LinearLR, init_args: {start_factor: 0.1, total_iters: 2}}\n"
        "        - {class_path: torch.optim.lr_scheduler.ExponentialLR, init_args: {gamma: 0.8}}\n"
        "      milestones: [2]\n"
    )
    cli = main(["fit", *RECIPE, "--config", str(config), "--data.num_workers", "0"], return_cli=True)
    inner = cli.trainer.lr_scheduler_configs[0].scheduler.inner
    assert type(inner).__name__ == "SequentialLR" and cli.trainer.global_step == STEPS


def test_fitting_the_same_module_twice_follows_the_plan_in_the_second_fit(tmp_path):
    model = tiny_model(freeze=FreezeUnfreeze(epochs=1))
    trainer(tmp_path / "a", max_epochs=2).fit(model, tiny_data())
    before = snapshot(model)
    trainer(tmp_path / "b", max_epochs=2, callbacks=[StopAfter(1)]).fit(model, tiny_data())  # a notebook's second stage
    after = snapshot(model)
    assert torch.equal(before["model.layer1.0.conv1.weight"], after["model.layer1.0.conv1.weight"])  # frozen again
    assert not torch.equal(before["model.fc.weight"], after["model.fc.weight"])  # the head trained


@pytest.mark.slow
def test_test_and_predict_from_a_checkpoint_use_the_trained_preprocessing():
    cli = _fit("--data.num_workers", "0", "--trainer.max_epochs", "1", "--data.image_size", "40",
               "--data.mean", "[0.4, 0.4, 0.4]", "--data.crop_pct", "1.0")
    assert cli.model.data_config["input_size"] != (3, 40, 40)  # the backbone's own default differs
    base = _without(RECIPE, "--data.image_size")
    test = main(["test", *base, "--ckpt_path", "best"], return_cli=True)
    cfg = test.datamodule.resolved_data_config
    assert tuple(cfg["input_size"]) == (3, 40, 40) and tuple(cfg["mean"]) == pytest.approx((0.4, 0.4, 0.4))
    assert cfg["crop_pct"] == 1.0
    with pytest.warns(UserWarning, match="data.image_size=48 differs from the 40 the model .* was trained with"):
        other = main(["test", *base, "--data.image_size", "48", "--ckpt_path", "best"], return_cli=True)
    assert tuple(other.datamodule.resolved_data_config["input_size"]) == (3, 48, 48)


def test_a_saved_run_config_finds_its_own_checkpoints(tmp_path, monkeypatch):
    cli = main(["fit", *RECIPE, "--data.num_workers", "0", "--trainer.max_epochs", "1"], return_cli=True)
    saved = (Path(cli.trainer.log_dir) / "config.yaml").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # another working directory, and the run is named "default"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        test = main(["test", "--config", str(saved), "--ckpt_path", "best"], return_cli=True)
    assert "test/acc" in test.trainer.callback_metrics


def test_a_strategy_config_without_its_base_is_one_clear_error(capsys):
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(root / "configs/experiments/gradual.yaml")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "builds on" in err and "_base.yaml, which was not given" in err
    assert "HINT: pass the base first: lit-ft fit -c" in err


def test_a_resumed_run_keeps_the_record_of_the_weights_it_started_from(tmp_path):
    # The resumed model is built without loading them again (the checkpoint has every weight),
    # but its checkpoints must still name them: soups, WiSE-FT and PEFT rebuild the start from it.
    import timm

    weights = tmp_path / "start.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=4).state_dict(), weights)
    first = _fit("--data.num_workers", "0", "--trainer.max_epochs", "1", "--model.pretrained", str(weights))
    last = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    resumed = _fit("--data.num_workers", "0", "--model.pretrained", str(weights), "--ckpt_path", "last")
    assert resumed.trainer.global_step == STEPS
    saved = torch.load(last, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert saved["pretrained"] == str(weights)
