"""The fine-tuned detector (MMDetection 2.x): load it, predict a COCO split, per-class AP.

Everything here needs mmdet/mmcv-full; :func:`detector_skip_reason` tells the stages when there is no
detector to use (``data.detection_dataset: none``, no ``detector.pth``, no MMDetection) so they skip the
detector parts with that reason instead of failing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

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


def register_detection_backbones() -> None:
    """Import our backbone modules into mmdet's BACKBONES (a dumped config may lack ``custom_imports``)."""
    import importlib

    for module in ("overlock.models", "overlock.detection.backbone", "overlock.detection.baseline_backbones"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def load_detector(detector_dir: Path, device):
    """``mmdet.apis.init_detector`` on ``config.py`` + ``detector.pth`` (classes from the checkpoint meta)."""
    from mmdet.apis import init_detector

    register_detection_backbones()
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
