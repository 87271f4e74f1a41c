"""``lit-ft predict`` writes its CSV whatever the file names: UTF-8, with undecodable bytes escaped."""

from __future__ import annotations

import csv
import logging
import os
import sys

import pytest
from PIL import Image

from lit_ft.callbacks.predictions import csv_text
from lit_ft.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="the file system must accept any bytes in a name")
def test_predict_writes_a_non_utf8_file_name_with_escapes(tmp_path, caplog):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(os.fsencode(imgs) + b"/bad\xff\xfe name.png")
    Image.new("RGB", (20, 20), (30, 200, 30)).save(imgs / "café.png")
    Image.new("RGB", (20, 20), (30, 30, 200)).save(imgs / "ok.png")
    out = tmp_path / "p.csv"
    with caplog.at_level(logging.WARNING):
        main([
            "predict", "--model.backbone", "test_resnet", "--model.pretrained", "false",
            "--data", "lit_ft.data.ImageFolderDataModule", "--data.predict_dir", str(imgs),
            "--data.class_names", "[a, b]", "--data.image_size", "32",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--prediction_writer.output", str(out),
        ])
    rows = list(csv.DictReader(out.open(encoding="utf-8")))  # strict UTF-8: the whole file decodes
    assert sorted(r["id"] for r in rows) == ["bad\\xff\\xfe name.png", "café.png", "ok.png"]
    assert all(r["class"] in ("a", "b") for r in rows)
    assert "1 file name(s) are not valid UTF-8" in caplog.text and "bad\\xff\\xfe name.png" in caplog.text


def test_csv_text_keeps_valid_names_and_escapes_only_undecodable_bytes():
    assert csv_text("sub/café.png") == "sub/café.png"
    assert csv_text(os.fsdecode(b"a\xe9b.png")) == "a\\xe9b.png"  # Latin-1 "é": one escaped byte
    assert csv_text("\ud800x") == "\\ud800x"  # a lone surrogate that is no escaped byte
    assert csv_text(3) == 3
