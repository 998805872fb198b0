"""COCO AP of detection results with pycocotools (summary and per-class AP)."""
from __future__ import annotations

import contextlib
import io

__all__ = ["coco_evaluate", "SUMMARY_NAMES"]

SUMMARY_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_evaluate(coco, results: list[dict], iou_type: str) -> dict:
    """COCO AP (the summary numbers) and per-class AP from ``eval['precision']`` (IoU .5:.95, all areas).

    For ``segm`` the boxes are dropped from the results first (as MMDetection does), so pycocotools takes each
    instance's area from its mask, not its box (APs/APm/APl).
    """
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"summary": {}, "per_class": {}}
    if iou_type == "segm":
        results = [{k: v for k, v in d.items() if k != "bbox"} for d in results]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(results)
        ev = COCOeval(coco, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    summary = {n: float(v) for n, v in zip(SUMMARY_NAMES, ev.stats[:6])}
    precision = ev.eval["precision"]  # [IoU thresholds, recall, classes, areas, max dets]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_class[coco.loadCats([cat_id])[0]["name"]] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    return {"summary": summary, "per_class": per_class}
