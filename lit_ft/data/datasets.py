"""Torch datasets: where a split's images come from (a *source*) and how they become tensors.

A source holds every image of one split with its labels; :class:`TransformedDataset`
selects some indices of a source (e.g. train minus the held-out validation images) and applies
one transform. Train and validation can thus share a source but use different transforms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lit_ft.data.images import open_image
from lit_ft.errors import UserError


class ImageSource(Protocol):
    """The images of one split.

    Attributes:
        targets: class index per image (int64); ``-1`` where unlabeled (predict folders).
    """

    targets: np.ndarray

    def __len__(self) -> int: ...

    def image(self, index: int) -> Image.Image:
        """Decoded image ``index`` in its file's own mode."""
        ...

    def sample_id(self, index: int) -> str:
        """A stable name for image ``index`` (used as the prediction id)."""
        ...


class FileSource:
    """Images stored as files.

    Args:
        paths: image files.
        targets: class index per file, or ``None`` for unlabeled files.
        root: ids are the paths relative to this folder (POSIX style).
    """

    def __init__(self, paths: Sequence[Path], targets: Optional[Sequence[int]], root: Path) -> None:
        self.paths = list(paths)
        self.root = Path(root)
        n = len(self.paths)
        self.targets = np.full(n, -1, dtype=np.int64) if targets is None else np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            return open_image(path)
        except Exception as err:  # the file was readable at setup, so it changed since
            raise UserError(
                f"cannot read image {path}: {type(err).__name__}: {err}",
                "the file changed after the dataset was scanned; restore or delete it and restart",
            ) from err

    def sample_id(self, index: int) -> str:
        return self.paths[index].relative_to(self.root).as_posix()


class ArraySource:
    """Images decoded into memory as one uint8 tensor.

    Args:
        images: ``(N, H, W)`` (grayscale) or ``(N, H, W, C)`` uint8 tensor.
        targets: class index per image.
    """

    def __init__(self, images: torch.Tensor, targets: Sequence[int] | np.ndarray | torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be a uint8 (N,H,W[,C]) tensor, got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index].numpy())

    def raw(self, index: int) -> torch.Tensor:
        """The stored uint8 image as (C, H, W)."""
        img = self.images[index]
        return img.unsqueeze(0) if img.ndim == 2 else img.permute(2, 0, 1)

    def sample_id(self, index: int) -> str:
        return str(index)


class TransformedDataset(Dataset):
    """Some images of a source, transformed.

    Yields ``(image_tensor, target)``, or ``(image_tensor, sample_id)`` with ``with_ids=True``.

    Args:
        source: where the images come from.
        indices: which images of ``source`` (``None``: all).
        transform: PIL image -> tensor.
        with_ids: yield the sample id instead of the target (for prediction).
    """

    def __init__(
        self,
        source: ImageSource,
        indices: Optional[np.ndarray],
        transform: Callable[[Image.Image], torch.Tensor],
        with_ids: bool = False,
    ) -> None:
        self.source = source
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.with_ids = with_ids

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def targets(self) -> np.ndarray:
        """Class index of every item, in dataset order."""
        return self.source.targets[self.indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | str]:
        index = int(self.indices[i])
        if getattr(self.transform, "raw", False):
            img = self.source.raw(index)  # uint8 (C, H, W), transformed later on the whole batch
        else:
            img = self.transform(self.source.image(index))
        if self.with_ids:
            return img, self.source.sample_id(index)
        return img, int(self.source.targets[index])


def collate_with_ids(batch: Sequence[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    """Stack prediction samples into ``(images, ids)`` with ``ids`` a plain list of strings."""
    images, ids = zip(*batch)
    return torch.stack(images), list(ids)
