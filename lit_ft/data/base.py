"""Options, splits, transforms and dataloaders shared by every lit-ft datamodule.

Owns: the data options, the splits, the transforms built from a data config and the
dataloaders. Must not touch: the model. It reads the module's public ``data_config`` (duck
typing, no import of ``lit_ft.models``); whatever else wants to change what a loader serves
(e.g. the feature cache) registers through :meth:`BaseImageDataModule.set_dataset_hook` and
reads the public options (``eval_batch_size``, ``seed``, ``augment``, ``num_workers``,
``batch_transform(kind)``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset

from lit_ft.data.corruptions import Shift, ShiftedDataset
from lit_ft.data.datasets import FileSource, ImageSource, TransformedDataset, collate_with_ids
from lit_ft.data.images import IMAGE_EXTENSIONS
from lit_ft.data.resumable import ResumableDataLoader
from lit_ft.data.scan import BadImages, list_files, report_ignored, report_repeated, verify_images
from lit_ft.data.seeding import EpochSeededDataset
from lit_ft.data.splits import count_for, split_off, stratified_sample
from lit_ft.data.batch_transforms import BatchTransform, RawUint8
from lit_ft.data.transforms import Augmentation, ImageTransform, check_auto_augment, resolve_data_config
from lit_ft.errors import UserError

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
#: ``hook(split, dataset) -> replacement or None``, see :meth:`BaseImageDataModule.set_dataset_hook`.
DatasetHook = Callable[[str, Dataset], Optional[Dataset]]
_NOT_LOADED = object()


class BaseImageDataModule(LightningDataModule):
    """Image classification data for timm backbones: splits, transforms and dataloaders.

    Subclasses provide the images of each split (:meth:`_load_source`) and the class list
    (:meth:`_set_classes` in their ``__init__``). This class holds out validation images when
    the data has no validation split, subsamples training data, builds timm transforms from the
    model's data config (user options win), and makes the dataloaders. On its own it is a
    predict-only datamodule for ``predict_dir``.

    Batches are ``(images, targets)`` (``float32 [B, C, H, W]``, ``int64 [B]``) for
    train/val/test and ``(images, ids)`` for predict, where ``ids`` is a list of strings: the
    path relative to ``predict_dir``, or the test split's sample id (the file's path relative to
    its folder, or the index in the dataset).

    For other components (the feature cache, notebooks) the public surface is: the options
    ``eval_batch_size`` (always an int), ``seed``, ``augment``, ``num_workers``, the on-device
    transforms :meth:`batch_transform`, the datasets ``train_dataset``/``val_dataset``/...
    after :meth:`setup`, and one hook to swap a split's dataset, :meth:`set_dataset_hook`.

    Args:
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size; defaults to ``batch_size``.
        num_workers: dataloader worker processes (0 loads in the main process).
        pin_memory: pin batches in page-locked memory; ``None`` pins when CUDA is available.
        persistent_workers: keep workers alive between epochs (only used when ``num_workers > 0``).
        image_size: square input size; overrides the model's data config.
        mean: per-channel normalisation mean; overrides the model's data config.
        std: per-channel normalisation std; overrides the model's data config.
        interpolation: resize interpolation; overrides the model's data config.
        crop_pct: eval center-crop fraction (resize to ``image_size / crop_pct``, then crop);
            overrides the model's data config.
        train_subset: use only part of the training images: an int is a number of images, a
            float in (0, 1] a fraction. Seeded and stratified by class; applied after the
            validation images are held out.
        val_split: when the data has no validation split, hold out this many training images
            (int) or this fraction of them (float in [0, 1)); seeded and stratified. 0 disables
            validation.
        seed: seed for the validation split, the training subset, the shuffling order and the
            augmentation draws.
        shuffle_seed: a seed for the shuffling order and the augmentation draws only (None:
            ``seed``): runs that share the split and the subset but see the data in another
            order, e.g. ingredients of a model soup (``seed_everything`` changes neither).
        hflip: probability of a horizontal flip (training).
        vflip: probability of a vertical flip (training).
        scale: area range of timm's random-resized crop (training).
        ratio: aspect-ratio range of the random-resized crop (training).
        auto_augment: timm auto-augment policy, e.g. ``"rand-m9-mstd0.5"`` (training).
        color_jitter: colour jitter strength; 0 disables it (training).
        re_prob: random-erasing probability (training).
        augment: False trains on the deterministic eval transform (no augmentation at all).
        grayscale_to_rgb: repeat 1-channel images to 3 channels (timm backbones expect 3).
            False keeps them 1-channel (for backbones created with ``in_chans=1``).
        class_names: names of the classes, replacing the dataset's; with only ``predict_dir``
            it is the class list (e.g. to name predictions).
        predict_dir: folder of images (searched recursively) to predict on; ``None`` predicts
            on the test split.
        batch_transforms: for in-memory datasets (torchvision/synthetic), ship raw uint8 batches
            and resize, crop, flip and normalise the whole batch on the training device
            (supports ``scale``, ``ratio``, ``hflip``, ``vflip``), so the CPU image pipeline is
            not the bottleneck on a GPU.
        shift: test under distribution shift: the test split's images corrupted on the fly
            (ImageNet-C style, deterministic), e.g. ``{corruption: gaussian_noise, severity: 3}``;
            see :mod:`lit_ft.data.corruptions`. Only the test split changes; the attribute
            ``shift`` is read each time a test dataloader is made, so one datamodule can serve
            a whole grid of corruptions (:mod:`lit_ft.robustness`).
    """

    # Which files count as images in predict_dir and what happens to unreadable ones;
    # ImageFolderDataModule makes both options.
    _extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    _bad_images: BadImages = "error"
    # Whether a missing validation split is made by holding out `val_split` of train.
    _val_from_train: bool = True

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = False,
        image_size: Optional[int] = None,
        mean: Optional[tuple[float, float, float]] = None,
        std: Optional[tuple[float, float, float]] = None,
        interpolation: Optional[Literal["bilinear", "bicubic", "nearest"]] = None,
        crop_pct: Optional[float] = None,
        train_subset: Optional[Union[int, float]] = None,
        val_split: Union[int, float] = 0.1,
        seed: int = 42,
        shuffle_seed: Optional[int] = None,
        hflip: float = 0.5,
        vflip: float = 0.0,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        auto_augment: Optional[str] = None,
        color_jitter: float = 0.0,
        re_prob: float = 0.0,
        augment: bool = True,
        grayscale_to_rgb: bool = True,
        class_names: Optional[list[str]] = None,
        predict_dir: Optional[str] = None,
        batch_transforms: bool = False,
        shift: Optional[Shift] = None,
    ) -> None:
        super().__init__()
        train_subset, val_split = _as_count(train_subset), _as_count(val_split)
        _check_options(locals())
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size  # type: ignore[assignment]  # property: None follows batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.image_size = image_size
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.interpolation = interpolation
        self.crop_pct = crop_pct
        self.train_subset = train_subset
        self.val_split = val_split
        self.seed = seed
        self.shuffle_seed = shuffle_seed
        self.augmentation = Augmentation(
            scale=tuple(scale), ratio=tuple(ratio), hflip=hflip, vflip=vflip,
            auto_augment=auto_augment, color_jitter=color_jitter, re_prob=re_prob,
        )
        self.augment = augment
        self.grayscale_to_rgb = grayscale_to_rgb
        self.predict_dir = predict_dir
        self.batch_transforms = batch_transforms
        self.shift = shift
        if batch_transforms and (auto_augment or color_jitter or re_prob):
            raise UserError(
                "batch_transforms supports scale, ratio, hflip and vflip only, not auto_augment, color_jitter or re_prob",
                "drop those options or set batch_transforms: false",
            )
        self._batch_tf: dict[str, Any] = {}
        self._dataset_hook: Optional[DatasetHook] = None
        self._class_names_arg = list(class_names) if class_names is not None else None
        self._classes: Optional[list[str]] = None
        self._model_data_config: Optional[dict[str, Any]] = None
        self._resolved: Optional[dict[str, Any]] = None
        self._eval_tf: Optional[Any] = None
        self._sources: dict[str, Any] = {}
        self._train_val: Optional[tuple[Optional[np.ndarray], Optional[np.ndarray]]] = None
        self.train_dataset: Optional[TransformedDataset] = None
        self.val_dataset: Optional[TransformedDataset] = None
        self.test_dataset: Optional[TransformedDataset] = None
        self.predict_dataset: Optional[TransformedDataset] = None
        #: unreadable files dropped per split (``bad_images: skip``), e.g. ``{"train": 2}``
        self.skipped_files: dict[str, int] = {}
        #: files passed over for their extension, per split
        self.ignored_files: dict[str, int] = {}
        if predict_dir is not None and not Path(predict_dir).expanduser().is_dir():
            raise UserError(f"predict_dir {predict_dir} does not exist or is not a folder", "point predict_dir at a folder of images")

    # ------------------------------------------------------------------ public options

    @property
    def eval_batch_size(self) -> int:
        """Validation/test/predict batch size: the ``eval_batch_size`` option, else ``batch_size``
        (read at each call, so it follows a ``batch_size`` changed later, e.g. by a tuner)."""
        return self._eval_batch_size_opt if self._eval_batch_size_opt is not None else self.batch_size

    @eval_batch_size.setter
    def eval_batch_size(self, value: Optional[int]) -> None:
        self._eval_batch_size_opt = value

    def set_dataset_hook(self, hook: Optional[DatasetHook]) -> None:
        """Let ``hook`` swap the dataset a train/val dataloader serves; ``None`` removes it.

        ``hook(split, dataset)`` is called with ``split`` ``"train"`` or ``"val"`` and that
        split's dataset each time :meth:`train_dataloader`/:meth:`val_dataloader` builds a
        loader (in ``fit`` that is at the start and whenever Lightning reloads them, e.g. with
        ``reload_dataloaders_every_n_epochs``). A non-``None`` return replaces the dataset for
        that loader only (same batch size, workers and shuffling order; training augmentation
        seeding is not applied to it); ``None`` keeps it. One hook at a time: the data must not
        depend on an order of several swappers. The feature cache uses this to serve
        pre-computed backbone features during a linear probe.
        """
        if hook is not None and not callable(hook):
            raise TypeError(f"the dataset hook must be callable or None, got {type(hook).__name__}")
        self._dataset_hook = hook

    # ------------------------------------------------------------------ classes

    @property
    def class_names(self) -> Optional[list[str]]:
        """Class names in label order (``None`` for predict-only data without ``class_names``)."""
        if self._classes is not None:
            return list(self._classes)
        return list(self._class_names_arg) if self._class_names_arg is not None else None

    @property
    def num_classes(self) -> Optional[int]:
        """Number of classes (``None`` when unknown, see :attr:`class_names`)."""
        names = self.class_names
        return len(names) if names is not None else None

    def _set_classes(self, names: list[str]) -> None:
        """Set the dataset's class list; the ``class_names`` option renames it (same length)."""
        override = self._class_names_arg
        if override is not None and len(override) != len(names):
            raise UserError(
                f"class_names has {len(override)} names but the data has {len(names)} classes ({_short(names)})",
                f"give exactly {len(names)} names in label order, or drop class_names",
            )
        self._classes = list(override) if override is not None else list(names)

    # ------------------------------------------------------------------ data config

    def set_data_config(self, cfg: Mapping[str, Any]) -> None:
        """Use the model's timm data config (``input_size``, ``interpolation``, ``mean``, ``std``,
        ``crop_pct``, ``crop_mode``) for the transforms; call before :meth:`setup`.

        User options (``image_size``, ``mean``, ...) still take precedence.
        """
        self._model_data_config = dict(cfg)

    @property
    def resolved_data_config(self) -> dict[str, Any]:
        """The data config the transforms use: the one fixed at :meth:`setup`, or what it
        would be now (model config from :meth:`set_data_config` or the trainer's module, else
        timm defaults, then user overrides)."""
        if self._resolved is not None:
            return dict(self._resolved)
        return resolve_data_config(
            self._model_config(), image_size=self.image_size, mean=self.mean, std=self.std,
            interpolation=self.interpolation, crop_pct=self.crop_pct,
        )

    def _model_config(self) -> Optional[Mapping[str, Any]]:
        if self._model_data_config is not None:
            return self._model_data_config
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        cfg = getattr(module, "data_config", None)
        if callable(cfg):
            cfg = cfg()
        return cfg if isinstance(cfg, Mapping) else None

    # ------------------------------------------------------------------ sources and splits

    def _load_source(self, split: Split) -> Optional[ImageSource]:
        """The images of ``split`` as the data provides them, or ``None`` if it has none.

        Called at most once per split; ``"val"`` returning ``None`` makes the validation set a
        ``val_split`` hold-out of ``"train"`` (unless the class sets ``_val_from_train = False``).
        """
        return None

    def _missing_hint(self, split: str) -> str:
        """How to provide ``split`` data (for the error when a stage needs it)."""
        return "use a datamodule that has this split"

    def _source(self, split: str) -> Optional[ImageSource]:
        source = self._sources.get(split, _NOT_LOADED)
        if source is _NOT_LOADED:
            source = self._load_predict_source() if split == "predict" else self._load_source(split)  # type: ignore[arg-type]
            self._sources[split] = source
        return source

    def _train_val_indices(self) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """Indices into the train source for training and (if held out) validation."""
        if self._train_val is None:
            train = self._source("train")
            if train is None:
                self._train_val = (None, None)
                return self._train_val
            kept, held = np.arange(len(train)), None
            if self._val_from_train and self._source("val") is None:
                n_val = count_for(self.val_split, len(train), "val_split")
                if n_val:
                    kept, held = split_off(train.targets, n_val, self.seed)
            if self.train_subset is not None:
                n = count_for(self.train_subset, len(kept), "train_subset")
                kept = kept[stratified_sample(train.targets[kept], n, self.seed)]
            self._train_val = (kept, held)
        return self._train_val

    def _dataset(self, split: str, transform: ImageTransform) -> Optional[TransformedDataset]:
        if split == "train":
            kept, _ = self._train_val_indices()
            return None if kept is None else TransformedDataset(self._source("train"), kept, transform)
        if split == "val":
            val = self._source("val")
            if val is not None:
                return TransformedDataset(val, None, transform)
            _, held = self._train_val_indices()
            return None if held is None else TransformedDataset(self._source("train"), held, transform)
        if split == "test":
            test = self._source("test")
            return None if test is None else TransformedDataset(test, None, transform)
        source = self._source("predict") if self.predict_dir is not None else self._source("test")
        return None if source is None else TransformedDataset(source, None, transform, with_ids=True)

    def _load_predict_source(self) -> FileSource:
        root = Path(self.predict_dir).expanduser()  # type: ignore[arg-type]
        listing = list_files(root, self._extensions)
        report_ignored(listing.ignored, f"predict_dir {root}", self._extensions)
        report_repeated(listing, f"predict_dir {root}")
        self.ignored_files["predict"] = len(listing.ignored)
        if not listing.images:
            raise UserError(
                f"no images in predict_dir {root}",
                f"put image files ({', '.join(self._extensions)}) in it (subfolders are searched)",
            )
        good, bad = verify_images(listing.images, self._bad_images, f"predict_dir {root}")
        self.skipped_files["predict"] = len(bad)
        if not good:
            raise UserError(f"none of the {len(bad)} images in predict_dir {root} can be read", "check the files")
        return FileSource(good, None, root)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: Optional[str] = None) -> None:
        """Resolve the data config, build the transforms and the datasets ``stage`` needs.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``None`` (all that exist).
        """
        self._resolved = None
        self._resolved = self.resolved_data_config
        eval_tf = ImageTransform(self._resolved, None, self.grayscale_to_rgb)
        train_tf = ImageTransform(self._resolved, self.augmentation, self.grayscale_to_rgb) if self.augment else eval_tf
        if self.batch_transforms:
            # Datasets yield raw uint8; on_after_batch_transfer does the rest on the device.
            self._batch_tf = {
                "eval": BatchTransform(self._resolved, None, self.grayscale_to_rgb),
                "train": BatchTransform(self._resolved, self.augmentation if self.augment else None, self.grayscale_to_rgb),
            }
            eval_tf = train_tf = RawUint8()
        self._eval_tf = eval_tf
        if stage in ("fit", None):
            self.train_dataset = self._dataset("train", train_tf)
            if self.train_dataset is None and stage == "fit":
                raise UserError(f"{type(self).__name__} has no training data", self._missing_hint("train"))
        if stage in ("fit", "validate", None):
            self.val_dataset = self._dataset("val", eval_tf)
            if self.val_dataset is None and stage == "validate":
                raise UserError(f"{type(self).__name__} has no validation data", self._missing_hint("val"))
        if stage in ("test", None):
            self.test_dataset = self._dataset("test", eval_tf)
            if self.test_dataset is None and stage == "test":
                raise UserError(f"{type(self).__name__} has no test data", self._missing_hint("test"))
        if stage in ("predict", None):
            self.predict_dataset = self._dataset("predict", eval_tf)
            if self.predict_dataset is None and stage == "predict":
                raise UserError(f"{type(self).__name__} has nothing to predict on", "set predict_dir to a folder of images")
        if self.batch_transforms:
            for ds in (self.train_dataset, self.val_dataset, self.test_dataset, self.predict_dataset):
                if ds is not None and not hasattr(ds.source, "raw"):
                    raise UserError(
                        f"batch_transforms needs images held in memory, but {type(self).__name__} reads files",
                        "use it with TorchvisionDataModule or SyntheticDataModule, or set batch_transforms: false",
                    )
        sizes = {
            name: len(ds)
            for name, ds in (("train", self.train_dataset), ("val", self.val_dataset),
                             ("test", self.test_dataset), ("predict", self.predict_dataset))
            if ds is not None
        }
        log.info("%s (stage=%s): %s images, %s classes, input %s", type(self).__name__, stage, sizes,
                 self.num_classes, self._resolved["input_size"])

    @property
    def draw_seed(self) -> int:
        """The seed of the shuffling order and the augmentation draws: ``shuffle_seed``, else ``seed``."""
        return self.seed if self.shuffle_seed is None else self.shuffle_seed

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the order and the augmentation are functions of ``(draw_seed, epoch)``.

        With augmentation, each sample is transformed under RNGs seeded from ``(draw_seed, epoch,
        sample index)`` (:class:`~lit_ft.data.seeding.EpochSeededDataset`), so the batches do
        not depend on ``num_workers``, persistent workers or where a run was resumed. With
        ``batch_transforms`` such batches are ``(uint8 images, targets, uniforms [B, 6])``
        until :meth:`on_after_batch_transfer` turns them into ``(images, targets)``.
        """
        dataset = self._require(self.train_dataset, "train", "fit")
        swapped = self._swap_dataset("train", dataset)
        if swapped is not dataset or not self.augment:
            return self._loader(swapped, self.batch_size, shuffle=True)
        uniforms = BatchTransform.UNIFORMS if self.batch_transforms else 0
        return self._loader(EpochSeededDataset(dataset, self.draw_seed, uniforms), self.batch_size, shuffle=True, epoch_keys=True)

    def val_dataloader(self) -> Union[DataLoader, list]:
        """Validation batches, or ``[]`` (Lightning then skips validation) when there is none."""
        if self.val_dataset is None:
            return []
        return self._loader(self._swap_dataset("val", self.val_dataset), self.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``batch_transforms``, turn raw uint8 batches into model inputs on the device."""
        if not self._batch_tf:
            return batch
        if len(batch) == 3:  # a training batch that carries its samples' augmentation draws
            x, y, uniforms = batch
            return self.batch_transform("train")(x, uniforms), y
        x, rest = batch
        trainer = getattr(self, "trainer", None)
        training = trainer is not None and trainer.training
        return self.batch_transform("train" if training else "eval")(x), rest

    def batch_transform(self, kind: str) -> Any:
        """The on-device transform for ``train``/``eval`` batches (identity without ``batch_transforms``)."""
        return self._batch_tf.get(kind, lambda x: x)

    def _swap_dataset(self, split: str, dataset: Dataset) -> Dataset:
        """What the ``split`` loader serves: the dataset hook's replacement, else ``dataset``."""
        if self._dataset_hook is not None:
            replacement = self._dataset_hook(split, dataset)
            return dataset if replacement is None else replacement
        return dataset

    def test_dataloader(self) -> DataLoader:
        """Test batches; with :attr:`shift` set, the corrupted (sub)set it describes."""
        dataset = self._require(self.test_dataset, "test", "test")
        if self.shift is not None:
            if self.batch_transforms:
                raise UserError("data.shift corrupts normalised images, not the raw batches of batch_transforms",
                                "set data.batch_transforms: false to test under shift")
            dataset = ShiftedDataset(dataset, self.shift, self._resolved["mean"], self._resolved["std"], dataset.targets)
        return self._loader(dataset, self.eval_batch_size, shuffle=False)

    def eval_dataloader(self, split: Split = "train", limit: Optional[int] = None) -> DataLoader:
        """``split``'s images under the deterministic eval transform (no augmentation), in a fixed order.

        For passes that must see the data as evaluation does, e.g. recomputing BatchNorm
        statistics on the training images after averaging weights (:mod:`lit_ft.weight_space`).
        Call :meth:`setup` for the split first. The dataset hook is not applied; with
        ``batch_transforms`` the batches are raw: pass them through ``batch_transform("eval")``.

        Args:
            split: ``train``, ``val`` or ``test``.
            limit: at most this many images, a random sample drawn from ``seed`` (so that a
                class-sorted folder still gives a mix of classes).
        """
        dataset = {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}.get(split)
        dataset = self._require(dataset, split, "test" if split == "test" else "fit")
        view: Dataset = TransformedDataset(dataset.source, dataset.indices, self._eval_tf)
        if limit is not None and limit < len(view):
            order = torch.randperm(len(view), generator=torch.Generator().manual_seed(self.seed))
            view = Subset(view, sorted(order[:limit].tolist()))
        return self._loader(view, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """``(images, ids)`` batches from ``predict_dir`` or the test split."""
        dataset = self._require(self.predict_dataset, "predict", "predict")
        return self._loader(dataset, self.eval_batch_size, shuffle=False)

    # ------------------------------------------------------------------ helpers

    def _require(self, dataset: Optional[TransformedDataset], split: str, stage: str) -> TransformedDataset:
        if dataset is None:
            if self._resolved is None:
                raise RuntimeError(f"call setup({stage!r}) before asking for the {split} dataloader")
            hint = "set predict_dir to a folder of images" if split == "predict" else self._missing_hint(split)
            raise UserError(f"{type(self).__name__} has no {split} data", hint)
        return dataset

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, epoch_keys: bool = False) -> DataLoader:
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        # The shuffle order is a function of (seed, epoch): Lightning calls set_epoch() on the
        # sampler, so a run resumed at epoch k sees the same order as an uninterrupted one.
        # With epoch_keys the sampler yields (epoch, index) for an EpochSeededDataset.
        sampler = EpochShuffleSampler(len(dataset), self.draw_seed, with_epoch=epoch_keys) if shuffle else None
        # Training resumes mid-epoch at the right batch (ResumableDataLoader, Lightning's stateful loaders).
        loader_cls = ResumableDataLoader if shuffle else DataLoader
        return loader_cls(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=False,
            generator=torch.Generator().manual_seed(self.draw_seed) if shuffle else None,
            collate_fn=collate_with_ids if getattr(dataset, "with_ids", False) else None,
        )


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A random permutation that depends only on ``(seed, epoch)``.

    Args:
        n: dataset length.
        seed: shuffling seed.
        with_epoch: yield ``(epoch, index)`` instead of ``index``, for datasets whose items
            depend on the epoch (:class:`~lit_ft.data.seeding.EpochSeededDataset`): the key is
            the only way the epoch reaches worker processes.
    """

    def __init__(self, n: int, seed: int, with_epoch: bool = False) -> None:
        self.n, self.seed, self.epoch, self.with_epoch = n, seed, 0, with_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.with_epoch:
            return iter([(self.epoch, i) for i in order])
        return iter(order)

    def __len__(self) -> int:
        return self.n


def _as_count(value: Any) -> Any:
    """YAML/CLI parsing may hand over 15000 as 15000.0: a whole number above 1 is a count."""
    if isinstance(value, float) and value > 1 and value.is_integer():
        return int(value)
    return value


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _check_options(opts: Mapping[str, Any]) -> None:
    """Raise a :class:`UserError` for out-of-range options, naming the option."""

    def bad(name: str, rule: str) -> None:
        raise UserError(f"{name}={opts[name]!r} is invalid: {rule}", f"set {name} to a value where {rule}")

    for name in ("batch_size", "eval_batch_size", "image_size"):
        if opts[name] is not None and opts[name] < 1:
            bad(name, "it is >= 1")
    if opts["num_workers"] < 0:
        bad("num_workers", "it is >= 0")
    if opts["crop_pct"] is not None and not 0 < opts["crop_pct"] <= 1:
        bad("crop_pct", "0 < crop_pct <= 1")
    for name in ("hflip", "vflip", "re_prob"):
        if not 0 <= opts[name] <= 1:
            bad(name, f"0 <= {name} <= 1")
    if opts["color_jitter"] < 0:
        bad("color_jitter", "it is >= 0")
    for name in ("mean", "std"):
        if opts[name] is not None and len(opts[name]) != 3:
            bad(name, "it has 3 values (R, G, B)")
    if opts["std"] is not None and min(opts["std"]) <= 0:
        bad("std", "every value is > 0")
    lo, hi = opts["scale"]
    if not 0 < lo <= hi <= 1:
        bad("scale", "0 < min <= max <= 1")
    lo, hi = opts["ratio"]
    if not 0 < lo <= hi:
        bad("ratio", "0 < min <= max")
    subset = opts["train_subset"]
    if subset is not None:
        if isinstance(subset, bool) or (isinstance(subset, int) and subset < 1):
            bad("train_subset", "an int is >= 1 (a number of images)")
        if isinstance(subset, float) and not 0 < subset <= 1:
            bad("train_subset", "a float is in (0, 1] (a fraction)")
    val_split = opts["val_split"]
    if isinstance(val_split, bool) or (isinstance(val_split, int) and val_split < 0):
        bad("val_split", "an int is >= 0 (a number of images)")
    if isinstance(val_split, float) and not 0 <= val_split < 1:
        bad("val_split", "a float is in [0, 1) (a fraction)")
    if opts["auto_augment"]:
        check_auto_augment(opts["auto_augment"])
