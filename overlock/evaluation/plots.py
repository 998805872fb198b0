"""Figures of the evaluate stage (matplotlib, Agg backend), each saved as a PNG.

Every function takes the numbers to draw and an output path, labels its axes and title, and returns the path.
The calibrate stage's reliability diagrams live in ``overlock.calibration.plots``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

from overlock.figures import plt, save_figure


def confusion_matrix_plot(
    confusion: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    title: str = "Confusion matrix (validation)",
) -> Path:
    """Row-normalised confusion matrix with the counts written in the cells (for up to 30 classes)."""
    confusion = np.asarray(confusion, dtype=float)
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    k = len(class_names)
    side = min(max(4.5, 0.45 * k + 2.5), 22)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if k <= 30:
        ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(
                        j,
                        i,
                        int(confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return save_figure(fig, path)


def per_class_bar(
    names: Sequence[str], values: Sequence[float], path: Path, xlabel: str, title: str, max_items: int = 40
) -> Path:
    """Horizontal bars of a per-class number (accuracy or AP); the lowest ``max_items`` when there are more."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(np.nan_to_num(values, nan=-1))[:max_items][::-1]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(order) + 1.2)))
    ax.barh([str(names[i]) for i in order], np.nan_to_num(values[order]), color="#4c72b0")
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("class")
    ax.set_title(title if len(values) <= max_items else f"{title} (lowest {max_items} of {len(values)})")
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def training_curves(history: list[dict], path: Path, title: str = "Training curves") -> Path | None:
    """Loss and accuracy per epoch from ``history.json`` rows (keys containing 'loss' / 'top1'/'acc')."""
    if not history:
        return None
    x_key = "epoch" if "epoch" in history[0] else None
    xs = [row.get("epoch", i) for i, row in enumerate(history)] if x_key else list(range(len(history)))
    keys = sorted(
        {k for row in history for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}
    )
    loss_keys = [k for k in keys if "loss" in k]
    acc_keys = [k for k in keys if "top1" in k or "top5" in k or "acc" in k]
    if not loss_keys and not acc_keys:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k in loss_keys:
        ax1.plot(xs, [row.get(k, np.nan) for row in history], marker="o", label=k)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_title("loss")
    for k in acc_keys:
        ax2.plot(xs, [row.get(k, np.nan) for row in history], marker="o", label=k)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (as logged)")
    ax2.set_title("accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def erf_heatmap(erf: np.ndarray, path: Path, title: str, input_size: int) -> Path:
    """Log-scaled effective receptive field map (0..1) of the central output pixel."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(erf, cmap="RdYlGn", vmin=0, vmax=1, extent=(0, erf.shape[1], erf.shape[0], 0))
    fig.colorbar(im, ax=ax, label="log10(1 + |dy/dx|), normalised")
    ax.set_xlabel(f"input x (pixels, {input_size} px wide)")
    ax.set_ylabel("input y (pixels)")
    ax.set_title(title)
    return save_figure(fig, path)


def image_grid(
    images: Sequence[np.ndarray], titles: Sequence[str], path: Path, title: str, columns: int = 4
) -> Path:
    """RGB images (HxWx3, uint8 or 0..1 float) in a grid with a title each."""
    n = max(len(images), 1)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, name in zip(axes.flat, images, titles):
        ax.imshow(img)
        ax.set_title(name, fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def complexity_bars(rows: list[dict], path: Path) -> Path:
    """Throughput (img/s) and batch-1 latency (ms) of each measured form of the model."""
    names = [r["form"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
    ax1.barh(names, [r["throughput"] for r in rows], color="#4c72b0")
    ax1.set_xlabel("throughput (images/s, higher is better)")
    ax1.set_title("throughput")
    ax2.barh(names, [r["latency_ms"] for r in rows], color="#dd8452")
    ax2.set_xlabel("latency at batch 1 (ms, lower is better)")
    ax2.set_title("latency")
    for ax in (ax1, ax2):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Speed on this machine")
    return save_figure(fig, path)


def _draw_instances(ax, image: np.ndarray, instances: list[dict], color: str) -> None:
    from matplotlib.patches import Rectangle

    ax.imshow(image)
    overlay = np.zeros((*image.shape[:2], 4))
    for inst in instances:
        if inst.get("mask") is not None:
            overlay[np.asarray(inst["mask"]) > 0] = (*matplotlib.colors.to_rgb(color), 0.35)
        x, y, w, h = inst["bbox"]
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=1.5))
        ax.text(
            x,
            y,
            inst["label"],
            fontsize=7,
            color="white",
            va="bottom",
            bbox={"facecolor": color, "alpha": 0.7, "pad": 1, "edgecolor": "none"},
        )
    ax.imshow(overlay)
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")


def detection_pairs(rows: list[tuple], path: Path) -> Path:
    """One row per image: ground-truth boxes/masks (left) and predicted ones with scores (right).

    ``rows`` holds ``(name, image HxWx3, ground truth, predictions)``; each instance is a dict with
    ``bbox`` (x, y, w, h), ``label`` and an optional binary ``mask``.
    """
    fig, axes = plt.subplots(max(len(rows), 1), 2, figsize=(8, 3.8 * max(len(rows), 1)), squeeze=False)
    for (name, image, gts, preds), (ax_gt, ax_pred) in zip(rows, axes):
        _draw_instances(ax_gt, image, gts, "#2ca02c")
        ax_gt.set_title(f"{name}: ground truth ({len(gts)})", fontsize=9)
        _draw_instances(ax_pred, image, preds, "#d62728")
        ax_pred.set_title(f"{name}: predicted ({len(preds)})", fontsize=9)
    fig.suptitle("Detector on validation images: ground truth vs. predictions")
    return save_figure(fig, path)
