"""Calibration metrics of a classifier (and of binary detection scores).

ECE (``l1``) and MCE (``max``) come from torchmetrics' ``MulticlassCalibrationError`` /
``BinaryCalibrationError`` (equal-width bins over the top-1 confidence). Adaptive ECE (equal-mass bins),
which no library we use provides, and the reliability-diagram bins are computed here. Used by the calibrate
stage (fit and report) and the evaluate stage (the calibrated classifier on val).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

METRIC_NAMES = ("ece", "mce", "adaptive_ece", "nll", "brier", "top1")


def adaptive_ece(confidences: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-mass bins: samples sorted by confidence and split into ``bins`` groups of equal size."""
    conf = confidences.detach().double().cpu().numpy()
    hit = correct.detach().double().cpu().numpy()
    if conf.size == 0:
        return float("nan")
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for idx in np.array_split(order, min(bins, conf.size)):
        if idx.size:
            total += idx.size * abs(hit[idx].mean() - conf[idx].mean())
    return float(total / conf.size)


def reliability_bins(confidences: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> list[dict]:
    """Equal-width bins over [0, 1]: mean confidence, accuracy and count of each non-empty bin.

    Bin ``i`` holds confidences in ``[i/bins, (i+1)/bins)`` (the last bin also holds 1), as torchmetrics bins.
    """
    conf = confidences.detach().double().cpu()
    hit = correct.detach().double().cpu()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, bins - 1)
    rows = []
    for i in range(bins):
        mask = index == i
        n = int(mask.sum())
        if n:
            rows.append(
                {
                    "bin": i,
                    "lower": float(edges[i]),
                    "upper": float(edges[i + 1]),
                    "confidence": float(conf[mask].mean()),
                    "accuracy": float(hit[mask].mean()),
                    "count": n,
                }
            )
    return rows


def classification_calibration(
    logits: torch.Tensor, labels: torch.Tensor, bins: int = 15
) -> dict[str, float]:
    """ECE, MCE (``bins`` equal-width bins), adaptive ECE, NLL, Brier score and top-1 of ``logits``.

    Brier is the multiclass form: mean over samples of ``sum_k (p_k - y_k)^2`` (0 is perfect, 2 the worst).
    """
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("no samples to compute calibration metrics on (empty split?)")
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu()
    num_classes = logits.shape[1]
    probs = logits.softmax(dim=1)
    conf, pred = probs.max(dim=1)
    correct = pred.eq(labels)
    ece = MulticlassCalibrationError(num_classes=num_classes, n_bins=bins, norm="l1")(probs, labels)
    mce = MulticlassCalibrationError(num_classes=num_classes, n_bins=bins, norm="max")(probs, labels)
    brier = (probs - F.one_hot(labels, num_classes).float()).pow(2).sum(dim=1).mean()
    return {
        "ece": float(ece),
        "mce": float(mce),
        "adaptive_ece": adaptive_ece(conf, correct, bins),
        "nll": float(F.cross_entropy(logits, labels)),
        "brier": float(brier),
        "top1": float(correct.float().mean()),
    }


def top1_confidence(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 softmax confidence, whether the top-1 class is right) per sample."""
    probs = logits.detach().float().cpu().softmax(dim=1)
    conf, pred = probs.max(dim=1)
    return conf, pred.eq(labels.detach().long().cpu())


def binary_calibration(scores: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """ECE/MCE/adaptive ECE, NLL and Brier of binary scores (e.g. detection scores vs. IoU-matched)."""
    scores = torch.as_tensor(scores, dtype=torch.float64).cpu()
    target = torch.as_tensor(correct).long().cpu()
    if scores.numel() == 0:
        return {k: float("nan") for k in ("ece", "mce", "adaptive_ece", "nll", "brier", "precision")}
    p = scores.clamp(1e-7, 1 - 1e-7)
    return {
        "ece": float(BinaryCalibrationError(n_bins=bins, norm="l1")(scores.float(), target)),
        "mce": float(BinaryCalibrationError(n_bins=bins, norm="max")(scores.float(), target)),
        "adaptive_ece": adaptive_ece(scores, target, bins),
        "nll": float(F.binary_cross_entropy(p, target.double())),
        "brier": float((scores - target.double()).pow(2).mean()),
        "precision": float(target.double().mean()),
    }
