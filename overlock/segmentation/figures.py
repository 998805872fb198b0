"""Figures of the segment stage: predicted masks beside the ground truth, per-class IoU, the loss curve."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from overlock import figures
from overlock.figures import plt, save_figure

__all__ = ["palette", "colourise", "mask_panels", "per_class_iou_chart", "loss_curve"]


def palette(num_classes: int) -> np.ndarray:
    """``[K + 1, 3]`` uint8 colours: class ``k`` -> row ``k``, the ignore label (255) -> the last row (black)."""
    rng = np.random.default_rng(3)
    colours = rng.integers(40, 256, (num_classes, 3)).astype(np.uint8)
    return np.concatenate([colours, np.zeros((1, 3), np.uint8)])


def colourise(label: np.ndarray, colours: np.ndarray) -> np.ndarray:
    index = np.where(label == 255, len(colours) - 1, np.clip(label, 0, len(colours) - 2))
    return colours[index]


def mask_panels(samples: Sequence[dict], classes: Sequence[str], path: Path) -> Path | None:
    """One row per validation image: the image, the ground truth, the prediction (``samples``: dicts with
    ``image`` [H, W, 3] uint8, ``gt`` and ``pred`` [H, W], ``name``)."""
    if not samples:
        return None
    colours = palette(len(classes))
    fig, axes = plt.subplots(len(samples), 3, figsize=(7.5, 2.5 * len(samples)), squeeze=False)
    for row, s in zip(axes, samples):
        for ax, (title, img) in zip(row, (("image", s["image"]), ("ground truth", colourise(s["gt"], colours)),
                                          ("prediction", colourise(s["pred"], colours)))):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(f"{s['name']}: {title}" if title == "image" else title, fontsize=8)
            ax.axis("off")
    shown = classes[:20]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i] / 255) for i in range(len(shown))]
    fig.legend(handles, shown, loc="lower center", ncol=min(6, len(shown)), fontsize=7)
    fig.subplots_adjust(bottom=0.08)
    return save_figure(fig, path)


def per_class_iou_chart(names: Sequence[str], iou: Sequence[float], path: Path, limit: int = 60) -> Path:
    """Bar chart of the per-class IoU (the ``limit`` most frequent classes when there are more)."""
    names, iou = list(names)[:limit], [0.0 if not np.isfinite(v) else v for v in list(iou)[:limit]]
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(names) + 2), 3.2))
    ax.bar(range(len(names)), iou, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 8 else 0, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.set_title("segment: per-class IoU on val")
    return save_figure(fig, path)


def loss_curve(history: list[dict], path: Path) -> Path:
    """Training losses per iteration (or a note when the stage only evaluated)."""
    return figures.loss_curve(history, path, "segment",
                              is_loss=lambda k: k.startswith("loss") or k.endswith("loss_ce"))
