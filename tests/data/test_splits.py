"""Seeded stratified sampling: counts per class, reproducibility, hold-outs."""

from __future__ import annotations

import numpy as np
import pytest

from lit_ft.data import SyntheticDataModule
from lit_ft.data.splits import count_for, split_off, stratified_sample
from lit_ft.errors import UserError

TARGETS = np.repeat([0, 1, 2], [60, 30, 10])  # imbalanced on purpose


def per_class(indices: np.ndarray, targets: np.ndarray = TARGETS) -> list[int]:
    return np.bincount(targets[indices], minlength=3).tolist()


def test_sample_keeps_class_proportions():
    assert per_class(stratified_sample(TARGETS, 10, seed=0)) == [6, 3, 1]
    assert per_class(stratified_sample(TARGETS, 50, seed=0)) == [30, 15, 5]
    assert per_class(stratified_sample(TARGETS, 100, seed=0)) == [60, 30, 10]


def test_sample_total_is_exact_when_quotas_are_fractional():
    for n in range(1, 100):
        idx = stratified_sample(TARGETS, n, seed=3)
        assert len(idx) == n == len(np.unique(idx))
        assert all(abs(got - n * share) < 1 for got, share in zip(per_class(idx), (0.6, 0.3, 0.1)))


def test_sample_is_seeded():
    a, b = stratified_sample(TARGETS, 20, seed=1), stratified_sample(TARGETS, 20, seed=1)
    c = stratified_sample(TARGETS, 20, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert per_class(a) == per_class(c)


def test_split_off_is_a_disjoint_cover_and_keeps_every_class_in_train():
    kept, held = split_off(TARGETS, 10, seed=0)
    assert len(held) == 10 and per_class(held) == [6, 3, 1]
    assert not set(kept) & set(held) and len(kept) + len(held) == len(TARGETS)
    tiny = np.array([0, 1, 1, 1])
    kept, held = split_off(tiny, 2, seed=0)
    assert 0 in tiny[kept]  # the lone class-0 image stays in training
    with pytest.raises(UserError, match="keeping one of each"):
        split_off(tiny, 3, seed=0)


def test_count_for_int_and_fraction():
    assert count_for(0.1, 100, "val_split") == 10
    assert count_for(0.001, 100, "val_split") == 1  # non-zero fraction never rounds to nothing
    assert count_for(0, 100, "val_split") == 0
    assert count_for(25, 100, "train_subset") == 25
    with pytest.raises(UserError, match="train_subset=200 is more than the 100"):
        count_for(200, 100, "train_subset")
    with pytest.raises(UserError, match="fraction"):
        count_for(1.5, 100, "val_split")


@pytest.mark.parametrize(("subset", "expected"), [(40, 40), (0.25, 60)])
def test_train_subset_on_datamodule_is_stratified_and_applied_after_val_split(subset, expected):
    dm = SyntheticDataModule(num_classes=4, train_size=240, val_size=0, image_size=16, train_subset=subset, seed=5)
    dm.setup("fit")
    assert len(dm.train_dataset) == expected
    assert np.bincount(dm.train_dataset.targets).tolist() == [expected // 4] * 4
    assert dm.val_dataset is None and dm.val_dataloader() == []
    again = SyntheticDataModule(num_classes=4, train_size=240, val_size=0, image_size=16, train_subset=subset, seed=5)
    again.setup("fit")
    np.testing.assert_array_equal(again.train_dataset.indices, dm.train_dataset.indices)
    other = SyntheticDataModule(num_classes=4, train_size=240, val_size=0, image_size=16, train_subset=subset, seed=6)
    other.setup("fit")
    assert not np.array_equal(other.train_dataset.indices, dm.train_dataset.indices)
