"""Classification metrics of the evaluate stage: top-k accuracy, confusion matrix, per-class accuracy.

Loading the classifier and collecting its logits live in ``overlock.inference.classifier``.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose label is among the ``k`` highest logits (k clipped to the class count)."""
    k = min(k, logits.shape[1])
    return float(logits.topk(k, dim=1).indices.eq(labels[:, None]).any(dim=1).float().mean())


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Counts [true class, predicted class] (torchmetrics)."""
    return multiclass_confusion_matrix(logits.argmax(1), labels, num_classes=logits.shape[1])


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Recall of each class from a confusion matrix (NaN for classes without samples)."""
    totals = confusion.sum(dim=1).double()
    return [float(confusion[i, i] / totals[i]) if totals[i] else float("nan") for i in range(len(totals))]
