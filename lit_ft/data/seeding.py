"""Training-data randomness as a pure function of ``(seed, epoch, sample index)``.

Owns: the seed of one training sample (:func:`sample_seed`), seeding the global RNGs that
image transforms draw from, and :class:`EpochSeededDataset`, the training-set wrapper that does
both. Must not touch: the model's randomness (dropout, mixup), which belongs to the training
step; in the main process (``num_workers=0``) the global RNG states are put back after every
batch so loading data never shifts them.

Why: timm's and torchvision's transforms draw from python ``random``, numpy and torch's global
RNG. Left alone, what sample ``i`` got depended on which process loaded it (each worker has
its own seed), on how many samples that process had loaded before, and on the main process's
RNG with ``num_workers=0``: changing ``num_workers`` changed the run, and no resume (not even
at an epoch boundary) repeated the augmentation of an uninterrupted run. Seeding all three
from ``(seed, epoch, i)`` right before sample ``i`` is transformed makes its augmentation the
same whoever loads it, so nothing about the loader needs to be checkpointed.

The epoch travels with the index: the training sampler yields ``(epoch, i)`` keys
(:class:`~lit_ft.data.base.EpochShuffleSampler` with ``with_epoch=True``), because worker
processes, persistent ones in particular, never see the main process's ``set_epoch``.
"""

from __future__ import annotations

import random
from typing import Any, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a 64-bit bijection that spreads every input bit over the output."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for sample ``index`` of ``epoch``; neighbouring inputs give unrelated seeds.

    Plain arithmetic (not ``hash``), so it is the same on every machine and Python version.
    """
    return _mix(_mix(_mix(seed & _MASK) ^ (epoch & _MASK)) ^ (index & _MASK))


def seed_global_rngs(seed: int) -> None:
    """Seed python ``random``, numpy's legacy global RNG and torch's default CPU generator.

    ``torch.default_generator`` rather than ``torch.manual_seed``: the latter also re-seeds
    every CUDA device (150 us per call, measured) and would clobber the model's GPU RNG.
    """
    random.seed(seed)
    np.random.seed(seed >> 32)  # the legacy global RNG takes 32-bit seeds
    torch.default_generator.manual_seed(seed)


def _global_states() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.default_generator.get_state()


def _set_global_states(states: tuple[Any, Any, torch.Tensor]) -> None:
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.default_generator.set_state(states[2])


Key = Union[int, tuple[int, int]]


class EpochSeededDataset(Dataset):
    """Item ``(epoch, i)`` is ``dataset[i]`` transformed under RNGs seeded from ``(seed, epoch, i)``.

    A plain int key ``i`` means ``(0, i)``.

    Args:
        dataset: the training dataset (with random transforms).
        seed: the datamodule's seed.
        uniforms: if > 0, every item gets one more element: ``uniforms`` U[0, 1) numbers
            (float32 tensor) from the same seed, the per-sample draws of an augmentation done
            later on the whole batch (:class:`~lit_ft.data.batch_transforms.BatchTransform`),
            so it too is a function of ``(seed, epoch, i)`` and not of the batch, rank or device.
    """

    def __init__(self, dataset: Dataset, seed: int, uniforms: int = 0) -> None:
        self.dataset, self.seed, self.uniforms = dataset, int(seed), int(uniforms)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def targets(self) -> np.ndarray:
        """Class index of every item (those of the wrapped dataset)."""
        return self.dataset.targets  # type: ignore[attr-defined]

    def __getitem__(self, key: Key) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[Key]) -> list[Any]:
        # The DataLoader hands over a whole batch of keys: in the main process the global
        # states are saved and restored once per batch (saving costs ~60 us, seeding ~7 us).
        saved = _global_states() if get_worker_info() is None else None
        try:
            return [self._item(key) for key in keys]
        finally:
            if saved is not None:
                _set_global_states(saved)

    def _item(self, key: Key) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        seed_global_rngs(sample_seed(self.seed, int(epoch), int(index)))
        if not self.uniforms:
            return self.dataset[index]
        draws = torch.rand(self.uniforms)  # before the item, so they do not depend on its transform
        return (*self.dataset[index], draws)
