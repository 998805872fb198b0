"""The fine-tuned detector (MMDetection 2.x) and its predictions, as the finetune stage wrote them.

Shared by the calibrate and evaluate stages, which read the finetune stage's predictions
(:func:`load_predictions`; ``models/detector/predictions/<split>.json``) and never run the detector:
:func:`detector_skip_reason` tells them when there is no detector (``data.detection_dataset: none``, no
finetune output) so they skip the detector parts with that reason. :func:`load_detector` loads the detector
itself (mmdet/mmcv-full) for other uses.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DETECTOR_FILES", "detection_splits", "mmdet_available", "detector_skip_reason", "load_coco",
           "load_detector", "load_predictions"]

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
