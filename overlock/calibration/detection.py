"""Confidence calibration of detector box scores over IoU-matched detections.

Each detection is matched (greedily by score, per image and category, COCO style) to an unmatched ground
truth box with IoU >= ``calibrate.detection_iou``; a matched detection counts as correct. Detection ECE is
the binary ECE of score vs. correct. A calibrator (``overlock.inference.calibrated.ScoreCalibrator``) maps raw
scores to calibrated ones: ``temperature`` (``sigmoid(logit(s) / T)``) or ``isotonic`` (scikit-learn's
isotonic regression, stored as its knots); :func:`fit_score_calibrator` fits it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from overlock.calibration.temperature import minimise_over_temperature
from overlock.inference.calibrated import DETECTOR_CALIBRATION_FILE, ScoreCalibrator, score_logit
from overlock.metrics.calibration import binary_calibration, reliability_bins

log = logging.getLogger(__name__)

__all__ = ["DETECTOR_CALIBRATION_FILE", "match_detections", "fit_score_calibrator",
           "detection_calibration_report", "calibrate_detector"]


def match_detections(detections: list[dict], coco_gt, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(scores, correct) of COCO-format ``detections`` against the ground truth in ``coco_gt`` (a COCO).

    Crowd ground truth is neither matched nor counted: detections overlapping only crowd regions are dropped.
    """
    by_key: dict[tuple[int, int], list[dict]] = {}
    for det in detections:
        by_key.setdefault((det["image_id"], det["category_id"]), []).append(det)
    scores, correct = [], []
    for (image_id, cat_id), dets in by_key.items():
        dets = sorted(dets, key=lambda d: -d["score"])
        gts = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id], catIds=[cat_id]))
        normal = [g for g in gts if not g.get("iscrowd", 0)]
        crowd = [g for g in gts if g.get("iscrowd", 0)]
        boxes = [d["bbox"] for d in dets]
        iou = (
            mask_utils.iou(boxes, [g["bbox"] for g in normal], [0] * len(normal))
            if normal
            else np.zeros((len(dets), 0))
        )
        iou_crowd = (
            mask_utils.iou(boxes, [g["bbox"] for g in crowd], [1] * len(crowd))
            if crowd
            else np.zeros((len(dets), 0))
        )
        taken = np.zeros(len(normal), dtype=bool)
        for i, det in enumerate(dets):
            candidates = np.where(~taken & (np.asarray(iou[i]) >= iou_threshold))[0] if len(normal) else []
            if len(candidates):
                best = candidates[np.argmax(np.asarray(iou[i])[candidates])]
                taken[best] = True
                scores.append(det["score"])
                correct.append(True)
            elif len(crowd) and np.max(iou_crowd[i]) >= iou_threshold:
                continue  # a detection of a crowd region is ignored, as COCOeval does
            else:
                scores.append(det["score"])
                correct.append(False)
    return np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=bool)


def fit_score_calibrator(
    method: str, scores: np.ndarray, correct: np.ndarray, max_iter: int = 200
) -> ScoreCalibrator:
    """Fit ``method`` ("temperature" or "isotonic") on (score, correct) pairs."""
    if len(scores) < 2 or correct.all() or not correct.any():
        raise ValueError(
            f"cannot fit a detection score calibrator on {len(scores)} detections with "
            f"{int(correct.sum())} correct: it needs both correct and wrong detections "
            "(more calibration images, or a lower calibrate.detection_iou)"
        )
    if method == "temperature":
        z, y = score_logit(scores), torch.as_tensor(correct, dtype=torch.float64)
        temperature = minimise_over_temperature(
            lambda t: F.binary_cross_entropy_with_logits(z / t, y), max_iter)
        return ScoreCalibrator(method, temperature=temperature)
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(scores, correct.astype(float))
        return ScoreCalibrator(
            method,
            knots_x=[float(v) for v in iso.X_thresholds_],
            knots_y=[float(v) for v in iso.y_thresholds_],
        )
    raise ValueError(f"unknown calibrate.detection_calibrator {method!r}; valid: temperature, isotonic")


def detection_calibration_report(
    scores: np.ndarray, correct: np.ndarray, calibrator: ScoreCalibrator, bins: int
) -> dict:
    """Before/after binary calibration metrics and reliability bins of one split's matched detections."""
    calibrated = calibrator(scores)
    s, c = torch.as_tensor(scores), torch.as_tensor(correct)
    return {
        "detections": len(scores),
        "before": binary_calibration(s, c, bins),
        "after": binary_calibration(torch.as_tensor(calibrated), c, bins),
        "reliability_before": reliability_bins(s, c, bins),
        "reliability_after": reliability_bins(torch.as_tensor(calibrated), c, bins),
    }


def calibrate_detector(params, detector_dir: Path, data_dir: Path, device=None) -> dict:
    """Fit the detector score calibrator on the calibration split's predictions and report it on val.

    The predictions are the finetune stage's (``<detector_dir>/predictions/{calibration,val}.json``): the
    detector is not run here (``device`` is unused). Returns ``{"status": "skipped", "reason": ...}`` (logged)
    when there is no detector (``data.detection_dataset: none``, no finetune output).
    """
    from overlock.inference.detector import detector_skip_reason, load_predictions

    reason = detector_skip_reason(params, detector_dir, data_dir)
    if reason:
        log.warning("detector calibration skipped: %s", reason)
        return {"status": "skipped", "reason": reason}

    cfg = params.calibrate
    matched = {}
    for split in ("calibration", "val"):
        coco, _, predictions = load_predictions(detector_dir, data_dir, split)
        matched[split] = match_detections(predictions["bbox"], coco, cfg.detection_iou)
    try:
        calibrator = fit_score_calibrator(
            cfg.detection_calibrator, *matched["calibration"], max_iter=cfg.max_iter
        )
    except ValueError as err:  # e.g. an under-trained detector with no correct detection: report, don't fail
        log.warning("detector score calibrator not fitted: %s", err)
        counts = {f"{split}_detections": len(m[0]) for split, m in matched.items()}
        return {"status": "skipped", "reason": f"calibrator not fitted: {err}", **counts}
    return {
        "status": "fitted",
        "iou_threshold": cfg.detection_iou,
        "calibrator": calibrator.to_dict(),
        **{split: detection_calibration_report(*matched[split], calibrator, cfg.bins) for split in matched},
    }
