"""Tiny fine-tuned runs from one shared starting point, for the soup / WiSE-FT / robustness tests.

The "pretrained" weights are a saved random ``test_resnet`` (or ``test_vit``) with a 10-class
head: loading them into a 4-class model leaves a fresh (zero) head, as with real pretrained
weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import timm
import torch

from lit_ft import ImageClassifier
from lit_ft.callbacks.lp_head import LinearProbeHead
from tests.helpers import tiny_data, trainer

CLASSES = [f"class_{i}" for i in range(4)]


def pretrained_file(root: Path, backbone: str = "test_resnet", seed: int = 123) -> str:
    path = Path(root) / f"{backbone}-pretrained-{seed}.pth"
    if not path.exists():
        torch.manual_seed(seed)
        torch.save(timm.create_model(backbone, num_classes=10).state_dict(), path)
    return str(path)


def train_run(
    root: Path,
    name: str,
    pretrained,
    backbone: str = "test_resnet",
    lr: float = 0.05,
    seed: int = 0,
    epochs: int = 2,
    freeze=None,
    data_seed: int = 0,
    difficulty: str = "easy",
    classes: Optional[list[str]] = None,
) -> Path:
    """Fine-tune ``backbone`` from ``pretrained`` on synthetic data; a full lit-ft checkpoint."""
    L.seed_everything(seed, verbose=False)
    model = ImageClassifier(
        backbone, pretrained=pretrained, num_classes=len(classes or CLASSES), class_names=classes or CLASSES, freeze=freeze,
        optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
    )
    dm = tiny_data(seed=data_seed, difficulty=difficulty, num_classes=len(classes or CLASSES))
    tr = trainer(root / name, max_epochs=epochs, callbacks=[LinearProbeHead()])
    tr.fit(model, datamodule=dm)
    path = Path(root) / f"{name}.ckpt"
    tr.save_checkpoint(path)
    return path
