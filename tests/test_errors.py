"""Bad input through the CLI, as a user meets it: one message naming the problem and the fix,
exit status 2, no traceback. Also bad image files under both policies, NaN losses, and weight
files that would run code when unpickled."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lit_ft import ImageClassifier
from lit_ft.cli import main
from tests.bad_files import BAD_FILES, safetensors_bytes
from tests.cli_args import QUIET, synthetic_run

ROOT = Path(__file__).resolve().parents[1]
SYNTH = synthetic_run(batch_size=8, train_size=32, val_size=8, test_size=8)
FOLDER = ["--model.backbone", "test_resnet", "--data", "lit_ft.data.ImageFolderDataModule", "--data.image_size", "32", *QUIET]


pytestmark = pytest.mark.usefixtures("one_thread")


def fails(args: list[str], capsys) -> str:
    """Run the CLI expecting a user error; return its stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and "usage:" not in err, err
    assert err.count("lit-ft: error:") == 1, err
    return err


def png(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def image_folder(root: Path, classes=("cat", "dog"), n: int = 3) -> Path:
    for c, name in enumerate(classes):
        for i in range(n):
            png(root / name / f"{i}.png", Image.new("RGB", (16, 16), (80 * c, 40 * i, 200)))
    return root


# --------------------------------------------------------------------------- config


def test_unknown_backbone_suggests_the_closest_timm_names(capsys):
    err = fails(["fit", *SYNTH, "--model.backbone", "resnet_18"], capsys)
    assert "unknown timm backbone 'resnet_18'" in err
    assert "did you mean resnet18" in err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model.dropout", "0.1"], ["unknown option --model.dropout", "did you mean --model.drop_rate?"]),
        (["--model.learning_rate", "0.1"], ["unknown option --model.learning_rate", "--model.optimizer.lr"]),
        (["--data.train_sizee", "8"], ["SyntheticDataModule (data) has no option 'train_sizee'", "data.train_size"]),
        (["--model.optimizer", "torch.optim.SGD", "--model.optimizer.lrr", "0.1"], ["SGD (model.optimizer) has no option 'lrr'", "model.optimizer.lr"]),
        (["--model.freeze", "lit_ft.schedules.Gradul"], ["no 'Gradul' in lit_ft.schedules", "lit_ft.schedules.Gradual"]),
        (["--model.drop_rate", "high"], ["model.drop_rate: expected a number in [0, 1], got 'high'"]),
        (["--model.label_smoothing", "1.5"], ["model.label_smoothing: expected a number in [0, 1], got '1.5'"]),
        (["--model.cache_views", "-1"], ["model.cache_views: expected an integer >= 0, got '-1'"]),
        (["--trainer.max_epochs", "abc"], ["trainer.max_epochs: expected int or None, got 'abc'"]),
        (["--model.scheduler_interval", "epochs"], ["'epochs' is not one of step, epoch", "did you mean 'epoch'"]),
    ],
    ids=["option", "lr", "data-option", "optimizer-option", "class-path", "float", "range", "nonnegative", "int", "choice"],
)
def test_unknown_option_or_wrong_type_names_the_key_and_the_fix(extra, expected, capsys):
    err = fails(["fit", *SYNTH, *extra], capsys)
    for text in expected:
        assert text in err


def test_unknown_key_in_a_config_file_is_named_with_the_closest_valid_key(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("model:\n  backbone: test_resnet\n  drop_rat: 0.1\n")
    err = fails(["fit", "-c", str(cfg), *SYNTH], capsys)
    assert "unknown config key 'model.drop_rat'" in err and "did you mean model.drop_rate," in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "model:\n  backbone: test_resnet\n\tdrop_rate: 0.1\n",
            ["line 3, column 1: found a tab character that violates indentation (while scanning a plain scalar at line 2, column 13)",
             "line 3: '\\tdrop_rate: 0.1'", "HINT: YAML indents with spaces only: replace the tab(s) in line 3 with spaces"],
        ),
        (
            "model:\n  backbone: test_resnet\n  drop_rate: [0.1\n",
            ["line 4, column 1: did not find expected ',' or ']' (while parsing a flow sequence at line 3, column 14)",
             "line 3: '  drop_rate: [0.1'", "HINT: fix the YAML syntax near line 4"],
        ),
    ],
    ids=["tab", "unclosed-list"],
)
def test_a_yaml_syntax_error_names_the_file_line_column_and_problem(tmp_path, text, expected, capsys):
    cfg = tmp_path / "configs" / "exp.yaml"
    cfg.parent.mkdir()
    cfg.write_text(text)
    err = fails(["fit", "--config", "configs/exp.yaml", *SYNTH], capsys)  # relative to the cwd (tmp_path)
    assert f"lit-ft: error: config file {cfg}, " in err
    for part in expected:
        assert part in err


# --------------------------------------------------------------------------- data


def test_dataset_path_that_does_not_exist(tmp_path, capsys):
    err = fails(["fit", *FOLDER, "--data.train_dir", str(tmp_path / "nope")], capsys)
    assert f"train_dir {tmp_path / 'nope'} does not exist" in err and "HINT: check the path" in err


def test_folder_with_no_images(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    err = fails(["fit", *FOLDER, "--data.train_dir", str(tmp_path / "train")], capsys)
    assert "no class subfolders" in err and "(it is empty)" in err and "<folder>/<class name>/<image>" in err


def test_empty_class_folder_is_found_inside_fit(tmp_path, capsys):
    # Classes are listed when the datamodule is built, images only in setup() inside trainer.fit:
    # an error raised there must still end as one message.
    root = image_folder(tmp_path / "train")
    (root / "zebra").mkdir()
    (root / "zebra" / "notes.txt").write_text("not an image")
    err = fails(["fit", *FOLDER, "--data.train_dir", str(root)], capsys)
    assert f"class folder {root / 'zebra'} has no images (only 1 non-image files)" in err


def test_train_and_val_with_different_class_sets(tmp_path, capsys):
    train = image_folder(tmp_path / "train", ("cat", "dog"))
    val = image_folder(tmp_path / "val", ("cat", "bird"))
    err = fails(["fit", *FOLDER, "--data.train_dir", str(train), "--data.val_dir", str(val)], capsys)
    assert f"val_dir {val} lacks dog and has extra bird" in err and "same class subfolders" in err


def test_a_single_class_is_a_clear_error(tmp_path, capsys):
    err = fails(["fit", *FOLDER, "--data.train_dir", str(image_folder(tmp_path / "train", ("cat",)))], capsys)
    assert "only one class (cat)" in err


# --------------------------------------------------------------------------- weights and checkpoints


def test_weights_of_another_architecture_are_refused(tmp_path, capsys):
    import timm

    path = tmp_path / "other.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=4).state_dict(), str(path))
    err = fails(["fit", *SYNTH, "--model.pretrained", str(path)], capsys)
    assert str(path) in err and "do not fit the model" in err and "check `backbone`" in err


def _lit_ft_checkpoint(path: Path, num_classes: int) -> Path:
    """A checkpoint as `lit-ft fit` writes it (hparams + state dict), without training."""
    model = ImageClassifier("test_resnet", num_classes=num_classes, class_names=[f"class_{i}" for i in range(num_classes)])
    hparams = {"backbone": "test_resnet", "num_classes": num_classes, "class_names": model.class_names}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.0"}, path)
    return path


def test_checkpoint_of_other_classes_is_refused_before_loading(tmp_path, capsys):
    ckpt = _lit_ft_checkpoint(tmp_path / "four.ckpt", num_classes=4)
    err = fails(["test", *SYNTH, "--data.num_classes", "3", "--ckpt_path", str(ckpt)], capsys)
    assert "was trained on 4 classes (class_0, class_1, class_2, class_3) but the data has 3 classes" in err
    assert "--model.pretrained" in err


def test_checkpoint_whose_shapes_do_not_fit_is_refused(tmp_path, capsys):
    ckpt = _lit_ft_checkpoint(tmp_path / "four.ckpt", num_classes=4)
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"].pop("class_names")  # e.g. a checkpoint of another tool
    state["state_dict"]["model.fc.weight"] = torch.zeros(4, 7)
    torch.save(state, ckpt)
    err = fails(["validate", *SYNTH, "--data.num_classes", "4", "--ckpt_path", str(ckpt)], capsys)
    assert "does not fit the model: 1 tensor(s) of another shape, e.g. model.fc.weight: checkpoint (4, 7)" in err


class _Payload:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("option", ["--model.pretrained", "--ckpt_path"])
def test_a_pickle_with_a_code_payload_is_refused(tmp_path, option, capsys):
    marker = tmp_path / "payload_ran"
    path = tmp_path / ("evil.pth" if option == "--model.pretrained" else "evil.ckpt")
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "hyper_parameters": {}, "x": _Payload(str(marker))}, path)
    err = fails(["fit", *SYNTH, option, str(path)], capsys)
    assert f"refusing to load {path}: it needs arbitrary code to unpickle" in err
    assert not marker.exists()  # the payload never ran


@pytest.mark.parametrize("kind", ["html", "git-lfs", "text", "empty", "truncated-zip"])
def test_weights_that_are_not_weights_are_named_for_what_they_are(tmp_path, kind, capsys):
    content, expected = BAD_FILES[kind]
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    err = fails(["fit", *SYNTH, "--model.pretrained", str(path)], capsys)
    assert f"lit-ft: error: weights file {path} {expected}" in err and "HINT: " in err
    assert "arbitrary code" not in err


@pytest.mark.parametrize("kind", ["html", "git-lfs", "text", "empty", "truncated-zip", "zip", "safetensors"])
def test_a_ckpt_path_that_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path, kind, capsys):
    content, expected = BAD_FILES.get(kind) or (safetensors_bytes(), "is a safetensors file: weights only, no training state")
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    err = fails(["test", *SYNTH, "--ckpt_path", str(path)], capsys)
    assert f"lit-ft: error: checkpoint {path} {expected}" in err and "HINT: " in err


def test_safetensors_weights_load_through_the_cli(tmp_path):
    torch.manual_seed(1)
    source = ImageClassifier("test_resnet", num_classes=4).model.state_dict()
    path = tmp_path / "w.safetensors"
    save_file(source, str(path))
    cli = main(["validate", *SYNTH, "--model.pretrained", str(path), "--trainer.logger", "false"], return_cli=True)
    got = cli.model.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in source.items() if not k.startswith("fc."))


# --------------------------------------------------------------------------- plans and LR groups


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model.freeze", "lit_ft.schedules.Surgical", "--model.freeze.groups", "[layer9]"], "no layer group 'layer9' in this model"),
        (["--model.freeze", "lit_ft.schedules.Milestones", "--model.freeze.milestones", "{1: [blocks.3]}"], "no layer group 'blocks.3'"),
        (["--model.lr_mult", "{blocks.9: 0.1}"], "no layer group 'blocks.9' in this model"),
        (["--model.lr_mult", "{head: 0}"], "lr_mult for group 'head' must be a positive number, got 0"),
        (["--model.lr_mult", "{layer1: -0.5}"], "lr_mult for group 'layer1' must be a positive number, got -0.5"),
        (["--model.layer_decay", "0"], "layer_decay must be in (0, 1], got 0"),
    ],
    ids=["surgical", "milestones", "lr-group", "zero-scale", "negative-scale", "layer-decay"],
)
def test_freeze_plan_and_lr_groups_must_exist_and_scales_be_positive(extra, expected, capsys):
    err = fails(["fit", *SYNTH, *extra], capsys)
    assert expected in err
    if "group" in expected and "lr_mult" not in expected:
        assert "use a name from [stem, layer1, layer2, layer3, layer4, head]" in err


# --------------------------------------------------------------------------- NaN / Inf


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(capsys):
    # lr x 1e5 per epoch: epoch 0 trains normally, epoch 1 or 2 blows up.
    err = fails(
        [
            "fit", *SYNTH, "--trainer.max_epochs", "4",
            "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.05",
            "--model.lr_scheduler", "torch.optim.lr_scheduler.ExponentialLR", "--model.lr_scheduler.gamma", "1e5",
            "--model.scheduler_interval", "epoch",
        ],
        capsys,
    )
    assert "NaN" in err or "Inf" in err
    assert "global step" in err and "gradient_clip_val" in err
    last = Path("runs/default/version_0/checkpoints/last.ckpt")
    assert f"the last good checkpoint is {last}" in err
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4  # the end of epoch 0 (4 batches), before anything went wrong
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_nan_loss_on_the_first_steps_says_there_is_no_checkpoint(capsys):
    err = fails(["fit", *SYNTH, "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "1e6"], capsys)
    assert "the training loss became NaN at global step" in err and "(epoch 0, batch" in err
    assert "no checkpoint was written before that" in err
    assert not list(Path("runs").rglob("*.ckpt"))


# --------------------------------------------------------------------------- bad image files


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """Good RGB images, 4 unreadable files, 1 non-image file, and every awkward PIL mode."""
    root = image_folder(tmp_path / "train", ("cat", "dog"), n=4)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (root / "cat" / "zero.png").write_bytes(b"")
    (root / "dog" / "notes.jpg").write_text("a text file with an image extension")
    (root / "dog" / "README.txt").write_text("ignored: not an image extension")
    png(root / "dog" / "gray.png", Image.new("L", (20, 12), 77))
    png(root / "dog" / "rgba.png", Image.new("RGBA", (12, 20), (10, 20, 30, 128)))
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] * 128)
    png(root / "cat" / "palette.png", palette)
    png(root / "cat" / "sixteen.png", Image.fromarray(np.full((16, 16), 40000, np.uint16)))
    return root


def test_bad_image_policy_error_names_the_first_bad_file(messy_folder, capsys):
    err = fails(["fit", *FOLDER, "--data.train_dir", str(messy_folder), "--data.bad_images", "error"], capsys)
    assert f"cannot read image {messy_folder / 'cat' / 'corrupt.png'}" in err
    assert "bad_images: skip" in err


def test_bad_image_policy_skip_trains_on_the_rest_and_counts_what_it_skipped(messy_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="lit_ft"):
        cli = main(
            ["fit", *FOLDER, "--data.train_dir", str(messy_folder), "--data.bad_images", "skip",
             "--data.batch_size", "4", "--trainer.fast_dev_run", "1"],
            return_cli=True,
        )
    assert cli.trainer.state.finished
    dm = cli.datamodule
    assert dm.skipped_files["train"] == 4 and dm.ignored_files["train"] == 1
    assert "skipped 4 unreadable image file(s) of 16" in caplog.text
    assert "truncated.jpg" in caplog.text and "zero.png" in caplog.text
    # Every mode (L, RGBA, P, I;16) arrives as a 3-channel float image of the right size.
    images = [dm.train_dataset[i][0] for i in range(len(dm.train_dataset))] + [dm.val_dataset[i][0] for i in range(len(dm.val_dataset))]
    assert len(images) == 12
    assert all(x.shape == (3, 32, 32) and torch.isfinite(x).all() for x in images)


# --------------------------------------------------------------------------- a real process


@pytest.mark.parametrize(
    ("extra", "expected"),
    [(["--model.backbone", "resnet_18"], "unknown timm backbone 'resnet_18'"), (["--model.dropout", "0.1"], "unknown option --model.dropout")],
    ids=["backbone", "option"],
)
def test_python_m_lit_ft_exits_2_with_one_message(extra, expected):
    proc = subprocess.run(
        [sys.executable, "-m", "lit_ft", "fit", *SYNTH, *extra],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert expected in proc.stderr and "HINT:" in proc.stderr
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr
