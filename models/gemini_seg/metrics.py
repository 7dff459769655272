"""Confusion-matrix scores as published (utils/meter.py): pixel accuracy, mean class accuracy, mIoU."""
from __future__ import annotations

from typing import Dict

import torch


def confusion_matrix(target: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth; labels >= num_classes (255) ignored."""
    keep = (target >= 0) & (target < num_classes)
    index = target[keep] * num_classes + prediction[keep]
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def scores(matrix: torch.Tensor) -> Dict[str, float]:
    """Percentages. Classes absent from both ground truth and prediction do not count in the means;
    a class absent from the ground truth but predicted has IoU 0 (and no accuracy), as published."""
    matrix = matrix.double()
    total = matrix.sum()
    if total == 0:
        return {"pixel_acc": 0.0, "mean_acc": 0.0, "miou": 0.0}
    hits = matrix.diag()
    per_class_acc = hits / matrix.sum(1)
    iou = hits / (matrix.sum(1) + matrix.sum(0) - hits)
    return {
        "pixel_acc": 100.0 * (hits.sum() / total).item(),
        "mean_acc": 100.0 * per_class_acc.nanmean().item(),
        "miou": 100.0 * iou.nanmean().item(),
    }
