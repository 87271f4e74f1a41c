"""LightningModules."""

from lit_ft.models.classifier import ImageClassifier

__all__ = ["ImageClassifier"]
