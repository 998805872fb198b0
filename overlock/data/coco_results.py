"""The detector's predictions as files: ``models/detector/predictions/<split>.json``, COCO results lists.

Each detection is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score", "score_logit",
"segmentation"?}`` (``score``: the raw, uncalibrated detector score; ``score_logit``: ``log(score / (1 -
score))``, what the temperature calibrator scales; ``segmentation``: the mask as COCO RLE, for mask heads).
The finetune stage writes them (``overlock.detection.predictions``); calibrate and evaluate read them
(:func:`read_predictions`) instead of running the detector. Needs no MMDetection.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ["PREDICTIONS_DIR", "PREDICTED_SPLITS", "PredictionsError", "load_coco", "predictions_file", "to_coco",
           "write_predictions", "read_predictions"]

PREDICTIONS_DIR = "predictions"
PREDICTED_SPLITS = ("val", "calibration")
_EPS = 1e-12


class PredictionsError(ValueError):
    """A predictions file is missing, unreadable or does not belong to its split."""


def load_coco(ann_file: str):
    """A pycocotools COCO of ``ann_file`` (quiet)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(ann_file)


def predictions_file(detector_dir: Path, split: str) -> Path:
    """``<detector_dir>/predictions/<split>.json``."""
    return Path(detector_dir) / PREDICTIONS_DIR / f"{split}.json"


def _logit(score: float) -> float:
    s = min(max(score, _EPS), 1 - _EPS)
    return math.log(s) - math.log1p(-s)


def to_coco(image_id: int, result, cat_ids: list[int]) -> list[dict]:
    """COCO-format detections of one image from an mmdet result (per-class boxes [, per-class masks])."""
    from pycocotools import mask as mask_utils

    boxes, masks = result if isinstance(result, tuple) else (result, None)
    if isinstance(masks, tuple):  # (segms, mask scores) in some heads
        masks = masks[0]
    out = []
    for k, per_class in enumerate(boxes):
        for j, (x1, y1, x2, y2, score) in enumerate(np.asarray(per_class, dtype=np.float64).reshape(-1, 5)):
            det = {"image_id": int(image_id), "category_id": int(cat_ids[k]),
                   "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                   "score": float(score), "score_logit": _logit(float(score))}
            if masks is not None and len(masks[k]) > j:
                mask = masks[k][j]
                if isinstance(mask, dict):  # already RLE-encoded
                    rle = dict(mask)
                else:
                    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
                if isinstance(rle["counts"], bytes):
                    rle["counts"] = rle["counts"].decode("ascii")
                det["segmentation"] = rle
            out.append(det)
    return out


def write_predictions(path: Path, detections: list[dict]) -> Path:
    """Write ``detections`` (a COCO results list) to ``path`` atomically."""
    from overlock.state import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, detections)
    return path


_FIX = "re-run the finetune stage to write it again (`dvc repro -f finetune`)"


def read_predictions(path: Path, coco) -> dict[str, list[dict]]:
    """The detections of a predictions file checked against its split's ground truth ``coco`` (a COCO):
    ``{"bbox": [...], "segm": [...]}`` (``segm``: the detections with a mask). Raises
    :class:`PredictionsError` naming the file, the problem and the fix."""
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"{path} not found: the finetune stage writes the detector's predictions there "
                               f"(a detector from before predictions were written has none); {_FIX}")
    try:
        detections = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PredictionsError(f"{path} is not valid JSON ({err}); {_FIX}") from None
    if not isinstance(detections, list):
        raise PredictionsError(f"{path} holds a {type(detections).__name__}, not a COCO results list; {_FIX}")
    images, cats = set(coco.getImgIds()), set(coco.getCatIds())
    for n, det in enumerate(detections):
        problem = _problem(det, images, cats)
        if problem:
            raise PredictionsError(f"{path}: detection {n} {problem}; is it the predictions file of this split "
                                   f"({len(images)} images)? {_FIX}")
    return {"bbox": [{k: v for k, v in d.items() if k != "segmentation"} for d in detections],
            "segm": [d for d in detections if "segmentation" in d]}


def _problem(det, images: set, cats: set) -> str | None:
    if not isinstance(det, dict):
        return f"is a {type(det).__name__}, not an object"
    missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in det]
    if missing:
        return f"has no {', '.join(missing)}"
    if det["image_id"] not in images:
        return f"names image_id {det['image_id']!r}, which is not in the split's annotations"
    if det["category_id"] not in cats:
        return f"names category_id {det['category_id']!r}, which is not a category of the dataset"
    bbox = det["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        return f"has bbox {bbox!r}, not [x, y, width, height]"
    score = det["score"]
    if not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
        return f"has score {score!r}, not a number in [0, 1]"
    return None
