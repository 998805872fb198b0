"""COCO evaluation of the detector's predictions (per-class AP) and the ground truth vs. prediction figures.

The predictions are the finetune stage's (``models/detector/predictions/<split>.json``, read through
``overlock.inference.detector.load_predictions``): the detector is not run here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from overlock.metrics.coco import coco_evaluate

__all__ = ["coco_evaluate", "read_finetune_metrics", "draw_gt_vs_pred"]


def read_finetune_metrics(detector_dir: Path) -> dict:
    """``metrics.json`` of the finetune stage ({} when absent)."""
    path = Path(detector_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def draw_gt_vs_pred(
    coco,
    img_prefix: str,
    results: dict[str, list[dict]],
    image_ids: list[int],
    path: Path,
    score_threshold: float = 0.3,
) -> Path:
    """Ground truth (left) beside predictions above ``score_threshold`` (right) for ``image_ids``."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    from overlock.evaluation.plots import detection_pairs

    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    rows = []
    for image_id in image_ids:
        info = coco.loadImgs([image_id])[0]
        image = np.asarray(Image.open(Path(img_prefix) / info["file_name"]).convert("RGB"))
        gts = [
            {
                "bbox": a["bbox"],
                "label": names.get(a["category_id"], "?"),
                "mask": coco.annToMask(a) if a.get("segmentation") else None,
            }
            for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        ]
        preds = []
        segm = {(d["image_id"], tuple(d["bbox"])): d for d in results.get("segm", [])}
        for d in results["bbox"]:
            if d["image_id"] == image_id and d["score"] >= score_threshold:
                m = segm.get((image_id, tuple(d["bbox"])))
                preds.append(
                    {
                        "bbox": d["bbox"],
                        "label": f"{names.get(d['category_id'], '?')} {d['score']:.2f}",
                        "mask": mask_utils.decode(m["segmentation"]) if m else None,
                    }
                )
        rows.append((info["file_name"], image, gts, preds))
    return detection_pairs(rows, path)
