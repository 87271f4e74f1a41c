"""The classification metrics of validation and test, as one torchmetrics collection."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


def classification_metrics(num_classes: int, top_k: int = 5) -> MetricCollection:
    """Accuracy, top-k accuracy, macro precision/recall/F1 and the expected calibration error.

    They are fed probabilities (not logits): torchmetrics takes inputs inside [0, 1] as
    probabilities, and a zero-initialised head's logits are all 0.
    """
    k = min(top_k, num_classes)
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            f"acc_top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "ece": MulticlassCalibrationError(num_classes, n_bins=15, norm="l1"),  # expected calibration error
        },
        # Explicit groups: torchmetrics' automatic grouping compares states after the first
        # batch and merges top-k with top-1 metrics when that batch happens to be all correct.
        compute_groups=[["acc"], [f"acc_top{k}"], ["precision", "recall", "f1"], ["ece"]],
    )
