"""ImageFolderDataModule: layout, splits, error messages, bad files, predict_dir."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from lit_ft.data import ImageFolderDataModule
from lit_ft.errors import UserError

# identity eval transform for 16x16 images: same size, nearest, no crop, no normalisation
RAW = dict(image_size=16, crop_pct=1.0, interpolation="nearest", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def test_classes_known_after_init_and_val_split_is_stratified(tmp_path, make_folder):
    make_folder(tmp_path / "train", {"cat": 10, "dog": 10, "emu": 10})
    dm = ImageFolderDataModule(train_dir=str(tmp_path / "train"), val_split=0.2, image_size=16, batch_size=4)
    assert dm.class_names == ["cat", "dog", "emu"] and dm.num_classes == 3
    dm.setup("fit")
    assert len(dm.train_dataset) == 24 and len(dm.val_dataset) == 6
    assert np.bincount(dm.val_dataset.targets).tolist() == [2, 2, 2]
    assert not set(dm.train_dataset.indices) & set(dm.val_dataset.indices)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_explicit_val_and_test_dirs(tmp_path, make_folder):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        make_folder(tmp_path / split, {"a": n, "b": n})
    dm = ImageFolderDataModule(
        train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"), test_dir=str(tmp_path / "test"), **RAW
    )
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (8, 4, 6)
    x, y = next(iter(dm.test_dataloader()))
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    # class 0 folder holds red images (COLOURS[0]) and the eval transform is the identity here
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([200, 30, 30]) / 255.0)


def test_class_mismatch_names_the_classes(tmp_path, make_folder):
    make_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    make_folder(tmp_path / "val", {"cat": 2, "dgo": 2})
    with pytest.raises(UserError) as err:
        ImageFolderDataModule(train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"))
    msg = str(err.value)
    assert "lacks dog" in msg and "has extra dgo" in msg and str(tmp_path / "val") in msg
    assert "same class subfolders" in err.value.hint


def test_missing_path_and_no_class_folders(tmp_path):
    with pytest.raises(UserError, match="train_dir .*nope does not exist"):
        ImageFolderDataModule(train_dir=str(tmp_path / "nope"))
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(UserError, match="no class subfolders .* 1 files but no subfolders") as err:
        ImageFolderDataModule(train_dir=str(tmp_path / "flat"))
    assert "predict_dir" in err.value.hint
    with pytest.raises(UserError, match="got no folders"):
        ImageFolderDataModule()


def test_empty_class_folder_is_named(tmp_path, make_folder):
    make_folder(tmp_path / "train", {"cat": 3})
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "dog" / "notes.txt").write_text("x")
    dm = ImageFolderDataModule(train_dir=str(tmp_path / "train"))
    with pytest.raises(UserError, match=r"class folder .*dog has no images \(only 1 non-image files\)"):
        dm.setup("fit")


@pytest.fixture
def messy(tmp_path, make_folder, noise_png):
    """Two classes of good images of every mode plus one bad file of each kind."""
    root = make_folder(tmp_path / "train", {"good": 2, "odd": 0})
    odd = root / "odd"
    Image.new("L", (16, 16), 128).save(odd / "gray.png")
    Image.new("RGBA", (16, 16), (0, 0, 255, 0)).save(odd / "rgba.png")
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    pal.save(odd / "palette.gif")
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(odd / "deep16.png")
    Image.fromarray(np.full((16, 16), 257 * 64, np.uint16)).save(odd / "deep16_dim.tif")
    jpg = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(jpg, "JPEG")
    (odd / "photo.JPG").write_bytes(jpg.getvalue())  # upper-case extension still counts
    bad = {
        "good/a_zero.png": b"",
        "good/b_truncated.png": noise_png()[:-700],
        "odd/corrupt.png": noise_png()[:50] + bytes(range(256)) * 8,
        "odd/not_really.jpg": b"<html>404 not found</html>",
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    (root / "odd" / "readme.txt").write_text("ignored")
    (root / "good" / ".DS_Store").write_bytes(b"\x00")  # hidden: not even counted
    return root, sorted(bad)


def test_bad_images_error_names_the_first_bad_file(messy):
    root, bad = messy
    dm = ImageFolderDataModule(train_dir=str(root))
    with pytest.raises(UserError) as err:
        dm.setup("fit")
    assert str(root / bad[0]) in err.value.problem  # good/a_zero.png, first in sorted order
    assert "bad_images: skip" in err.value.hint


def test_bad_images_skip_counts_exactly_the_bad_ones_and_loads_every_mode(messy, caplog):
    root, bad = messy
    dm = ImageFolderDataModule(train_dir=str(root), bad_images="skip", val_split=0, augment=False, batch_size=32, **RAW)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert dm.skipped_files == {"train": len(bad)}
    assert dm.ignored_files == {"train": 1}
    skip_logs = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skip_logs) == 1 and f"skipped {len(bad)} unreadable" in skip_logs[0] and "a_zero.png" in skip_logs[0]
    assert any("readme.txt" in r.getMessage() for r in caplog.records)

    ids = [p.relative_to(root).as_posix() for p in dm.train_dataset.source.paths]
    assert ids == ["good/good_000.png", "good/good_001.png", "odd/deep16.png", "odd/deep16_dim.tif",
                   "odd/gray.png", "odd/palette.gif", "odd/photo.JPG", "odd/rgba.png"]
    images = {i: dm.train_dataset[k][0] for k, i in enumerate(ids)}
    assert all(t.shape == (3, 16, 16) for t in images.values())
    corner = {i: (t[:, 0, 0] * 255).round().tolist() for i, t in images.items()}
    assert corner["odd/deep16.png"] == [255, 255, 255]  # 16-bit 65535 -> white
    assert corner["odd/deep16_dim.tif"] == [64, 64, 64]
    assert corner["odd/gray.png"] == [128, 128, 128]
    assert corner["odd/rgba.png"] == [255, 255, 255]  # fully transparent -> white background
    assert corner["odd/palette.gif"] == [10, 200, 10]


def test_class_names_reorders_labels(tmp_path, make_folder):
    make_folder(tmp_path / "train", {"a": 2, "b": 3})
    dm = ImageFolderDataModule(train_dir=str(tmp_path / "train"), class_names=["b", "a"], val_split=0, **RAW)
    dm.setup("fit")
    assert dm.class_names == ["b", "a"]
    assert sorted(dm.train_dataset.targets.tolist()) == [0, 0, 0, 1, 1]
    with pytest.raises(UserError, match="no such folder: \\['c'\\]"):
        ImageFolderDataModule(train_dir=str(tmp_path / "train"), class_names=["a", "c"])


def test_predict_dir_yields_images_and_relative_ids(tmp_path):
    pred = tmp_path / "pred"
    (pred / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 12), (1, 2, 3)).save(pred / "b.png")
    Image.new("L", (8, 8), 5).save(pred / "sub" / "a.jpg")
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(pred / "c16.png")
    (pred / "notes.md").write_text("not an image")
    dm = ImageFolderDataModule(predict_dir=str(pred), image_size=16)
    assert dm.num_classes is None and dm.class_names is None
    assert ImageFolderDataModule(predict_dir=str(pred), class_names=["x", "y"]).num_classes == 2
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert len(batches) == 1
    images, ids = batches[0]
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert ids == ["b.png", "c16.png", "sub/a.jpg"]
    assert dm.ignored_files == {"predict": 1}
    with pytest.raises(UserError, match="has no training data"):
        dm.setup("fit")


def test_predict_without_predict_dir_uses_test_split(tmp_path, make_folder):
    make_folder(tmp_path / "test", {"a": 1, "b": 2})
    dm = ImageFolderDataModule(test_dir=str(tmp_path / "test"), **RAW)
    dm.setup("predict")
    images, ids = next(iter(dm.predict_dataloader()))
    assert ids == ["a/a_000.png", "b/b_000.png", "b/b_001.png"] and images.shape[0] == 3


def test_predict_dir_missing_or_empty(tmp_path):
    with pytest.raises(UserError, match="predict_dir .* does not exist"):
        ImageFolderDataModule(predict_dir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    dm = ImageFolderDataModule(predict_dir=str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no images in predict_dir"):
        dm.setup("predict")
