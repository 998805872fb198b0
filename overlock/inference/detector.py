"""The fine-tuned detector (MMDetection 2.x) and its predictions, as the finetune stage wrote them.

Shared by the calibrate and evaluate stages, which read the finetune stage's predictions
(:func:`load_predictions`; ``models/detector/predictions/<split>.json``) and never run the detector:
:func:`detector_skip_reason` tells them when there is no detector (``data.detection_dataset: none``, no
finetune output) so they skip the detector parts with that reason. :func:`load_detector` loads the detector
itself (mmdet/mmcv-full) for other uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["DETECTOR_FILES", "detection_splits", "mmdet_available", "detector_skip_reason", "load_coco",
           "load_detector", "load_predictions", "detections_of", "DetectorPredictor"]

DETECTOR_FILES = ("detector.pth", "config.py")


def detection_splits(data_dir: Path) -> dict[str, tuple[str, str]]:
    """{split: (annotation file, image folder)} for train, calibration and val of the detection dataset."""
    from overlock.data.datasets import coco_split_files, detection_root

    return coco_split_files(detection_root(Path(data_dir)))


def mmdet_available() -> str | None:
    """None when mmdet and mmcv's compiled ops import, else the import error."""
    try:
        import mmcv.ops  # noqa: F401
        import mmdet.apis  # noqa: F401
    except (ImportError, OSError, RuntimeError) as err:  # not installed, or a broken mmcv build
        return f"{type(err).__name__}: {err}"
    return None


def detector_skip_reason(params, detector_dir: Path, data_dir: Path) -> str | None:
    """Why there are no detector predictions to use (None when there are: then the predictions files are
    required, and :func:`load_predictions` fails clearly when one is missing or bad). MMDetection is not
    needed: the detector is not run here."""
    from overlock.data.coco_results import PREDICTIONS_DIR

    if params.data.detection_dataset == "none":
        return "data.detection_dataset is 'none': no detector was trained"
    detector_dir = Path(detector_dir)
    if not (detector_dir / "detector.pth").exists() and not (detector_dir / PREDICTIONS_DIR).is_dir():
        return (f"{detector_dir} has no detector.pth and no {PREDICTIONS_DIR}/ "
                "(the finetune stage produced no detector)")
    try:
        detection_splits(data_dir)
    except FileNotFoundError as err:
        return f"no detection dataset: {err}"
    return None


def load_predictions(detector_dir: Path, data_dir: Path, split: str):
    """``(coco, img_prefix, {"bbox": [...], "segm": [...]})``: the ground truth of ``split`` and the finetune
    stage's predictions on it (``<detector_dir>/predictions/<split>.json``), checked against each other."""
    from overlock.data.coco_results import predictions_file, read_predictions

    ann_file, img_prefix = detection_splits(data_dir)[split]
    coco = load_coco(ann_file)
    return coco, img_prefix, read_predictions(predictions_file(detector_dir, split), coco)


def load_coco(ann_file: str):
    """A pycocotools COCO of ``ann_file`` (quiet)."""
    from overlock.data.coco_results import load_coco as _load

    return _load(ann_file)


def load_detector(detector_dir: Path, device):
    """``mmdet.apis.init_detector`` on ``config.py`` + ``detector.pth`` (classes from the checkpoint meta)."""
    from mmdet.apis import init_detector

    from overlock.detection.registration import register_mmdet_backbones

    register_mmdet_backbones()  # a config dumped before custom_imports named the registration still loads
    detector_dir = Path(detector_dir)
    return init_detector(
        str(detector_dir / "config.py"), str(detector_dir / "detector.pth"), device=str(device)
    )


def detections_of(result, with_masks: bool = True) -> list[dict]:
    """mmdet's result of one image as ``[{"bbox": [x1, y1, x2, y2], "label_id", "score", "mask": RLE}]``
    (``mask`` only for a mask head: COCO RLE with ``counts`` as an ASCII string)."""
    from pycocotools import mask as mask_utils

    boxes, masks = result if isinstance(result, tuple) else (result, None)
    if isinstance(masks, tuple):  # (segms, mask scores) in some heads
        masks = masks[0]
    dets = []
    for k, per_class in enumerate(boxes):
        for j, (x1, y1, x2, y2, score) in enumerate(np.asarray(per_class)):
            det = {"bbox": [float(x1), float(y1), float(x2), float(y2)], "label_id": k, "score": float(score)}
            if with_masks and masks is not None and len(masks[k]) > j:
                rle = mask_utils.encode(np.asfortranarray(np.asarray(masks[k][j], dtype=np.uint8)))
                det["mask"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            dets.append(det)
    return dets


def load_score_calibrator(calibration_dir: Path | None):
    """The fitted detector score calibrator of a calibrate output (None when there is none or it was
    skipped)."""
    from overlock.inference.calibrated import DETECTOR_CALIBRATION_FILE, ScoreCalibrator
    from overlock.state import read_json

    if calibration_dir is None:
        return None
    path = Path(calibration_dir)
    data = read_json(path if path.is_file() else path / DETECTOR_CALIBRATION_FILE)
    if not data or data.get("status") != "fitted":
        return None
    return ScoreCalibrator.from_dict(data["calibrator"])


class DetectorPredictor:
    """The fine-tuned detector with its fitted score calibration: RGB images in, detections out.

    Each detection: ``bbox`` [x1, y1, x2, y2] in pixels of the input, ``label`` (class name), ``label_id``,
    ``score`` (calibrated: the probability that the detection is correct; the raw score when no calibration
    was fitted), ``raw_score`` and, for Mask R-CNN, ``mask`` (COCO RLE). Detections below
    ``score_threshold`` (raw) are dropped.
    """

    def __init__(self, model, calibrator=None, score_threshold: float = 0.05):
        self.model, self.calibrator, self.score_threshold = model, calibrator, score_threshold
        self.class_names = [str(c) for c in (getattr(model, "CLASSES", None) or [])]

    @classmethod
    def load(cls, detector_dir: Path, calibration: Path | None = None, device="cpu",
             score_threshold: float = 0.05) -> "DetectorPredictor":
        return cls(load_detector(detector_dir, device), load_score_calibrator(calibration), score_threshold)

    def detect(self, images: list) -> list[list[dict]]:
        """Detections of each RGB PIL image (one mmdet batch)."""
        from mmdet.apis import inference_detector

        if not images:
            return []
        arrays = [np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1]) for img in images]  # BGR
        results = inference_detector(self.model, arrays)
        out = []
        for result in results:
            dets = [d for d in detections_of(result) if d["score"] >= self.score_threshold]
            raw = np.array([d["score"] for d in dets], dtype=np.float64)
            calibrated = self.calibrator(raw) if self.calibrator is not None and len(raw) else raw
            for det, score in zip(dets, calibrated):
                det["raw_score"], det["score"] = det["score"], float(score)
                det["label"] = (self.class_names[det["label_id"]] if det["label_id"] < len(self.class_names)
                                else str(det["label_id"]))
            out.append(sorted(dets, key=lambda d: -d["score"]))
        return out
