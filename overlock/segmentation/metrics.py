"""Pixel metrics of a segmenter: IoU from a streamed confusion matrix, and pixel-wise temperature scaling.

mIoU / mAcc / aAcc follow mmsegmentation's definitions (fractions in [0, 1]; classes absent from both the
ground truth and the predictions are left out of the means). Calibration treats each labelled pixel as one
sample of a K-way classification: its logits (the decode head's output, resized to the image) and its
label. Pixels are sampled uniformly per image (``segment.calibration_pixels`` per split at most), the
temperature is fitted on the held-out calibration split only (``overlock.calibration.temperature``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from overlock.calibration.temperature import fit_temperature
from overlock.metrics.calibration import classification_calibration, reliability_bins, top1_confidence

__all__ = ["ConfusionMatrix", "PixelSampler", "calibrate_pixels"]

IGNORE = 255


class ConfusionMatrix:
    """``K x K`` counts (rows: ground truth, columns: prediction) over the labelled pixels."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.counts = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        valid = (gt != IGNORE) & (gt < self.num_classes)
        gt, pred = gt[valid].astype(np.int64), pred[valid].astype(np.int64)
        k = self.num_classes
        self.counts += np.bincount(gt * k + pred, minlength=k * k).reshape(k, k)

    def per_class(self) -> dict[str, np.ndarray]:
        tp = np.diag(self.counts).astype(np.float64)
        gt_total, pred_total = self.counts.sum(1), self.counts.sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = tp / (gt_total + pred_total - tp)
            acc = tp / gt_total
        return {"iou": iou, "acc": acc, "pixels": gt_total}

    def summary(self) -> dict[str, float]:
        pc = self.per_class()
        total = self.counts.sum()
        return {"mIoU": float(np.nanmean(pc["iou"])) if np.isfinite(pc["iou"]).any() else 0.0,
                "mAcc": float(np.nanmean(pc["acc"])) if np.isfinite(pc["acc"]).any() else 0.0,
                "aAcc": float(np.diag(self.counts).sum() / total) if total else 0.0}


class PixelSampler:
    """Collects the logits and labels of a uniform sample of labelled pixels, ``per_image`` per image."""

    def __init__(self, budget: int, images: int, seed: int = 0):
        self.per_image = max(1, math.ceil(budget / max(1, images)))
        self.rng = np.random.default_rng(seed)
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, gt: np.ndarray) -> None:
        """``logits``: ``[K, H, W]`` of one image; ``gt``: ``[H, W]`` with 255 = ignore."""
        index = np.flatnonzero((gt.reshape(-1) != IGNORE) & (gt.reshape(-1) < logits.shape[0]))
        if index.size > self.per_image:
            index = np.sort(self.rng.choice(index, self.per_image, replace=False))
        idx = torch.from_numpy(index)
        self.logits.append(logits.reshape(logits.shape[0], -1)[:, idx].T.float().cpu())
        self.labels.append(torch.from_numpy(gt.reshape(-1)[index].astype(np.int64)))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.logits:
            raise ValueError("no labelled pixels were sampled (empty split or every pixel unlabelled)")
        return torch.cat(self.logits), torch.cat(self.labels)


def calibrate_pixels(calibration: PixelSampler, val: PixelSampler, bins: int = 15, max_iter: int = 200) -> dict:
    """Fit ``T`` on the calibration split's pixels; ECE/NLL (and the rest) on val pixels before and after."""
    cal_logits, cal_labels = calibration.tensors()
    temperature = fit_temperature(cal_logits, cal_labels, split="calibration", max_iter=max_iter)
    logits, labels = val.tensors()
    before = classification_calibration(logits, labels, bins)
    after = classification_calibration(logits / temperature, labels, bins)
    diagram = {"before": reliability_bins(*top1_confidence(logits, labels), bins=bins),
               "after": reliability_bins(*top1_confidence(logits / temperature, labels), bins=bins)}
    return {"temperature": temperature, "before": before, "after": after, "bins": diagram,
            "pixels": {"calibration": int(cal_labels.numel()), "val": int(labels.numel())}}
