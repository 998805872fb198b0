"""The fine-tuned detector (MMDetection 2.x): load it from the finetune output and predict a COCO split.

Shared by the calibrate and evaluate stages. Loading and predicting need mmdet/mmcv-full;
:func:`detector_skip_reason` tells the stages when there is no detector to use (``data.detection_dataset:
none``, no ``detector.pth``, no MMDetection) so they skip the detector parts with that reason instead of
failing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

__all__ = ["DETECTOR_FILES", "detection_splits", "mmdet_available", "detector_skip_reason", "load_coco",
           "load_detector", "predict_coco"]

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
    """Why the detector parts cannot run (None when they can)."""
    if params.data.detection_dataset == "none":
        return "data.detection_dataset is 'none': no detector was trained"
    missing = [f for f in DETECTOR_FILES if not (Path(detector_dir) / f).exists()]
    if missing:
        return f"{detector_dir} has no {', '.join(missing)} (the finetune stage produced no detector)"
    try:
        detection_splits(data_dir)
    except FileNotFoundError as err:
        return f"no detection dataset: {err}"
    error = mmdet_available()
    if error:
        return f"MMDetection is not importable ({error}); install mmcv-full 1.7.2 and mmdet 2.28.2"
    return None


def load_coco(ann_file: str):
    """A pycocotools COCO of ``ann_file`` (quiet)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(ann_file)


def load_detector(detector_dir: Path, device):
    """``mmdet.apis.init_detector`` on ``config.py`` + ``detector.pth`` (classes from the checkpoint meta)."""
    from mmdet.apis import init_detector

    from overlock.detection.registration import register_mmdet_backbones

    register_mmdet_backbones()  # a config dumped before custom_imports named the registration still loads
    detector_dir = Path(detector_dir)
    return init_detector(
        str(detector_dir / "config.py"), str(detector_dir / "detector.pth"), device=str(device)
    )


def _category_ids(model, coco) -> list[int]:
    names = list(getattr(model, "CLASSES", None) or [])
    by_name = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    if names and all(n in by_name for n in names):
        return [by_name[n] for n in names]
    return sorted(coco.getCatIds())


def predict_coco(
    model, coco, img_prefix: str, image_ids: list[int] | None = None, desc: str = "detect"
) -> dict[str, list[dict]]:
    """COCO-format results {"bbox": [...], "segm": [...]} of ``model`` on the images of ``coco``."""
    from mmdet.apis import inference_detector
    from pycocotools import mask as mask_utils

    cat_ids = _category_ids(model, coco)
    out: dict[str, list[dict]] = {"bbox": [], "segm": []}
    for image_id in tqdm(image_ids or coco.getImgIds(), desc=desc, leave=False):
        info = coco.loadImgs([image_id])[0]
        result = inference_detector(model, str(Path(img_prefix) / info["file_name"]))
        boxes, masks = result if isinstance(result, tuple) else (result, None)
        if isinstance(masks, tuple):  # (segms, mask scores) in some heads
            masks = masks[0]
        for k, per_class in enumerate(boxes):
            for j, (x1, y1, x2, y2, score) in enumerate(np.asarray(per_class)):
                det = {
                    "image_id": image_id,
                    "category_id": cat_ids[k],
                    "score": float(score),
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                }
                out["bbox"].append(det)
                if masks is not None and len(masks[k]) > j:
                    rle = mask_utils.encode(np.asfortranarray(np.asarray(masks[k][j], dtype=np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    out["segm"].append({**det, "segmentation": rle})
    return out
