"""Reliability diagrams of the calibrate stage (matplotlib, Agg backend), saved as PNG."""

from __future__ import annotations

from pathlib import Path

from overlock.figures import plt, save_figure


def reliability_diagram(
    panels: dict[str, list[dict]],
    path: Path,
    bins: int = 15,
    metrics: dict[str, dict] | None = None,
    title: str = "Reliability diagram",
    xlabel: str = "confidence (top-1 probability)",
) -> Path:
    """One panel per entry of ``panels`` (e.g. before/after): accuracy per confidence bin vs. the diagonal.

    Each panel's rows come from :func:`overlock.metrics.calibration.reliability_bins`; a histogram of the
    sample counts sits below; ``metrics[name]['ece']`` is printed in the panel when given.
    """
    n = len(panels)
    fig, axes = plt.subplots(
        2, n, figsize=(4.6 * n, 5.6), squeeze=False, gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    width = 1.0 / bins
    for j, (name, rows) in enumerate(panels.items()):
        ax, hist = axes[0, j], axes[1, j]
        centers = [r["lower"] + width / 2 for r in rows]
        ax.bar(
            centers,
            [r["accuracy"] for r in rows],
            width=width * 0.95,
            color="#4c72b0",
            edgecolor="black",
            linewidth=0.5,
            label="accuracy",
        )
        ax.bar(
            centers,
            [abs(r["confidence"] - r["accuracy"]) for r in rows],
            bottom=[min(r["confidence"], r["accuracy"]) for r in rows],
            width=width * 0.95,
            color="#dd8452",
            alpha=0.5,
            hatch="//",
            edgecolor="#c44e52",
            linewidth=0.5,
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (fraction correct)")
        label = name
        if metrics and name in metrics and "ece" in metrics[name]:
            label += f"  (ECE {metrics[name]['ece']:.3f})"
        ax.set_title(label)
        ax.legend(loc="upper left", fontsize=8)
        hist.bar(centers, [r["count"] for r in rows], width=width * 0.95, color="#55a868")
        hist.set_xlabel(xlabel)
        hist.set_ylabel("samples")
    fig.suptitle(title)
    return save_figure(fig, path)
