"""A real TensorBoard server over a short run's log dir, queried through its HTTP API."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from lit_ft.callbacks.throughput import TAG as THROUGHPUT_TAG
from lit_ft.cli import main
from tests.test_cli import TINY

TIMEOUT_S = 60


def _get(base: str, path: str, body: dict | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    request = urllib.request.Request(base + path, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def _json(base: str, path: str, body: dict | None = None):
    return json.loads(_get(base, path, body))


def _wait_for(what: str, check, deadline: float):
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (urllib.error.URLError, ConnectionError, OSError, ValueError) as err:
            last = err
        time.sleep(0.3)
    pytest.fail(f"TensorBoard: {what} not ready within {TIMEOUT_S}s (last error: {last!r})")


@pytest.fixture
def tensorboard(tmp_path):
    """Start ``tensorboard --logdir runs --host 127.0.0.1 --port 0`` and yield its base URL."""
    procs = []

    def start(logdir: Path) -> str:
        err_path = tmp_path / "tensorboard.err"
        err = err_path.open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
             "--port", "0", "--load_fast", "false", "--reload_interval", "0"],  # port 0: the OS picks a free one
            stdout=subprocess.DEVNULL, stderr=err,
        )
        procs.append((proc, err))
        deadline = time.monotonic() + TIMEOUT_S

        def port():
            assert proc.poll() is None, f"tensorboard exited: {err_path.read_text()}"
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", err_path.read_text())
            return found and found.group(1)

        base = f"http://127.0.0.1:{_wait_for('port', port, deadline)}"
        _wait_for("plugins listing", lambda: _json(base, "/data/plugins_listing"), deadline)
        _wait_for("scalars", lambda: _json(base, "/data/plugin/scalars/tags"), deadline)  # first load done
        return base

    yield start
    for proc, err in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        err.close()


def test_tensorboard_serves_scalars_images_text_and_hparams_of_a_run(tensorboard):
    cli = main(["fit", *TINY, "--trainer.max_epochs", "2", "--data.train_size", "32", "--data.val_size", "32",
                "--data.difficulty", "random", "--trainer.log_every_n_steps", "1", "--throughput.window_size", "2"],
               return_cli=True)
    groups = [g.name for g in cli.model.groups]
    base = tensorboard(Path("runs"))
    run = "default/version_0"

    listing = _json(base, "/data/plugins_listing")
    assert all(listing[p]["enabled"] for p in ("scalars", "images", "text", "hparams"))

    scalars = _json(base, "/data/plugin/scalars/tags")[run]
    expected = {f"lr/{g}" for g in groups} | {
        "trainable_params", "train/loss", "val/loss", "val/acc", "val/f1", THROUGHPUT_TAG, "budget/images_seen", "hp/val/acc",
    }
    assert expected <= set(scalars), sorted(scalars)
    series = _json(base, "/data/plugin/scalars/scalars?" + urllib.parse.urlencode({"run": run, "tag": f"lr/{groups[0]}"}))
    assert len(series) == 4  # 2 epochs x 2 steps, one point per step

    images = _json(base, "/data/plugin/images/tags")[run]
    assert {"val/confusion_matrix", "val/misclassified", "train/inputs"} <= set(images)
    entries = _json(base, "/data/plugin/images/images?" + urllib.parse.urlencode(
        {"run": run, "tag": "val/confusion_matrix", "sample": 0}))
    assert len(entries) == 2  # one per epoch
    png = Image.open(io.BytesIO(_get(base, "/data/plugin/images/individualImage?" + entries[-1]["query"])))
    assert png.format == "PNG" and min(png.size) > 200

    texts = _json(base, "/data/plugin/text/tags")[run]
    config_tag = next(t for t in texts if t.startswith("lit-ft/config"))
    assert any(t.startswith("lit-ft/plan") for t in texts)
    config = _json(base, "/data/plugin/text/text?" + urllib.parse.urlencode({"run": run, "tag": config_tag}))
    assert "backbone: test_resnet" in config[0]["text"] and "SyntheticDataModule" in config[0]["text"]

    experiment = _json(base, "/data/plugin/hparams/experiment", {"experimentName": ""})
    hparams = {h["name"] for h in experiment["hparamInfos"]}
    metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"model.backbone", "model.optimizer.lr", "data", "trainer.max_epochs"} <= hparams
    assert {"hp/val/acc", "hp/val/loss", "hp/best/val/acc"} <= metrics
    groups_ = _json(base, "/data/plugin/hparams/session_groups", {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [{"hparam": "model.backbone", "includeInResult": True},
                      {"metric": {"tag": "hp/val/acc", "group": ""}, "includeInResult": True}],
        "startIndex": 0, "sliceSize": 10,
    })["sessionGroups"]
    assert [g["name"] for g in groups_] == [run]
    assert groups_[0]["hparams"]["model.backbone"] == "test_resnet"
    value = {m["name"]["tag"]: m["value"] for m in groups_[0]["metricValues"]}["hp/val/acc"]
    assert value == pytest.approx(float(cli.trainer.callback_metrics["val/acc"]))
