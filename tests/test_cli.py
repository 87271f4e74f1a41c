"""The CLI as a user runs it: fit/validate/test/predict, configs, resume, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from lit_ft.cli import main
from tests.cli_args import synthetic_run

ROOT = Path(__file__).resolve().parents[1]
TINY = synthetic_run(trainer={"log_every_n_steps": 2})


def fit(*extra: str, epochs: int = 2):
    return main(["fit", *TINY, "--trainer.max_epochs", str(epochs), *extra], return_cli=True)


def test_fit_learns_an_easy_task_and_saves_config_and_checkpoints():
    cli = fit("--model.optimizer.lr", "0.003", epochs=3)
    assert cli.trainer.callback_metrics["val/acc"] > 0.6  # 4 classes: chance is 0.25
    run = Path(cli.trainer.log_dir)
    assert run.parent.name == "default"
    assert (run / "config.yaml").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["backbone"] == "test_resnet"
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["num_classes"] == 4  # flowed from the data: written nowhere by the user
    assert hparams["class_names"] == [f"class_{i}" for i in range(4)]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-*.ckpt"))


def test_validate_test_predict_from_best_and_last_in_a_new_process():
    fit()
    for sub in ("validate", "test"):
        cli = main([sub, *TINY, "--ckpt_path", "best"], return_cli=True)
        assert f"{'val' if sub == 'validate' else 'test'}/acc" in cli.trainer.callback_metrics
    cli = main(["predict", *TINY, "--ckpt_path", "last"], return_cli=True)
    out = Path(cli.trainer.log_dir) / "predictions.csv"
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 64 and set(rows[0]) == {"id", "class", "index", "prob"}
    assert all(r["class"].startswith("class_") for r in rows)
    assert all(0 <= float(r["prob"]) <= 1 for r in rows)


def test_predict_on_an_image_folder_needs_only_the_checkpoint(tmp_path):
    from PIL import Image

    cli = fit()
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 30, 200)).save(tmp_path / "imgs" / "sub" / f"{i}.png")
    out = tmp_path / "p.csv"
    main([
        "predict", "--data", "lit_ft.data.ImageFolderDataModule", "--data.predict_dir", str(tmp_path / "imgs"),
        "--data.image_size", "32", "--ckpt_path", str(ckpt), "--prediction_writer.output", str(out),
        "--trainer.enable_progress_bar", "false",
    ])
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["id"] for r in rows) == ["sub/0.png", "sub/1.png", "sub/2.png"]
    assert {r["class"] for r in rows} <= {f"class_{i}" for i in range(4)}  # names from the checkpoint


def test_resume_from_last_continues_at_the_right_epoch_in_the_same_run():
    first = fit(epochs=2)
    run = Path(first.trainer.log_dir)
    cli = fit("--ckpt_path", "last", epochs=3)
    assert Path(cli.trainer.log_dir) == run  # logs continue in the same version directory
    assert cli.trainer.current_epoch == 3
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 * 16  # one more epoch of 256 images / batch 16, not a fresh 3 epochs


def test_ckpt_alias_without_a_previous_run_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["test", *TINY, "--ckpt_path", "best"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "no checkpoint found for this experiment" in err and "Traceback" not in err


def test_print_config_shows_linked_and_default_values(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, "--print_config"])
    assert exit_.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["backbone"] == "test_resnet"
    assert cfg["checkpoint"]["monitor"] == "val/acc"


def test_repeated_configs_compose_and_dotted_overrides_win(tmp_path, capsys):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("model:\n  backbone: resnet10t\n  layer_decay: 0.5\ntrainer:\n  max_epochs: 5\n")
    b.write_text("model:\n  layer_decay: 0.7\n")
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(a), "-c", str(b), "--trainer.max_epochs", "1", "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["backbone"] == "resnet10t"  # from a.yaml
    assert cfg["model"]["layer_decay"] == 0.7  # b.yaml overrides a.yaml
    assert cfg["trainer"]["max_epochs"] == 1  # the command line overrides both


def test_python_m_lit_ft_runs_the_same_cli():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lit_ft", "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--model.backbone" in proc.stdout and "--model.freeze" in proc.stdout


# Every config a user can run: configs/experiments/_base.yaml is the shared recipe of the
# strategies beside it, not an experiment of its own; configs/sweeps/ holds search spaces for
# `lit-ft sweep` (checked against the recipe in tests/test_sweep.py).
CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml")
                 if not p.name.startswith("_") and "sweeps" not in p.relative_to(ROOT).parts)


def config_files(config: Path) -> list[Path]:
    """The files of a run, in order: a strategy in a folder with a ``_base.yaml`` is a delta on it."""
    base = ROOT / config.parent / "_base.yaml"
    return ([base] if base.is_file() else []) + [ROOT / config]


def config_args(config: Path) -> list[str]:
    return [arg for f in config_files(config) for arg in ("--config", str(f))]


def _uses_ddp(config: Path) -> bool:
    strategy = ""
    for f in config_files(config):  # the last file that sets it wins, as on the command line
        strategy = (yaml.safe_load(f.read_text()).get("trainer") or {}).get("strategy", strategy)
    return "ddp" in str(strategy)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_config_runs_with_fast_dev_run(config):
    # In-process here (one device: Lightning's DDP launcher would re-run pytest's argv); the DDP
    # configs also run as a user runs them in test_a_ddp_config_runs_from_the_command_line.
    one_device = ["--trainer.strategy", "auto", "--trainer.devices", "1"] if _uses_ddp(config) else []
    cli = main(
        ["fit", *config_args(config), "--trainer.fast_dev_run", "2", "--trainer.enable_progress_bar", "false", *one_device],
        return_cli=True,
    )
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 2
    # The run is named after the last config (the strategy), never after the shared base.
    assert cli.config["fit"]["trainer"]["logger"]["init_args"]["name"] == config.stem


def _leaves(tree: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}.{key}" if prefix else key).items()}


@pytest.mark.parametrize("config", [c for c in CONFIGS if len(config_files(c)) > 1], ids=str)
def test_a_strategy_config_holds_only_what_it_changes_in_the_base(config):
    base, delta = (_leaves(yaml.safe_load(f.read_text()) or {}) for f in config_files(config))
    restated = sorted(k for k, v in delta.items() if k in base and base[k] == v)
    assert not restated, f"{config} repeats {restated} from _base.yaml"


DDP_CONFIGS = [c for c in CONFIGS if _uses_ddp(c)]


@pytest.mark.slow
@pytest.mark.parametrize("config", DDP_CONFIGS, ids=str)
def test_a_ddp_config_runs_from_the_command_line(config, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(31000 + os.getpid() % 1000)}
    proc = subprocess.run(
        [sys.executable, "-m", "lit_ft", "fit", *config_args(config), "--trainer.max_steps", "3",
         "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2", "--data.init_args.train_subset", "640",
         "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (tmp_path / Path(config).stem).iterdir()  # named after the strategy
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    per_rank = yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]["batch_size"]  # as resolved
    # both processes trained (images seen = 3 steps x 2 ranks x batch), and the test ran
    assert acc.Scalars("budget/images_seen")[-1].value == 3 * 2 * per_rank
    assert "test/acc" in acc.Tags()["scalars"]


def test_a_lit_ft_checkpoint_is_a_weight_source_for_a_new_task():
    from lit_ft import backbones as B

    cli = fit()
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    model = B.create_backbone("test_resnet", num_classes=7, pretrained=str(ckpt))
    trained = {k[len("model."):]: v for k, v in cli.model.state_dict().items() if k.startswith("model.")}
    got = model.state_dict()
    assert all(torch.equal(got[k], trained[k]) for k in got if not k.startswith("fc."))
    assert got["fc.weight"].shape[0] == 7


def test_a_run_without_a_logger_never_writes_over_the_config_file_it_was_given(tmp_path, monkeypatch):
    # Without a logger the run directory is the working directory, where config.yaml is often
    # the user's own: it must stay byte for byte (comments, and no --trainer.logger false baked in).
    monkeypatch.chdir(tmp_path)
    mine = "# my config, with a comment\nmodel:\n  backbone: test_resnet\n  pretrained: false\n"
    Path("config.yaml").write_text(mine)
    with pytest.warns(UserWarning, match="not saving the resolved config to .*config.yaml: that is the config file you gave"):
        main(["test", "-c", "config.yaml", *TINY, "--trainer.logger", "false", "--trainer.limit_test_batches", "1"])
    assert Path("config.yaml").read_text() == mine
    # Under another name the resolved config is saved as before, beside it.
    Path("mine.yaml").write_text(mine)
    Path("config.yaml").unlink()
    main(["test", "-c", "mine.yaml", *TINY, "--trainer.logger", "false", "--trainer.limit_test_batches", "1"])
    assert Path("mine.yaml").read_text() == mine
    saved = yaml.safe_load(Path("config.yaml").read_text())
    assert saved["model"]["backbone"] == "test_resnet" and saved["trainer"]["logger"] is False
