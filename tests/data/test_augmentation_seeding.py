"""Training augmentation is a pure function of (seed, epoch, sample index): the same batches
whatever the number of loader workers, persistent or not, and wherever a run was resumed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lit_ft.data import SyntheticDataModule

pytestmark = pytest.mark.usefixtures("one_thread")

# Every random transform lit-ft offers on the per-image path: RRC + flips (python random and
# torch), RandAugment (python random and numpy), colour jitter (torch), random erasing.
AUG = dict(hflip=0.5, vflip=0.5, scale=(0.3, 1.0), auto_augment="rand-m9-mstd0.5", color_jitter=0.4, re_prob=0.5)


def datamodule(**kwargs) -> SyntheticDataModule:
    opts = dict(train_size=20, val_size=0, test_size=0, image_size=16, batch_size=4, seed=7) | AUG | kwargs
    dm = SyntheticDataModule(**opts)
    dm.setup("fit")
    return dm


def epoch_batches(loader, epoch: int, global_seed: int) -> list[list[torch.Tensor]]:
    """One epoch as Lightning runs it (set_epoch, then iterate); the global RNGs seeded
    differently per call, which must not matter."""
    loader.sampler.set_epoch(epoch)
    torch.manual_seed(global_seed)
    random.seed(global_seed)
    np.random.seed(global_seed)
    return [list(b) for b in loader]


def assert_same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert all(torch.equal(u, v) for u, v in zip(x, y)), f"batch {i} differs"


def test_augmented_batches_are_the_same_with_0_or_2_workers_persistent_or_not():
    plain = datamodule(num_workers=0).train_dataloader()
    workers = datamodule(num_workers=2).train_dataloader()
    persistent = datamodule(num_workers=2, persistent_workers=True).train_dataloader()
    for epoch in (0, 1):
        ref = epoch_batches(plain, epoch, global_seed=epoch)
        assert_same(ref, epoch_batches(workers, epoch, global_seed=100 + epoch))
        assert_same(ref, epoch_batches(persistent, epoch, global_seed=200 + epoch))  # same workers, epoch 2


def test_the_same_image_is_augmented_differently_in_another_epoch_and_with_another_seed():
    dm = datamodule()
    wrapped = dm.train_dataloader().dataset
    image = lambda ds, epoch, i: ds[(epoch, i)][0]  # noqa: E731
    assert torch.equal(image(wrapped, 0, 3), image(wrapped, 0, 3))
    assert not torch.equal(image(wrapped, 0, 3), image(wrapped, 1, 3))
    other_seed = datamodule(seed=8).train_dataloader().dataset
    assert not torch.equal(image(wrapped, 0, 3), image(other_seed, 0, 3))


def test_loading_in_the_main_process_leaves_the_global_rngs_alone():
    loader = datamodule(num_workers=0).train_dataloader()
    loader.sampler.set_epoch(0)
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    list(loader)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_a_loader_resumed_mid_epoch_with_augmentation_and_workers_yields_the_remaining_batches():
    full = epoch_batches(datamodule(num_workers=2).train_dataloader(), epoch=1, global_seed=0)  # 5 batches
    first = datamodule(num_workers=2).train_dataloader()
    first.sampler.set_epoch(1)
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()
    del it
    resumed = datamodule(num_workers=2).train_dataloader()
    resumed.load_state_dict(state)
    assert_same(epoch_batches(resumed, epoch=1, global_seed=5), full[2:])


# --------------------------------------------------------------------------- batch_transforms


def on_device(dm: SyntheticDataModule, batches: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [dm.on_after_batch_transfer(tuple(b), 0)[0] for b in batches]


def test_batch_transform_augmentation_depends_on_epoch_and_batch_only():
    dm = datamodule(batch_transforms=True, auto_augment=None, color_jitter=0.0, re_prob=0.0, image_size=24)
    workers = datamodule(batch_transforms=True, auto_augment=None, color_jitter=0.0, re_prob=0.0, image_size=24, num_workers=2)
    loader = dm.train_dataloader()
    e0 = on_device(dm, epoch_batches(loader, 0, global_seed=0))
    e0_again = on_device(dm, epoch_batches(loader, 0, global_seed=1))
    e0_workers = on_device(workers, epoch_batches(workers.train_dataloader(), 0, global_seed=2))
    e1 = on_device(dm, epoch_batches(loader, 1, global_seed=0))
    assert e0[0].shape == (4, 3, 24, 24) and e0[0].dtype == torch.float32
    for a, b, c in zip(e0, e0_again, e0_workers):
        assert torch.equal(a, b) and torch.equal(a, c)
    # Another epoch: another order *and* other crops of the same images.
    assert not torch.equal(e0[0], e1[0])
    wrapped = loader.dataset
    x0, _, u0 = wrapped[(0, 5)]
    x1, _, u1 = wrapped[(1, 5)]
    assert torch.equal(x0, x1) and not torch.equal(u0, u1)  # same raw image, other augmentation


def test_under_ddp_the_epoch_reaches_every_rank_with_the_keys():
    # Lightning wraps a custom sampler in DistributedSamplerWrapper and forwards set_epoch to it.
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from lit_ft.data.base import EpochShuffleSampler

    keys = []
    for rank in (0, 1):
        sampler = DistributedSamplerWrapper(EpochShuffleSampler(10, seed=7, with_epoch=True), num_replicas=2, rank=rank, shuffle=False)
        sampler.set_epoch(3)
        keys += list(sampler)
    assert {epoch for epoch, _ in keys} == {3} and sorted(i for _, i in keys) == list(range(10))


def test_shuffle_seed_changes_the_order_and_the_draws_but_not_the_split_or_the_subset():
    def data(**kw) -> SyntheticDataModule:
        dm = SyntheticDataModule(**(dict(train_size=40, val_size=0, test_size=0, train_subset=16, image_size=16,
                                         batch_size=4, seed=7) | AUG | kw))
        dm.setup("fit")
        return dm

    base, same, other = data(), data(shuffle_seed=7), data(shuffle_seed=8)
    assert base.train_dataset.indices.tolist() == other.train_dataset.indices.tolist()  # the same training subset
    assert base.train_dataset.indices.tolist() != data(seed=8).train_dataset.indices.tolist()  # which `seed` moves
    assert base.draw_seed == same.draw_seed == 7 and other.draw_seed == 8
    ref = epoch_batches(base.train_dataloader(), 0, global_seed=0)
    assert_same(ref, epoch_batches(same.train_dataloader(), 0, global_seed=1))  # shuffle_seed = seed: nothing changes
    moved = epoch_batches(other.train_dataloader(), 0, global_seed=0)
    assert sorted(torch.cat([b[1] for b in ref]).tolist()) == sorted(torch.cat([b[1] for b in moved]).tolist())
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(ref, moved))  # another order and other draws
    assert_same(moved, epoch_batches(data(shuffle_seed=8).train_dataloader(), 0, global_seed=5))  # still deterministic
