"""Cached-feature linear probing: run the frozen backbone once, train the head on its outputs.

While a freeze plan trains only the head (with the backbone's BatchNorm frozen), the
backbone is a fixed function: its pre-logits for a deterministic input never change, so
computing them once and training the classifier on them gives the same result as running
the backbone every epoch, at a fraction of the cost. With augmentation on, the user may
accept a fixed set of augmented *views* instead (``cache_views``), each computed once.

Features live in memory and, with ``feature_cache_dir``, on disk under a key made of the
backbone's weights, the exact images and the whole preprocessing actually applied (the
dataset's transform, and with ``batch_transforms`` the on-device transform and the
resolved data config: size, mean/std, crop), so a second run reuses them and a change to
any of those recomputes them.

Owns :class:`FeatureCache` (which split and epoch is served from cache, and the cache
itself); the datamodule knows nothing of it: the model registers
:meth:`FeatureCache.dataset_for` through the datamodule's public ``set_dataset_hook``.
It never changes ``requires_grad``, module modes or the optimizer.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


class FeatureDataset(Dataset):
    """``(pre_logits (D,), target)`` pairs: a drop-in for an image dataset during a linear probe."""

    with_ids = False

    def __init__(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        assert len(features) == len(targets)
        self.features = features  # (N, D) float32
        self.targets_t = targets  # (N,) int64

    @property
    def targets(self) -> np.ndarray:
        return self.targets_t.numpy()

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.features[i], int(self.targets_t[i])


@torch.inference_mode()
def extract_pre_logits(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    view: Optional[tuple[int, int]] = None,
    batch_transform: Optional[Callable[..., torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logits (timm ``forward_head(pre_logits=True)``) of every item, in dataset order.

    Runs in eval mode. ``view=(seed, v)`` draws the random (augmenting) transforms of view
    ``v`` as training draws those of epoch ``v``: a function of (seed, v, index), whatever
    ``num_workers`` is (:class:`~lit_ft.data.seeding.EpochSeededDataset`). ``batch_transform``
    is applied on the device to each batch (for raw uint8 datasets).
    """
    from lit_ft.data.batch_transforms import BatchTransform
    from lit_ft.data.seeding import EpochSeededDataset

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    fmt = torch.channels_last if next(model.parameters()).is_contiguous(memory_format=torch.channels_last) else None
    uniforms = BatchTransform.UNIFORMS if view is not None and isinstance(batch_transform, BatchTransform) else 0
    source = EpochSeededDataset(dataset, view[0], uniforms) if view is not None else dataset
    keys = [(view[1], i) for i in range(len(dataset))] if view is not None else None
    feats, targets = [], []
    try:
        loader = DataLoader(source, batch_size=batch_size, sampler=keys, num_workers=num_workers)
        for batch in loader:
            x, y = batch[0].to(device), batch[1]
            if batch_transform is not None:
                x = batch_transform(x, batch[2]) if uniforms else batch_transform(x)
            if fmt is not None:
                x = x.contiguous(memory_format=fmt)
            f = model.forward_head(model.forward_features(x), pre_logits=True)  # (B, D)
            feats.append(f.float().cpu())
            targets.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(targets).long()


def fingerprint(*parts: object) -> str:
    """sha1 over strings, numpy arrays and tensors (by content)."""
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"|")
    return h.hexdigest()


def backbone_fingerprint(model: nn.Module, exclude: set[str]) -> str:
    """Content hash of the weights and buffers that shape the pre-logits (the classifier excluded)."""
    sd = model.state_dict()
    return fingerprint(*[(k, sd[k]) for k in sorted(sd) if k not in exclude])


def dataset_fingerprint(dataset: Dataset) -> str:
    """Content hash of a lit-ft image dataset: its source's images, the chosen indices, the transform."""
    source = getattr(dataset, "source", None)
    parts: list[object] = [type(source).__name__, repr(getattr(dataset, "transform", None))]
    if hasattr(source, "images"):
        parts.append(source.images)
    elif hasattr(source, "paths"):
        parts.append([(str(p), os.path.getsize(p), os.path.getmtime(p)) for p in source.paths])
    else:
        parts.append(len(dataset))
    parts.append(getattr(dataset, "indices", np.arange(len(dataset))))
    return fingerprint(*parts)


class FeatureStore:
    """In-memory (and optionally on-disk) cache of extracted features, keyed by content."""

    def __init__(self, directory: Optional[str] = None) -> None:
        self.directory = Path(directory).expanduser() if directory else None
        self._memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = {"memory": 0, "disk": 0, "computed": 0}

    def get(self, key: str, compute) -> tuple[torch.Tensor, torch.Tensor]:
        if key in self._memory:
            self.hits["memory"] += 1
            return self._memory[key]
        path = self.directory / f"{key}.pt" if self.directory else None
        if path is not None and path.is_file():
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
                self._memory[key] = (data["features"], data["targets"])
                self.hits["disk"] += 1
                log.info("lit-ft: reusing cached features %s", path)
                return self._memory[key]
            except Exception as err:  # a damaged cache file is recomputed, never trusted
                log.warning("lit-ft: ignoring unreadable feature cache %s (%s)", path, err)
        value = compute()
        self.hits["computed"] += 1
        self._memory[key] = value
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"features": value[0], "targets": value[1]}, tmp)
            os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache file
        return value


class FeatureCache:
    """Stands in cached pre-logits for a split's images while the plan trains only the head.

    Args:
        directory: also keep features on disk here (``feature_cache_dir``), keyed by content.
        views: with augmented training inputs, cache this many fixed augmented views (epoch
            e uses view e % views); 0 caches only deterministic inputs.
    """

    def __init__(self, directory: Optional[str] = None, views: int = 0) -> None:
        self.store = FeatureStore(directory)
        self.views = views
        self.warned: set[str] = set()

    def dataset_for(
        self,
        split: str,
        dataset: Dataset,
        *,
        backbone: nn.Module,
        head_keys: set[str],
        name: str,
        head_only: bool,
        epoch: int,
        batch_size: int,
        num_workers: int,
        seed: int,
        augmenting: bool,
        batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]],
        preprocessing: object,
    ) -> Optional[FeatureDataset]:
        """A :class:`FeatureDataset` to use instead of ``dataset``, or None to use the images.

        Args:
            split: ``train`` or ``val`` (other splits always use images).
            head_only: the plan trains only the head, with frozen BN, for the whole epoch.
            augmenting: the split's inputs are randomly augmented (training with augmentation).
            preprocessing: everything else that shapes the inputs (the resolved data config),
                part of the cache key.
        """
        if not head_only or split not in ("train", "val"):
            return None
        if augmenting and self.views == 0:
            if "augment" not in self.warned:
                log.info(
                    "lit-ft: cache_features is on but training inputs are augmented, so features are not "
                    "cached; set data.augment: false, or model.cache_views: N for N fixed augmented views"
                )
                self.warned.add("augment")
            return None
        view = epoch % self.views if augmenting else 0
        key = "-".join(
            (
                name,
                backbone_fingerprint(backbone, head_keys)[:16],
                fingerprint(dataset_fingerprint(dataset), repr(batch_transform), repr(preprocessing))[:16],
                f"v{view}-s{seed}" if augmenting else "v0",  # a view's augmentation draws are a function of the seed
            )
        )
        feats, targets = self.store.get(
            key,
            lambda: extract_pre_logits(backbone, dataset, batch_size, num_workers, (seed, view) if augmenting else None, batch_transform),
        )
        return FeatureDataset(feats, targets)

    def hook(self, module: Any) -> Callable[[str, Dataset], Optional[FeatureDataset]]:
        """The datamodule hook (``set_dataset_hook``) for ``module``, an ImageClassifier in a fit.

        Decides from the plan whether the epoch being loaded trains the head alone, with the
        run's steps per epoch computed from the training set (a step-unit plan may unfreeze
        mid-epoch, and Lightning does not know the number of batches yet when the first loader
        is built). Smoke runs and partial epochs (``fast_dev_run``, ``limit_*_batches``) use
        images: extracting every image would cost more than it saves.
        """
        from lit_ft.plan import TrainingPlan, steps_per_epoch  # plan -> freezing: imported late, no cycle
        from lit_ft.weights import classifier_keys

        def dataset_for_split(split: str, dataset: Dataset) -> Optional[FeatureDataset]:
            trainer = module.trainer
            dm = trainer.datamodule
            limit = trainer.limit_train_batches if split == "train" else trainer.limit_val_batches
            if trainer.state.fn != "fit" or trainer.fast_dev_run or limit != 1.0 or dm.train_dataset is None:
                return None
            per_rank = math.ceil(len(dm.train_dataset) / trainer.world_size)
            plan = TrainingPlan(module.freeze, steps_per_epoch(math.ceil(per_rank / dm.batch_size), trainer.accumulate_grad_batches))
            epoch = trainer.current_epoch
            augmenting = split == "train" and bool(dm.augment)
            return self.dataset_for(
                split,
                dataset,
                backbone=module.model,
                head_keys=set(classifier_keys(module.model)),
                name=module.hparams.backbone,
                head_only=plan.head_only(epoch),
                epoch=epoch,
                batch_size=dm.eval_batch_size,
                num_workers=dm.num_workers,
                seed=getattr(dm, "draw_seed", dm.seed),
                augmenting=augmenting,
                batch_transform=dm.batch_transform("train" if augmenting else "eval") if dm.batch_transforms else None,
                preprocessing=dm.resolved_data_config,
            )

        return dataset_for_split
