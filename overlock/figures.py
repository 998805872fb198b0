"""Saving matplotlib figures (Agg backend, no display needed) the same way in every stage."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)

__all__ = ["DPI", "plt", "save_figure"]

DPI = 110


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, save it as ``path`` (parents created) on white, close it; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, facecolor="white")
    plt.close(fig)
    return path
