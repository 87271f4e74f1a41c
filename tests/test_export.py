"""lit-ft export: every format loads back and reproduces the model; a broken export is refused
and leaves nothing behind; int8 runs and reports; the README's inference examples work."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from lit_ft import ImageClassifier, UserError
from tests.cli_args import synthetic_run
from lit_ft import export as E
from lit_ft.callbacks.checkpointing import restore_weights
from lit_ft.cli import main
from lit_ft.data import SyntheticDataModule
from lit_ft.data.synthetic import generate
from tests.helpers import tiny_model

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"class_{i}" for i in range(4)]
TINY = synthetic_run("test_efficientnet", val_size=24)


def fit_run(root: Path, *extra: str) -> Path:
    """A 1-epoch tiny run in ``root``; its last.ckpt (absolute)."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cli = main(["fit", *TINY, "--trainer.max_epochs", "1", *extra], return_cli=True)
        return (root / cli.trainer.log_dir / "checkpoints" / "last.ckpt").resolve()
    finally:
        os.chdir(cwd)


def export(ckpt: Path, out: Path, *extra: str) -> None:
    main(["export", *TINY, "--ckpt_path", str(ckpt), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, one_thread) -> Path:
    return fit_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def exports(ckpt, tmp_path_factory):
    """``exports(fmt)``: the folder of one export of ``ckpt`` per format, made on first use."""
    root, made = tmp_path_factory.mktemp("exports"), {}

    def get(fmt: str) -> Path:
        if fmt not in made:
            export(ckpt, root / fmt, "--format", fmt)
            made[fmt] = root / fmt
        return made[fmt]

    return get


@pytest.fixture(scope="module")
def reference(ckpt):
    """The checkpoint's model, rebuilt without the export code, and 7 validation images
    preprocessed as it was trained."""
    model = ImageClassifier("test_efficientnet", num_classes=4, class_names=CLASSES)
    restore_weights(model, ckpt)
    model.eval()
    dm = SyntheticDataModule(num_classes=4, val_size=24, augment=False)
    dm.set_data_config(model.data_config)
    dm.setup("validate")
    x = torch.stack([dm.val_dataset[i][0] for i in range(7)])
    with torch.inference_mode():
        return model, x, model(x)


def load_independently(fmt: str, folder: Path):
    """The artefact loaded with its own runtime, as a user would (not via lit_ft.export)."""
    if fmt == "timm":
        net = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        return lambda x: net(x).detach()
    if fmt == "pt2":
        module = torch.export.load(str(folder / "model.pt2")).module()
        return lambda x: module(x).detach()
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])


# --------------------------------------------------------------------------- round trips


SLOW = pytest.mark.slow  # ONNX and torch.export tracing take 10-20 s each on a shared 2-core CPU


@pytest.mark.parametrize("fmt", ["timm", pytest.param("onnx", marks=SLOW), pytest.param("pt2", marks=SLOW)])
def test_each_format_loads_back_and_gives_the_models_logits_at_batch_1_and_3(fmt, exports, reference, ckpt):
    folder = exports(fmt)
    _, x, expected = reference
    run = load_independently(fmt, folder)
    with torch.inference_mode():
        one = torch.cat([run(x[i : i + 1]) for i in range(len(x))])
        three = torch.cat([run(b) for b in x.split(3)])  # 3, 3, 1: a dynamic batch dimension
    for got in (one, three):
        assert (got - expected).abs().max() < 1e-4
        assert torch.equal(got.argmax(-1), expected.argmax(-1))

    config = json.loads((folder / "config.json").read_text())
    trained = torch.load(ckpt, weights_only=True)["lit_ft"]["data_config"]
    assert config["architecture"] == "test_efficientnet" and config["label_names"] == CLASSES
    pre = config["pretrained_cfg"]
    assert pre["input_size"] == [3, 32, 32] and pre["num_classes"] == 4
    for key in ("mean", "std", "interpolation", "crop_pct", "crop_mode"):
        assert pre[key] == (list(trained[key]) if isinstance(trained[key], tuple) else trained[key]), key
    assert "temperature" in config["lit_ft"] and config["lit_ft"]["temperature"] is None
    assert config["lit_ft"]["input"]["name"] == "input" and config["lit_ft"]["input"]["layout"] == "NCHW"
    report = json.loads((folder / "export_report.json").read_text())
    check = report["checks"][0]
    assert check["passed"] and check["agreement"] == 1.0 and check["batch_sizes"] == [1, 8] and check["images"] == 24

    if fmt == "timm":  # the plain timm state_dict, bit for bit what the checkpoint holds
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        tensors = load_file(folder / "model.safetensors")
        assert set(tensors) == {k[len("model."):] for k in state if k.startswith("model.")}
        assert all(torch.equal(v, state["model." + k]) for k, v in tensors.items())
    if fmt == "onnx":
        import onnx

        proto = onnx.load(str(folder / "model.onnx"))
        assert proto.graph.input[0].name == "input"
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
        assert {o.domain: o.version for o in proto.opset_import}[""] == 20
        meta = {p.key: p.value for p in proto.metadata_props}
        assert json.loads(meta["class_names"]) == CLASSES and meta["layout"] == "NCHW"
        assert json.loads(meta["mean"]) == pre["mean"] and json.loads(meta["temperature"]) is None
        assert json.loads(meta["config"]) == config
    if fmt == "pt2":
        extra = {"config.json": ""}
        torch.export.load(str(folder / "model.pt2"), extra_files=extra)
        assert json.loads(extra["config.json"]) == config


def write_test_images(folder: Path) -> list[Path]:
    """The synthetic test split as PNG files, plus non-square versions (resize + crop path)."""
    folder.mkdir(parents=True)
    images, _ = generate(12, 4, "easy", seed=42, stream=12)
    paths = []
    for i, img in enumerate(images):
        pil = Image.fromarray(img)
        if i % 3 == 0:
            pil = pil.resize((44, 36))
        paths.append(folder / f"{i:02d}.png")
        pil.save(paths[-1])
    return paths


def predict_classes(ckpt: Path, folder: Path, out: Path) -> dict[str, str]:
    main([
        "predict", "--data", "lit_ft.data.ImageFolderDataModule", "--data.predict_dir", str(folder),
        "--ckpt_path", str(ckpt), "--prediction_writer.output", str(out), "--trainer.enable_progress_bar", "false",
    ])
    return {r["id"]: r["class"] for r in csv.DictReader(out.open())}


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker}:[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert m, f"README has no python block after <!-- {marker}: ... -->"
    return m.group(1)


def test_timm_one_liner_from_the_readme_matches_lit_ft_predict_for_every_test_image(ckpt, exports, tmp_path):
    folder = exports("timm")
    paths = write_test_images(tmp_path / "imgs")
    predicted = predict_classes(ckpt, tmp_path / "imgs", tmp_path / "p.csv")
    code = readme_block("export-example-timm")
    assert "lit_ft" not in code
    code = re.sub(r"^folder = .*$", f"folder = {str(folder)!r}", code, flags=re.M)
    for path in paths:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(re.sub(r"^image_file = .*$", f"image_file = {str(path)!r}", code, flags=re.M), {})
        assert out.getvalue().strip() == predicted[path.name], path.name


@pytest.mark.slow
def test_onnx_example_from_the_readme_runs_without_lit_ft_and_matches_predict(ckpt, exports, tmp_path):
    folder = exports("onnx")
    paths = write_test_images(tmp_path / "imgs")
    predicted = predict_classes(ckpt, tmp_path / "imgs", tmp_path / "p.csv")
    code = readme_block("export-example")
    code = re.sub(r"^folder = .*$", f"folder = {str(folder)!r}", code, flags=re.M)
    code = re.sub(r"^image_file = .*\n", "", code, flags=re.M)
    script = tmp_path / "example.py"
    script.write_text(
        "import sys\nfor image_file in sys.argv[1:]:\n" + textwrap.indent(code, "    ")
        + "assert not any(m.startswith(('lit_ft', 'torch')) for m in sys.modules), 'needs only numpy, PIL, onnxruntime'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # lit_ft not importable from here
    done = subprocess.run([sys.executable, str(script), *map(str, paths)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(paths)
    for path, line in zip(paths, lines):
        name, prob = line.split()
        assert name == predicted[path.name] and 0 < float(prob) <= 1, path.name


# --------------------------------------------------------------------------- refusals


def negate_head_timm(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    for k in ("classifier.weight", "classifier.bias"):
        tensors[k] = -tensors[k]
    save_file(tensors, folder / "model.safetensors")


def negate_head_onnx(folder: Path) -> None:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(folder / "model.onnx"))
    hits = 0
    for init in proto.graph.initializer:
        if init.name.startswith("classifier."):
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
            hits += 1
    assert hits == 2  # weight and bias
    onnx.save(proto, str(folder / "model.onnx"))


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")] if parent.exists() else []


@pytest.mark.parametrize("fmt,tamper", [("timm", negate_head_timm), pytest.param("onnx", negate_head_onnx, marks=SLOW)])
def test_a_tampered_weight_fails_verification_and_leaves_no_file(fmt, tamper, ckpt, tmp_path, monkeypatch, capsys):
    write = E.WRITERS[fmt]

    def write_then_tamper(net, folder, *args):
        files = write(net, folder, *args)
        tamper(folder)
        return files

    monkeypatch.setitem(E.WRITERS, fmt, write_then_tamper)
    out = tmp_path / "exports" / fmt
    with pytest.raises(SystemExit) as exit_:
        export(ckpt, out, "--format", fmt)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "export verification failed" in err and "top-1 agreement with the PyTorch model" in err
    assert "Traceback" not in err
    assert not out.exists() and leftovers(out.parent) == []


@pytest.mark.slow
def test_a_fixed_batch_dimension_is_refused(ckpt, tmp_path, monkeypatch, capsys):
    def fixed_batch(net, folder, config, example, opset):  # the exporter without dynamic_shapes
        torch.onnx.export(net, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
                          opset_version=opset, verbose=False).save(str(folder / "model.onnx"))
        return [folder / "model.onnx"]

    monkeypatch.setitem(E.WRITERS, "onnx", fixed_batch)
    out = tmp_path / "o"
    with pytest.raises(SystemExit):
        export(ckpt, out, "--format", "onnx")
    err = capsys.readouterr().err
    assert "batch dimension is fixed to 2, not dynamic" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_verify_reports_agreement_accuracies_and_a_batch_size_the_model_cannot_run():
    torch.manual_seed(0)
    reference = torch.randn(10, 4)
    labels = reference.argmax(-1)
    labels[:2] = (labels[:2] + 1) % 4  # PyTorch gets 8 / 10 right
    flipped = reference.clone()
    flipped[5] = -flipped[5]  # the export disagrees on image 5

    def run(x):  # images are their own row index here
        return flipped[x[:, 0].long()]

    images = torch.arange(10.0)[:, None]
    check = E.verify("m", run, images, reference, labels, batch_size=4, min_agreement=0.95)
    assert check.agreement == pytest.approx(0.9) and not check.passed
    assert check.accuracy_pytorch == pytest.approx(0.8) and check.accuracy_exported == pytest.approx(0.7)
    assert check.max_abs_diff == pytest.approx(float(2 * reference[5].abs().max()))

    def fixed(x):
        if len(x) != 4:
            raise RuntimeError("Got invalid dimensions for input: index 0 Got: 1 Expected: 4")
        return flipped[x[:, 0].long()]

    check = E.verify("m", fixed, images[:8], reference[:8], None, batch_size=4, min_agreement=0.0)
    assert not check.passed and "does not run at batch size 1" in check.failure and "not dynamic" in check.failure


def test_int8_is_judged_by_its_accuracy_loss_as_well_as_its_agreement():
    reference = torch.eye(4).repeat(25, 1)  # 100 images, 4 classes, PyTorch right on all of them
    labels = reference.argmax(-1)
    worse = reference.clone()
    worse[:2] = worse[:2].roll(1, dims=1)  # 2 images flip: 98% agreement, 2 points of accuracy lost
    images = torch.arange(100.0)[:, None]

    def run(x):
        return worse[x[:, 0].long()]

    check = E.verify("model_int8.onnx", run, images, reference, labels, 8, min_agreement=0.95, max_accuracy_drop=0.01)
    assert check.agreement == pytest.approx(0.98) and check.accuracy_drop == pytest.approx(0.02)
    assert not check.passed and "2.00 points lost > 1.00" in check.failure
    assert E.verify("model_int8.onnx", run, images, reference, labels, 8, 0.95, max_accuracy_drop=0.02).passed
    assert E.verify("model_int8.onnx", run, images, reference, None, 8, 0.95, max_accuracy_drop=0.01).passed  # no labels
    assert not E.verify("model_int8.onnx", run, images, reference, labels, 8, 0.99, max_accuracy_drop=0.05).passed


@torch.library.custom_op("litft_test::no_onnx", mutates_args=())
def _no_onnx(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_no_onnx.register_fake
def _(x):
    return torch.empty_like(x)


class NoOnnxAct(torch.nn.Module):
    """An activation whose operator ONNX has no translation for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(_no_onnx(x))


@pytest.mark.slow
def test_a_backbone_the_exporter_cannot_handle_is_refused_naming_the_operator(tmp_path):
    model = tiny_model("test_resnet")
    model.model.act1 = NoOnnxAct()
    with pytest.raises(UserError, match=r"cannot export test_resnet to onnx: no ONNX translation for the operator litft_test\.no_onnx"):
        E.export(model, "onnx", tmp_path / "o", images=torch.randn(4, 3, 32, 32))
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_an_unknown_format_is_a_choice_error(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export(ckpt, tmp_path / "o", "--format", "tflite")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "tflite" in err and "timm" in err and "onnx" in err and "pt2" in err and "Traceback" not in err


def test_an_existing_folder_is_refused_without_overwrite_and_replaced_with_it(ckpt, exports, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        export(ckpt, out, "--format", "timm")
    err = capsys.readouterr().err
    assert f"the export folder {out} already exists" in err and "--overwrite true" in err
    with pytest.raises(SystemExit):  # --overwrite never deletes a folder that is not an export
        export(ckpt, out, "--format", "timm", "--overwrite", "true")
    assert "not a lit-ft export folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    earlier = exports("timm")
    mine = tmp_path / "earlier"
    mine.mkdir()
    for p in earlier.iterdir():
        (mine / p.name).write_bytes(p.read_bytes())
    (mine / "stale.txt").write_text("from before")
    export(ckpt, mine, "--format", "timm", "--overwrite", "true")
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "export_report.json", "model.safetensors"]
    assert leftovers(tmp_path) == []


def test_a_missing_optional_dependency_names_the_extra(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with pytest.raises(SystemExit) as exit_:
        export(ckpt, tmp_path / "o", "--format", "onnx")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "needs the Python package onnxruntime, which is not installed" in err
    assert "pip install 'lit-ft[export]'" in err and not (tmp_path / "o").exists()


def test_int8_needs_onnx_and_export_needs_a_checkpoint(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        export(ckpt, tmp_path / "o", "--format", "timm", "--int8", "true")
    assert "--int8 quantizes ONNX models, not timm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", *TINY, "--format", "timm", "--out", str(tmp_path / "o")])
    assert "lit-ft export needs a trained checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- int8, EMA, temperature


@pytest.mark.slow
def test_int8_export_runs_and_reports_agreement_size_and_latency_beside_fp32(ckpt, tmp_path, capsys):
    import onnx

    out = tmp_path / "o"
    export(ckpt, out, "--format", "onnx", "--int8", "true", "--int8_min_agreement", "0", "--int8_max_accuracy_drop", "1",
           "--latency_runs", "1", "--calibration_images", "64")  # 4 batches of 16, merged
    stdout = capsys.readouterr().out
    report = json.loads((out / "export_report.json").read_text())
    fp32, int8 = report["checks"]
    assert fp32["artefact"] == "model.onnx" and fp32["agreement"] == 1.0
    assert int8["artefact"] == "model_int8.onnx" and 0 <= int8["agreement"] <= 1 and int8["passed"]
    assert int8["max_abs_diff"] > 0  # really quantized: not the fp32 numbers
    assert f"{100 * int8['agreement']:.2f}%" in stdout
    ops = {n.op_type for n in onnx.load(str(out / "model_int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert report["files"]["model_int8.onnx"] < report["files"]["model.onnx"]
    assert set(report["latency_ms"]) == {"PyTorch fp32", "ONNX Runtime fp32", "ONNX Runtime int8"}
    assert all(set(v) == {"1", "32"} and min(v.values()) > 0 for v in report["latency_ms"].values())
    assert "ONNX Runtime int8" in stdout and "batch 32" in stdout
    meta = {p.key: p.value for p in onnx.load(str(out / "model_int8.onnx")).metadata_props}
    assert "64 training images" in meta["quantization"] and json.loads(meta["class_names"]) == CLASSES


@pytest.mark.slow
def test_an_ema_checkpoint_exports_its_averaged_weights(tmp_path, one_thread):
    cfg = tmp_path / "ema.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lit_ft.callbacks.EMA", "init_args": {"decay": 0.9}}]}}))
    ckpt = fit_run(tmp_path, "-c", str(cfg))
    export(ckpt, tmp_path / "o", "--format", "timm")
    saved = torch.load(ckpt, weights_only=True)
    average, live = saved["state_dict"], saved["callbacks"]["EMA"]["live_state_dict"]
    tensors = load_file(tmp_path / "o" / "model.safetensors")
    assert all(torch.equal(v, average["model." + k]) for k, v in tensors.items())
    live = {k.removeprefix("model."): v for k, v in live.items()}
    assert any(not torch.equal(v, live[k]) for k, v in tensors.items() if v.is_floating_point())


def test_the_checkpoints_temperature_travels_in_config_json(ckpt, tmp_path):
    saved = torch.load(ckpt, weights_only=True)
    saved["lit_ft"]["temperature"] = 1.5
    calibrated = tmp_path / "calibrated.ckpt"
    torch.save(saved, calibrated)
    export(calibrated, tmp_path / "o", "--format", "timm")
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["lit_ft"]["temperature"] == 1.5
    assert config["lit_ft"]["source_checkpoint"] == str(calibrated)


def test_default_output_folder_sits_in_the_run_beside_its_checkpoints():
    run = Path("runs/x/version_3")
    assert E.default_out(run / "checkpoints" / "best-epoch01.ckpt", "onnx", True) == run / "export" / "best-epoch01-onnx-int8"
    assert E.default_out(Path("/m/model.ckpt"), "timm", False) == Path("/m/model-timm")


def test_a_runs_saved_config_and_a_folder_of_images_drive_the_export(ckpt, tmp_path):
    run = ckpt.parent.parent
    folder = tmp_path / "imgs"
    images, labels = generate(10, 4, "easy", seed=7, stream=3)
    for i, (img, label) in enumerate(zip(images, labels)):
        (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / CLASSES[label] / f"{i}.png")
    Image.fromarray(images[0]).save(folder / "loose.png")  # outside a class folder: no label
    main(["export", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt), "--format", "timm",
          "--out", str(tmp_path / "o"), "--images", str(folder / CLASSES[0]), "--batch_size", "2"])
    check = json.loads((tmp_path / "o" / "export_report.json").read_text())["checks"][0]
    assert check["images"] == int((labels == 0).sum()) and check["accuracy_pytorch"] is None  # no class subfolders

    main(["export", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt), "--format", "timm",
          "--out", str(tmp_path / "o2"), "--images", str(folder), "--batch_size", "4"])
    check = json.loads((tmp_path / "o2" / "export_report.json").read_text())["checks"][0]
    assert check["images"] == 11 and check["batch_sizes"] == [1, 4]
    assert check["accuracy_pytorch"] is None  # one unlabelled image: accuracy is not claimed

    (folder / "loose.png").unlink()
    main(["export", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt), "--format", "timm",
          "--out", str(tmp_path / "o3"), "--images", str(folder)])
    check = json.loads((tmp_path / "o3" / "export_report.json").read_text())["checks"][0]
    assert check["images"] == 10 and check["accuracy_pytorch"] == check["accuracy_exported"] > 0.25
