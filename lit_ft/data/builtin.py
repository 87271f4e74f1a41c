"""Datamodule for the small classic datasets torchvision knows: MNIST family and CIFAR.

The MNIST family is read straight from its IDX files, wherever they already are (the Debian
``dataset-fashion-mnist`` package, torchvision's ``<root>/FashionMNIST/raw``, or a flat
folder), so no download is needed when the files are installed. CIFAR goes through
torchvision's dataset classes. Decoded images stay in memory as one uint8 tensor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
import torchvision.datasets

from lit_ft.data.base import BaseImageDataModule, Split
from lit_ft.data.datasets import ArraySource
from lit_ft.data.idx import read_idx
from lit_ft.errors import UserError

log = logging.getLogger(__name__)

DatasetName = Literal["fashion_mnist", "mnist", "kmnist", "cifar10", "cifar100"]

DEFAULT_ROOT = "~/.cache/lit-ft/datasets"
# Where distribution packages install a dataset (tried before DEFAULT_ROOT when root is None).
SYSTEM_DIRS = {"fashion_mnist": ("/usr/share/datasets/fashion-mnist",)}
INSTALL_HINTS = {"fashion_mnist": "apt-get install dataset-fashion-mnist"}

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION = {
    "fashion_mnist": "FashionMNIST", "mnist": "MNIST", "kmnist": "KMNIST",
    "cifar10": "CIFAR10", "cifar100": "CIFAR100",
}

CLASS_NAMES: dict[str, list[str]] = {
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "mnist": [str(d) for d in range(10)],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "cifar100": [
        "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
        "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
        "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
        "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
        "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
        "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
        "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
        "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
        "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
        "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
    ],
}


class TorchvisionDataModule(BaseImageDataModule):
    """Fashion-MNIST, MNIST, KMNIST, CIFAR-10 or CIFAR-100 from local files.

    The test split is the dataset's test set; validation is ``val_split`` held out of the
    training set (stratified, seeded), and ``train_subset`` applies to what is left.
    Grayscale datasets become 3-channel images (``grayscale_to_rgb``).

    Args:
        name: which dataset.
        root: folder holding the files. The MNIST family is found as flat IDX files
            (``train-images-idx3-ubyte[.gz]``, ...) in ``root``, ``root/<TorchvisionName>/raw``
            or ``root/<name>``; CIFAR as torchvision's ``root/cifar-10-batches-py`` /
            ``root/cifar-100-python``. ``None`` looks in system dataset folders (e.g.
            ``/usr/share/datasets/fashion-mnist``) and then ``~/.cache/lit-ft/datasets``.
        download: download missing files with torchvision into ``root`` (needs internet).
        **kwargs: options of :class:`~lit_ft.data.base.BaseImageDataModule`.
    """

    def __init__(
        self,
        name: DatasetName = "fashion_mnist",
        root: Optional[str] = None,
        download: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if name not in CLASS_NAMES:
            raise UserError(f"unknown dataset name {name!r}", f"use one of {', '.join(CLASS_NAMES)}")
        self.name = name
        self.root = root
        self.download = download
        self._set_classes(CLASS_NAMES[name])

    @property
    def _is_mnist_family(self) -> bool:
        return self.name in ("fashion_mnist", "mnist", "kmnist")

    def _roots(self) -> list[Path]:
        if self.root is not None:
            return [Path(self.root).expanduser()]
        return [Path(d) for d in SYSTEM_DIRS.get(self.name, ())] + [Path(DEFAULT_ROOT).expanduser()]

    def _download_root(self) -> Path:
        return Path(self.root if self.root is not None else DEFAULT_ROOT).expanduser()

    def prepare_data(self) -> None:
        """Download missing files when ``download`` is set (Lightning calls this on one process)."""
        if not self.download:
            return
        for split in ("train", "test"):
            if not self._is_mnist_family or self._find_idx(split) is None:
                self._torchvision_dataset(split, download=True)

    def _load_source(self, split: Split) -> Optional[ArraySource]:
        if split == "val":
            return None  # held out of train
        if self._is_mnist_family:
            images, labels = self._load_idx(split)
        else:
            ds = self._torchvision_dataset(split, download=self.download)
            images, labels = np.asarray(ds.data), np.asarray(ds.targets)
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(CLASS_NAMES[self.name]):
            raise UserError(f"{self.name} {split} labels outside 0..{len(CLASS_NAMES[self.name]) - 1}", "the files are not this dataset; check root")
        log.info("loaded %s %s: %d images of %s", self.name, split, len(images), tuple(images.shape[1:]))
        # copy: IDX arrays are read-only views of the file bytes, which torch cannot share
        return ArraySource(torch.from_numpy(np.array(images, dtype=np.uint8)), labels)

    def _idx_folders(self) -> list[Path]:
        """Where IDX files may be: flat in a root, torchvision's layout, or a dataset-named folder."""
        return [
            folder
            for root in self._roots()
            for folder in (root, root / _TORCHVISION[self.name] / "raw", root / self.name, root / self.name.replace("_", "-"))
        ]

    def _find_idx(self, split: str) -> Optional[tuple[Path, Path]]:
        """The (images, labels) IDX files of ``split``, from the first folder that has both."""
        for folder in self._idx_folders():
            found = [_first_existing(folder, base) for base in IDX_FILES[split]]
            if all(found):
                return found[0], found[1]  # type: ignore[return-value]
        return None

    def _load_idx(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        files = self._find_idx(split)
        if files is None and self.download:
            self._torchvision_dataset(split, download=True)
            files = self._find_idx(split)
        if files is None:
            raise self._not_found(f"{IDX_FILES[split][0]}[.gz] and {IDX_FILES[split][1]}[.gz]")
        images, labels = read_idx(files[0]), read_idx(files[1])
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"{files[0]} / {files[1]} are not matching image/label IDX files "
                f"(shapes {images.shape} {images.dtype} and {labels.shape})",
                "delete them and install or download the dataset again",
            )
        return images, labels.astype(np.int64)

    def _torchvision_dataset(self, split: str, download: bool) -> Any:
        cls = getattr(torchvision.datasets, _TORCHVISION[self.name])
        root = self._download_root()
        try:
            return cls(root=str(root), train=split == "train", download=download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            if download:
                raise UserError(f"could not download {self.name} into {root}: {err}", "check the network, or put the files there by hand") from err
            raise self._not_found(f"torchvision's {cls.__name__} files") from err
        except OSError as err:  # network errors during download
            raise UserError(f"could not download {self.name} into {root}: {err}", "check the network, or put the files there by hand") from err

    def _not_found(self, what: str) -> UserError:
        looked = ", ".join(map(str, self._idx_folders())) if self._is_mnist_family else str(self._download_root())
        fixes = [INSTALL_HINTS[self.name]] if self.name in INSTALL_HINTS else []
        fixes += ["set `download: true` (needs internet)", "set `root` to the folder that has the files"]
        return UserError(f"{self.name}: no {what} in {looked}", " or ".join(fixes))


def _first_existing(folder: Path, base: str) -> Optional[Path]:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None
