"""Training throughput (images per second): Lightning's ``ThroughputMonitor``, configured for lit-ft.

Owns only the configuration (how to count the images of a batch, the averaging window, an
off switch for the CLI). The measuring and logging are Lightning's; this module must not
reimplement them. The running totals that a budget needs (images seen over resumes, seconds)
live in :mod:`lit_ft.callbacks.budget`, because ``ThroughputMonitor`` restarts its counts at
every fit and does not checkpoint them.

Tags, as ``ThroughputMonitor`` names them (it prefixes the stage and does not let a caller
rename them): ``train/device/samples_per_sec`` (one process's images per second; with several
processes also ``train/samples_per_sec``, all of them), plus ``train/time``,
``train/samples`` and ``train/batches`` of this process since the fit started, and the same
for ``validate/`` during fit and ``test/`` during test.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, ThroughputMonitor

from lit_ft.errors import UserError

TAG = "train/device/samples_per_sec"  # the rate a single-process run logs


def batch_size(batch: Any) -> int:
    """Images in a batch: ``len`` of its first tensor (``(images, targets)`` batches)."""
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(first, torch.Tensor):
        return int(first.shape[0]) if first.ndim else 1
    if isinstance(first, dict) and first:
        return batch_size(next(iter(first.values())))
    return len(first) if hasattr(first, "__len__") else 1


def throughput_monitor(enabled: bool = True, window_size: int = 20) -> Callback:
    """Lightning's ``ThroughputMonitor`` counting images with :func:`batch_size`.

    Args:
        enabled: measure at all (False gives a callback that does nothing).
        window_size: the rate is averaged over this many most recent batches; nothing is
            logged until that many batches have run in the fit (must be >= 2).
    """
    if not enabled:
        return Callback()
    if window_size < 2:  # Lightning's Throughput asserts this deep inside the first training step
        raise UserError(f"throughput.window_size must be >= 2, got {window_size}", "e.g. --throughput.window_size 20")
    # Without a `flops_per_batch` on the module ThroughputMonitor warns once per run; lit-ft does
    # not measure FLOPs (no MFU), so the warning would only be noise.
    warnings.filterwarnings("ignore", message=".*`ThroughputMonitor`.*flops_per_batch.*")
    return ThroughputMonitor(batch_size_fn=batch_size, window_size=window_size)
