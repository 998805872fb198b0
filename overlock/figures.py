"""Saving matplotlib figures (Agg backend, no display needed) the same way in every stage."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)

__all__ = ["DPI", "plt", "save_figure", "loss_curve"]

DPI = 110


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, save it as ``path`` (parents created) on white, close it; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, facecolor="white")
    plt.close(fig)
    return path


def loss_curve(history: list[dict], path: Path, stage: str, is_loss=lambda key: key.startswith("loss")) -> Path:
    """Training losses per iteration of an mmdet/mmseg run (``history``: rows with ``iter`` and the loss terms
    ``is_loss`` picks; ``loss`` drawn thicker), or a note when ``stage`` only evaluated."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    terms = sorted({k for r in history for k in r if is_loss(k)})
    for k in terms:
        pts = [(r["iter"], r[k]) for r in history if k in r]
        ax.plot(*zip(*pts), label=k, lw=2 if k == "loss" else 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(f"{stage}: training losses")
    if terms:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"no training ({stage}.mode=evaluate)", ha="center", transform=ax.transAxes)
    return save_figure(fig, path)
