"""Seeded, class-stratified sampling: validation hold-outs and training subsets.

Stratifying keeps every class's share the same in the sample as in the whole, so a small
validation split or a 10% training subset does not lose rare classes by chance.
"""

from __future__ import annotations

from typing import Union

import numpy as np

from lit_ft.errors import UserError

# Separate random streams, so that changing `train_subset` never changes the validation split.
VAL_SPLIT_STREAM = 0
SUBSET_STREAM = 1


def count_for(size: Union[int, float], total: int, name: str) -> int:
    """Turn an int count or a float fraction of ``total`` into a count.

    Args:
        size: number of items (int >= 0) or fraction of ``total`` (float in [0, 1]).
        total: number of items available.
        name: the option being resolved, for error messages.
    """
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise UserError(f"{name}={size!r} is not a number", f"give {name} as an int count or a float fraction")
    if isinstance(size, float):
        if not 0.0 <= size <= 1.0:
            raise UserError(f"{name}={size} is not a fraction in [0, 1]", "use a float in [0, 1] or an int count")
        count = int(round(size * total))
        return max(count, 1) if size > 0 and total > 0 else count  # a non-zero fraction never rounds to nothing
    if size < 0:
        raise UserError(f"{name}={size} is negative", "use a count >= 0 or a fraction in [0, 1]")
    if size > total:
        raise UserError(f"{name}={size} is more than the {total} images available", f"use at most {total}, or a fraction")
    return size


def allocate(class_counts: np.ndarray, n: int, caps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split ``n`` over classes in proportion to ``class_counts`` (largest remainder, capped).

    Ties between equal remainders are broken at random (seeded), so no class is always the
    one to lose out.

    Args:
        class_counts: items per class.
        n: total to allocate; must be <= ``caps.sum()``.
        caps: the most each class may get.
        rng: seeded generator for tie-breaking.
    """
    total = class_counts.sum()
    quota = n * class_counts / total if total else np.zeros(len(class_counts))
    alloc = np.minimum(np.floor(quota).astype(np.int64), caps)
    order = np.lexsort((rng.random(len(class_counts)), -(quota - alloc)))  # largest remainder first
    while alloc.sum() < n:
        for c in order:
            if alloc.sum() == n:
                break
            if alloc[c] < caps[c]:
                alloc[c] += 1
    return alloc


def stratified_sample(targets: np.ndarray, n: int, seed: int, stream: int = SUBSET_STREAM, keep_one: bool = False) -> np.ndarray:
    """Pick ``n`` indices into ``targets``, stratified by class and reproducible from ``seed``.

    Args:
        targets: class index of every item.
        n: how many to pick.
        seed: random seed; the same seed always picks the same indices.
        stream: independent random stream for this use of ``seed``.
        keep_one: leave at least one item of every class unpicked (for hold-outs, so no class
            disappears from training).

    Returns:
        Sorted indices into ``targets``.
    """
    targets = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng([seed, stream])
    classes, inverse = np.unique(targets, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    caps = counts - 1 if keep_one else counts
    if n > caps.sum():
        raise UserError(
            f"cannot hold out {n} of {len(targets)} images while keeping one of each of {len(classes)} classes for training",
            "use a smaller val_split",
        )
    per_class = allocate(counts, n, caps, rng)
    picked = [rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(per_class)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def split_off(targets: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``n`` stratified items (e.g. for validation).

    Args:
        targets: class index of every item.
        n: how many to hold out.
        seed: random seed.

    Returns:
        ``(kept, held_out)``: sorted, disjoint indices into ``targets`` that cover it.
    """
    held = stratified_sample(targets, n, seed, stream=VAL_SPLIT_STREAM, keep_one=True)
    mask = np.ones(len(targets), dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held
