"""A training DataLoader whose position inside an epoch survives a checkpoint.

Lightning 2.6 restores its loop counters from a mid-epoch checkpoint, but a plain DataLoader
starts the epoch again from its first batch: the resumed run re-trains on the batches it had
already seen and ends the epoch early (Lightning only warns "your dataloader is not
resumable"). Lightning saves ``state_dict()`` of train loaders that have one and calls
``load_state_dict()`` before iterating again; :class:`ResumableDataLoader` uses that to skip
the batches already trained on. Skipping happens on the index batches, so no image is decoded
for nothing, and under DDP it applies per rank (after the distributed sampler).

The order within an epoch must be a function of the epoch (``EpochShuffleSampler``), so the
resumed epoch draws the same permutation, and so must the augmentation (``data/seeding.py``).

Not torchdata's ``StatefulDataLoader`` (0.11, tried under Lightning 2.6): Lightning calls
``iter()`` on the resumed loader in ``FitLoop.setup_data`` before ``set_epoch``, and it draws
(and fast-forwards) the sampler right there, so a run resumed mid-epoch in epoch >= 1 trained on
epoch 0's order (tests/test_interrupt.py: 77 tensors differed); this loader waits for the first batch.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """``DataLoader`` with Lightning's ``state_dict``/``load_state_dict`` for mid-epoch resume.

    The state is ``{"epoch": sampler epoch, "batches": batches handed out this epoch}``. After
    ``load_state_dict``, the next iteration skips ``batches`` batches if it runs over the same
    epoch and that epoch was not finished (an end-of-epoch checkpoint resumes at the next epoch).
    """

    # Class-level defaults: Lightning may re-create the loader from its __init__ arguments (DDP).
    _position: Optional[dict[str, Any]] = None
    _resume: Optional[dict[str, Any]] = None
    _skip_now: int = 0

    def state_dict(self) -> dict[str, Any]:
        return dict(self._position or {"epoch": self._epoch(), "batches": 0})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is asked for, which is after Lightning
        # called set_epoch() on the sampler (so the epoch and the skip are read correctly even
        # with worker processes, whose index prefetching starts as soon as an iterator exists).
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        epoch, skip = self._epoch(), self._take_skip()
        self._position = {"epoch": epoch, "batches": skip}
        self._skip_now = skip
        try:
            iterator = super().__iter__()
        finally:
            self._skip_now = 0
        for batch in iterator:
            self._position["batches"] += 1
            yield batch

    def _take_skip(self) -> int:
        resume, self._resume = self._resume, None
        if not resume:
            return 0
        done = int(resume.get("batches", 0))
        if resume.get("epoch") != self._epoch() or not 0 < done < len(self):
            return 0
        return done

    def _epoch(self) -> Optional[int]:
        return getattr(self.sampler, "epoch", None)

    @property
    def _index_sampler(self) -> Any:  # what the iterator draws index batches from
        sampler = super()._index_sampler
        return _SkipFirst(sampler, self._skip_now) if self._skip_now else sampler


class _SkipFirst:
    """Iterate ``sampler`` without its first ``skip`` items, once (later passes are complete).

    ``len`` stays the full length: Lightning counts the skipped batches as already done.
    """

    def __init__(self, sampler: Any, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[Any]:
        # A generator, so the skip is spent by the pass that is actually drawn from: a
        # multi-worker iterator calls iter() twice on creation (in __init__ and in _reset) and
        # draws only from the second; persistent workers re-iterate this object every epoch,
        # and those later passes must be complete.
        iterator = iter(self.sampler)
        if self.skip:
            skip, self.skip = self.skip, 0
            for _ in range(skip):
                next(iterator, None)
        yield from iterator

    def __len__(self) -> int:
        return len(self.sampler)
