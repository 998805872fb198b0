"""COCO evaluation of the detector's predictions (per-class AP) and the ground truth vs. prediction figures.

Loading the detector and predicting a COCO split live in ``overlock.inference.detector``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def coco_evaluate(coco, results: list[dict], iou_type: str) -> dict:
    """COCO AP (the 12 summary numbers) and per-class AP from ``eval['precision']`` (IoU .5:.95, all areas)."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"summary": {}, "per_class": {}}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(results)
        ev = COCOeval(coco, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    summary = {n: float(v) for n, v in zip(names, ev.stats[:6])}
    precision = ev.eval["precision"]  # [IoU thresholds, recall, classes, areas, max dets]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_class[coco.loadCats([cat_id])[0]["name"]] = (
            float(p[p > -1].mean()) if (p > -1).any() else float("nan")
        )
    return {"summary": summary, "per_class": per_class}


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
