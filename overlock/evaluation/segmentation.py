"""The report's Segmentation section, from the segment stage's outputs (``models/segmenter``): mIoU/mAcc/aAcc,
the per-class IoU table and chart, predicted masks beside the ground truth on validation images, and the
pixel-wise temperature scaling (ECE/NLL before and after, reliability diagram). Nothing is recomputed here."""
from __future__ import annotations

import shutil
from pathlib import Path

from overlock.evaluation.report import Report, fmt, table
from overlock.state import read_json

__all__ = ["segmentation_section"]

FIGURES = (("masks.png", "Validation images: image, ground truth, prediction"),
           ("per_class_iou.png", "Per-class IoU on val (classes by pixel count)"),
           ("reliability.png", "Pixel reliability diagram on val, before/after temperature scaling"))


def segmentation_section(segmenter: Path | None, staging: Path, report: Report, limit: int = 40) -> dict:
    """Write the section into ``report`` (figures copied into ``staging``); returns ``segmentation.*`` metrics."""
    metrics = read_json(Path(segmenter) / "metrics.json") if segmenter else None
    if not metrics:
        report.add("Segmentation", "No segment stage output (`models/segmenter`): run `dvc repro segment`.")
        return {"segmentation.status": "missing"}
    if metrics.get("status") == "skipped":
        report.add("Segmentation", f"The segment stage was skipped: {metrics.get('reason')}.")
        return {"segmentation.status": "skipped"}
    info = metrics.get("info", {})
    cal = read_json(Path(segmenter) / "temperature.json", {})
    per_class = read_json(Path(segmenter) / "per_class_iou.json", [])
    how = (f"trained {info.get('resumed_from_iter', 0) and '(resumed) ' or ''}from `{info.get('init')}` init"
           if metrics.get("status") == "trained" else f"evaluated checkpoint `{info.get('init_source')}`")
    report.add(
        "Segmentation",
        f"UperNet (+ FCN auxiliary head) on the OverLoCK segmentation backbone, {how}; single-scale "
        f"validation. **mIoU {100 * metrics['mIoU']:.2f}%**, mAcc {100 * metrics['mAcc']:.2f}%, "
        f"aAcc {100 * metrics['aAcc']:.2f}%.",
        table(["class", "IoU", "accuracy", "val pixels"],
              [[r["class"], r["iou"], r["acc"], r["pixels"]]
               for r in sorted(per_class, key=lambda r: -r["pixels"])[:limit]]),
    )
    if cal:
        keys = ("ece", "mce", "adaptive_ece", "nll", "brier", "top1")
        report.add(
            "Segmentation",
            f"Pixel-wise temperature scaling of the logits, fitted on the held-out calibration split "
            f"({cal['pixels']['calibration']} sampled pixels; never on val): **T = {cal['temperature']:.3f}**; "
            f"val ({cal['pixels']['val']} sampled pixels) before and after:",
            table(["when", "ECE", "MCE", "adaptive ECE", "NLL", "Brier", "pixel acc."],
                  [[when] + [cal[when][k] for k in keys] for when in ("before", "after")]),
        )
    for name, caption in FIGURES:
        src = Path(segmenter) / name
        if src.exists():
            shutil.copy2(src, staging / f"segmentation_{name}")
            report.image("Segmentation", staging / f"segmentation_{name}", caption)
    out = {f"segmentation.{k}": float(metrics[k]) for k in ("mIoU", "mAcc", "aAcc") if k in metrics}
    if cal:
        out.update({"segmentation.temperature": float(cal["temperature"]),
                    "segmentation.ece_before": float(cal["before"]["ece"]),
                    "segmentation.ece_after": float(cal["after"]["ece"])})
    out["segmentation.status"] = metrics.get("status", "trained")
    return out


def summary_row(flat: dict) -> list[str] | None:
    """The Summary table's segmentation row, when the section has results."""
    if "segmentation.mIoU" not in flat:
        return None
    return ["segmentation mIoU / aAcc", f"{100 * flat['segmentation.mIoU']:.2f}% / "
            f"{fmt(100 * flat['segmentation.aAcc'], 2)}%"]
