"""Detector parts of calibrate/evaluate with a real (tiny, untrained) MMDetection Mask R-CNN on demo COCO data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")

TINY = {
    "depth": [1, 1, 1, 1],
    "sub_depth": [1, 1],
    "embed_dim": [16, 32, 64, 96],
    "kernel_size": [7, 7, 7, 7],
}


def _demo_detection_layout(data_dir: Path, n_train: int = 4, n_val: int = 3, size: int = 96) -> list[str]:
    """The extract stage's detection layout (train2017, val2017, annotations, splits) from the demo generator."""
    from overlock.data.demo import demo_coco_split

    root = data_dir / "detection"
    for split, n, key, first in (("train2017", n_train, 0, 1), ("val2017", n_val, 1, 100000)):
        images, coco = demo_coco_split(n, size, 0, key, first_id=first)
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, data in images:
            (root / split / name).write_bytes(data)
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        if split == "train2017":
            (root / "splits").mkdir(exist_ok=True)
            (root / "splits" / "train.json").write_text(json.dumps({**coco, "images": [], "annotations": []}))
            (root / "splits" / "calibration.json").write_text(json.dumps(coco))
    return [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]


@pytest.fixture(scope="module")
def detector_workspace(tmp_path_factory):
    """A real mmdet detector (built from our config, random init) written as the finetune stage's outputs."""
    from mmdet.models import build_detector

    from overlock.detection.config import build_detection_config
    from overlock.evaluation.detection import register_detection_backbones
    from overlock.params import parse_params

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("calib_det")
    data = root / "data"
    classes = _demo_detection_layout(data)
    params = parse_params(
        {
            "model": {"overrides": TINY},
            "finetune": {"init": "none", "img_scale": [96, 96]},
            "calibrate": {"detection_iou": 0.1},
            "evaluate": {"detection_images": 2},
            "compute": {"device": "cpu"},
        }
    )
    register_detection_backbones()
    cfg = build_detection_config(params, data, root / "work", classes)
    model = build_detector(cfg.model)
    model.init_weights()
    out = root / "detector"
    out.mkdir()
    torch.save({"meta": {"CLASSES": tuple(classes)}, "state_dict": model.state_dict()}, out / "detector.pth")
    cfg.dump(str(out / "config.py"))
    (out / "metrics.json").write_text(json.dumps({"bbox_mAP": 0.0, "segm_mAP": 0.0, "bbox_mAP_50": 0.0}))
    return {"root": root, "data": data, "detector": out, "params": params, "classes": classes}


def test_detector_calibration_runs_on_real_detections(detector_workspace):
    from overlock.calibration.detection import calibrate_detector

    ws = detector_workspace
    result = calibrate_detector(ws["params"], ws["detector"], ws["data"], "cpu")
    assert result["status"] in ("fitted", "skipped")
    if result["status"] == "fitted":
        assert result["val"]["detections"] > 0
        assert result["calibration"]["after"]["nll"] <= result["calibration"]["before"]["nll"] + 1e-9
    else:  # a random detector may find nothing right: a reason, not a crash
        assert "calibrator not fitted" in result["reason"] and result["calibration_detections"] > 0


def test_detection_section_per_class_ap_and_drawings(detector_workspace, tmp_path):
    from PIL import Image

    from overlock.evaluation.report import Report
    from overlock.evaluation.stage import detection_section

    ws = detector_workspace
    report = Report("t")
    metrics = detection_section(ws["params"], ws["data"], ws["detector"], tmp_path, report, "cpu")
    assert metrics["detection.status"] == "evaluated"
    assert 0.0 <= metrics["detection.bbox_AP"] <= 1.0
    md = report.markdown()
    assert "Per-class AP" in md and all(c in md for c in ws["classes"])
    img = np.asarray(Image.open(tmp_path / "detections.png").convert("RGB")).astype(float)
    assert img.shape[0] > 400 and img.std() > 10
