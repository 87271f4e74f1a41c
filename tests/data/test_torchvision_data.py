"""IDX reader and TorchvisionDataModule on local files (tiny ones written here, and Debian's)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_ft.data import TorchvisionDataModule
from lit_ft.data.builtin import CLASS_NAMES
from lit_ft.data.idx import read_idx, write_idx
from lit_ft.errors import UserError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX written by hand from the spec (independent of lit_ft's writer)."""
    assert array.dtype == np.uint8
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_split(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        data = idx_bytes(arr)
        name = folder / f"{prefix}-{kind}-ubyte"
        if gz:
            name.with_name(name.name + ".gz").write_bytes(gzip.compress(data))
        else:
            name.write_bytes(data)


def tiny_mnist(folder: Path, gz: bool, n_train: int = 40, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    train_y = (np.arange(n_train) % 10).astype(np.uint8)
    write_split(folder, "train", train_x, train_y, gz)
    write_split(folder, "t10k", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                (np.arange(n_test) % 10).astype(np.uint8), gz)
    return train_x, train_y


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_raw_and_gzipped(tmp_path, gz):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 5)
    np.testing.assert_array_equal(out, arr)


def test_write_idx_round_trips_wider_types(tmp_path):
    arr = np.array([[-3, 1000], [7, -32768]], dtype=np.int16)
    write_idx(tmp_path / "w.gz", arr, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "w.gz"), arr)


def test_read_idx_rejects_bad_files(tmp_path):
    good = idx_bytes(np.zeros((4, 2, 2), np.uint8))
    (tmp_path / "short").write_bytes(good[:-3])
    (tmp_path / "magic").write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(UserError, match="data bytes, header says 16"):
        read_idx(tmp_path / "short")
    with pytest.raises(UserError, match="bad magic"):
        read_idx(tmp_path / "magic")


@pytest.mark.parametrize(("layout", "gz"), [("flat", True), ("torchvision", False)])
def test_mnist_from_local_files(tmp_path, layout, gz):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    train_x, train_y = tiny_mnist(folder, gz)
    dm = TorchvisionDataModule(name="mnist", root=str(tmp_path), val_split=10, image_size=28, batch_size=50,
                               augment=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0, interpolation="nearest")
    assert dm.class_names == [str(d) for d in range(10)] and dm.num_classes == 10
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (30, 10, 10)
    assert np.bincount(dm.val_dataset.targets, minlength=10).tolist() == [1] * 10
    x, y = dm.train_dataset[0]
    index = int(dm.train_dataset.indices[0])
    assert x.shape == (3, 28, 28) and y == train_y[index]
    assert torch.equal((x[0] * 255).round().to(torch.uint8), torch.from_numpy(train_x[index]))
    assert torch.equal(x[0], x[2])  # gray repeated to RGB
    images, ids = next(iter(_predict(dm)))
    assert ids[:3] == ["0", "1", "2"] and images.shape == (10, 3, 28, 28)


def _predict(dm):
    dm.setup("predict")
    return dm.predict_dataloader()


def test_missing_files_say_where_and_how_to_fix(tmp_path):
    dm = TorchvisionDataModule(name="fashion_mnist", root=str(tmp_path))
    with pytest.raises(UserError) as err:
        dm.setup("fit")
    assert str(tmp_path / "FashionMNIST" / "raw") in err.value.problem
    assert "apt-get install dataset-fashion-mnist" in err.value.hint and "download: true" in err.value.hint
    with pytest.raises(UserError, match="download: true"):
        TorchvisionDataModule(name="cifar10", root=str(tmp_path)).setup("fit")


def test_static_class_lists():
    assert CLASS_NAMES["fashion_mnist"][0] == "T-shirt/top" and CLASS_NAMES["fashion_mnist"][-1] == "Ankle boot"
    assert len(CLASS_NAMES["cifar100"]) == 100 == len(set(CLASS_NAMES["cifar100"]))
    assert CLASS_NAMES["cifar100"] == sorted(CLASS_NAMES["cifar100"])  # CIFAR-100 fine labels are alphabetical
    assert TorchvisionDataModule(name="cifar10").num_classes == 10
    with pytest.raises(UserError, match="class_names has 2 names but the data has 10"):
        TorchvisionDataModule(name="mnist", class_names=["a", "b"])


@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist():
    dm = TorchvisionDataModule(name="fashion_mnist", val_split=0.1, image_size=28, batch_size=16)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 60000 and len(dm.test_dataset) == 10000
    assert np.bincount(dm.val_dataset.targets).tolist() == [600] * 10
    assert dm.num_classes == 10 and dm.class_names[9] == "Ankle boot"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 28, 28) and y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
