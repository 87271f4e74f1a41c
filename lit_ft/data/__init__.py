"""Datamodules for lit-ft: class folders, torchvision's classic datasets, and synthetic data.

All yield ``(images [B, 3, H, W] float32, targets [B] int64)`` batches built with timm
transforms from the model's data config, and ``(images, ids)`` when predicting.
"""

from lit_ft.data.base import BaseImageDataModule
from lit_ft.data.builtin import TorchvisionDataModule
from lit_ft.data.folder import ImageFolderDataModule
from lit_ft.data.synthetic import SyntheticDataModule

__all__ = ["BaseImageDataModule", "ImageFolderDataModule", "TorchvisionDataModule", "SyntheticDataModule"]
