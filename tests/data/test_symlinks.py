"""Symbolic links in image folders: a link loop or a second path to a folder or file never
duplicates images, and what was passed over is reported with a count and an example."""

from __future__ import annotations

import logging
import os

import pytest

from lit_ft.data import ImageFolderDataModule
from lit_ft.data.scan import list_files
from lit_ft.errors import UserError

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_link_loop_in_a_class_folder_lists_each_image_once_and_says_so(tmp_path, make_folder, caplog):
    train = make_folder(tmp_path / "train", {"cat": 6, "dog": 4})
    (train / "cat" / "more").mkdir()
    os.symlink("..", train / "cat" / "more" / "up")  # cat/more/up -> cat: a loop
    os.symlink(train, train / "dog" / "all")  # dog/all -> the split folder: other classes' images
    os.symlink(train / "dog" / "dog_000.png", train / "dog" / "again.png")  # a second path to one file
    dm = ImageFolderDataModule(train_dir=str(train), val_split=0, image_size=16)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.train_dataset) == 10  # not ~40x (os.walk followed the loop until the OS refused)
    assert sorted(dm.train_dataset.targets.tolist()) == [0] * 6 + [1] * 4  # no cat image labelled dog
    text = warnings_of(caplog)
    assert "2 folder(s) reached a second time" in text and "up is the same folder as" in text
    assert "1 file(s) reached a second time" in text and "again.png is the same file as" in text
    assert str(train / "dog" / "dog_000.png") in text


def test_a_link_loop_in_predict_dir_predicts_each_image_once(tmp_path, make_folder, caplog):
    root = make_folder(tmp_path / "imgs", {"a": 2, "b": 3})  # imgs/a/*.png, imgs/b/*.png, unlabeled here
    os.symlink("../..", root / "b" / "loop")  # imgs/b/loop -> tmp_path, which holds imgs
    dm = ImageFolderDataModule(predict_dir=str(root), image_size=16)
    with caplog.at_level(logging.WARNING):
        dm.setup("predict")
    ids = [dm.predict_dataset[i][1] for i in range(len(dm.predict_dataset))]
    assert sorted(ids) == ["a/a_000.png", "a/a_001.png", "b/b_000.png", "b/b_001.png", "b/b_002.png"]
    assert "1 folder(s) reached a second time" in warnings_of(caplog)


def test_list_files_without_links_reports_nothing(tmp_path, make_folder):
    make_folder(tmp_path, {"x": 3})
    listing = list_files(tmp_path, (".png",))
    assert len(listing.images) == 3 and listing.repeated_dirs == [] and listing.repeated_files == []


def test_two_class_folders_that_are_one_folder_are_refused(tmp_path, make_folder):
    train = make_folder(tmp_path / "train", {"cat": 2})
    os.symlink(train / "cat", train / "kitten")
    dm = ImageFolderDataModule(train_dir=str(train), image_size=16)
    with pytest.raises(UserError, match="class folders cat and kitten .* are the same folder"):
        dm.setup("fit")
