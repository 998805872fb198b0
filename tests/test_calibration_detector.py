"""Detector parts of calibrate/evaluate with a real, briefly trained MMDetection Mask R-CNN on demo COCO data."""

import io
import json
import re
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
TRAIN_ITERS = 80  # measured: the tiny detector reaches val box AP50 ~0.7 after 80 iterations from scratch


@pytest.fixture(scope="module")
def detector_workspace(tmp_path_factory, demo_detection_layout):
    """A real mmdet detector (our config, tiny backbone) trained for a few dozen iterations on the demo train
    split and written as the finetune stage's outputs: it finds objects, and makes mistakes."""
    from mmdet.apis import train_detector
    from mmdet.datasets import build_dataset
    from mmdet.models import build_detector

    from overlock.detection.config import build_detection_config, coco_files
    from overlock.data.coco_results import PREDICTED_SPLITS, predictions_file, write_predictions
    from overlock.detection.predictions import predict_split
    from overlock.detection.registration import register_mmdet_backbones
    from overlock.params import parse_params

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("calib_det")
    data = root / "data"
    classes = demo_detection_layout(data, n_train=24, n_val=6, calibration=8)
    params = parse_params(
        {
            "model": {"overrides": TINY},
            "finetune": {"init": "none", "img_scale": [96, 96], "max_iters": TRAIN_ITERS,
                         "checkpoint_interval": TRAIN_ITERS},
            "evaluate": {"detection_images": 2},
            "compute": {"device": "cpu"},
        }
    )
    register_mmdet_backbones()
    cfg = build_detection_config(params, data, root / "work", classes)
    cfg.log_config.hooks = []
    model = build_detector(cfg.model)
    model.init_weights()
    dataset = build_dataset(cfg.data.train)
    model.CLASSES = dataset.CLASSES
    train_detector(model, [dataset], cfg, distributed=False, validate=False, meta=dict(seed=0))
    out = root / "detector"
    out.mkdir()
    # the finetune stage's predictions, written by the same function (batched, one process here)
    splits = coco_files(data)
    for split in PREDICTED_SPLITS:
        write_predictions(predictions_file(out, split),
                          predict_split(model, cfg.data.test, *splits[split], samples_per_gpu=2, workers=0,
                                        device="cpu"))
    torch.set_num_threads(threads)
    torch.save({"meta": {"CLASSES": tuple(classes)}, "state_dict": model.state_dict()}, out / "detector.pth")
    cfg.dump(str(out / "config.py"))
    (out / "metrics.json").write_text(json.dumps({"bbox_mAP": 0.0, "segm_mAP": 0.0, "bbox_mAP_50": 0.0}))
    return {"root": root, "data": data, "detector": out, "params": params, "classes": classes}


def test_detector_score_calibrator_is_fitted_on_the_calibration_split(detector_workspace):
    from overlock.calibration.detection import calibrate_detector
    from overlock.inference.calibrated import ScoreCalibrator

    ws = detector_workspace
    result = calibrate_detector(ws["params"], ws["detector"], ws["data"], "cpu")
    assert result["status"] == "fitted", result.get("reason")
    cal, val = result["calibration"], result["val"]
    assert cal["detections"] > 0 and val["detections"] > 0
    # fitted on the calibration split by maximum likelihood: its NLL cannot get worse
    assert cal["after"]["nll"] <= cal["before"]["nll"] + 1e-9
    for split in (cal, val):
        for when in ("before", "after"):
            # ECE and MCE as their definitions give them from the reliability bins of the same scores
            rows = split[f"reliability_{when}"]
            assert sum(r["count"] for r in rows) == split["detections"]
            gaps = [abs(r["accuracy"] - r["confidence"]) for r in rows]
            ece = sum(r["count"] * g for r, g in zip(rows, gaps)) / split["detections"]
            assert split[when]["ece"] == pytest.approx(ece, abs=1e-5)
            assert split[when]["mce"] == pytest.approx(max(gaps), abs=1e-5)
    # a temperature keeps the ranking of the scores (so every AP is unchanged) and round-trips through JSON
    calibrator = ScoreCalibrator.from_dict(result["calibrator"])
    assert calibrator.temperature > 0 and calibrator.temperature != 1.0
    raw = np.linspace(0.05, 0.99, 50)
    assert np.all(np.diff(calibrator(raw)) > 0)


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


def test_evaluate_draws_calibrated_detector_scores(detector_workspace, tmp_path):
    from overlock.calibration.detection import calibrate_detector
    from overlock.evaluation.stage import calibrated_detections
    from overlock.inference.calibrated import ScoreCalibrator
    from overlock.inference.detector import load_predictions

    ws = detector_workspace
    fitted = calibrate_detector(ws["params"], ws["detector"], ws["data"], "cpu")
    (tmp_path / "detector_calibration.json").write_text(json.dumps(fitted))
    _, _, results = load_predictions(ws["detector"], ws["data"], "val")
    raw_scores = np.array([d["score"] for d in results["bbox"]])
    shown, caption = calibrated_detections(results, tmp_path)
    assert "calibrated scores" in caption
    expected = ScoreCalibrator.from_dict(fitted["calibrator"])(raw_scores)
    np.testing.assert_allclose([d["score"] for d in shown["bbox"]], expected)
    assert not np.allclose(expected, raw_scores)
    # without a fitted calibrator the raw scores are drawn, and the caption says so
    same, caption = calibrated_detections(results, tmp_path / "missing")
    assert same is results and "raw scores" in caption


# --- the detector served: the pyfunc model the calibrate stage registers, and `overlock predict --task detect`
DETECTOR_T = 2.0


def _score_calibration(directory: Path) -> Path:
    """A calibrate output with a fitted temperature score calibrator (as calibrate_detector writes it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "detector_calibration.json").write_text(json.dumps(
        {"status": "fitted", "calibrator": {"method": "temperature", "temperature": DETECTOR_T}}))
    return directory


def test_registered_detector_answers_boxes_labels_rle_masks_and_calibrated_scores(detector_workspace, tmp_path):
    import mlflow
    import pandas as pd
    from PIL import Image
    from pycocotools import mask as mask_utils

    from overlock.inference.calibrated import ScoreCalibrator
    from overlock.inference.detector import DetectorPredictor, detection_splits, load_detector
    from overlock.params import parse_params
    from overlock.serving.package import register_detector
    from overlock.tracking import start_stage

    ws = detector_workspace
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = start_stage("calibrate", parse_params({"tracking": {"uri": uri}}), root=tmp_path)
    version = register_detector(run, ws["detector"], _score_calibration(tmp_path / "calibration"))
    run.finish()
    mlflow.set_tracking_uri(uri)
    client = mlflow.tracking.MlflowClient(uri)
    mv = client.get_model_version_by_alias("overlock-detector", "latest-pipeline")
    assert str(mv.version) == version and mv.tags["overlock.score_calibration"] == "temperature"
    model = mlflow.pyfunc.load_model("models:/overlock-detector@latest-pipeline")
    assert model.metadata.get_input_schema().input_names() == ["image"]

    _, img_dir = detection_splits(ws["data"])["val"]
    paths = sorted(Path(img_dir).iterdir())[:2]
    answer = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}), params={"score_threshold": 0.05})
    direct = DetectorPredictor(load_detector(ws["detector"], "cpu")).detect([Image.open(p) for p in paths])
    assert len(answer) == 2 and sum(len(b) for b in answer["boxes"]) > 0
    calibrator = ScoreCalibrator("temperature", DETECTOR_T)
    for (_, row), path, raw in zip(answer.iterrows(), paths, direct):
        w, h = Image.open(path).size
        assert sorted(row["raw_scores"]) == pytest.approx(sorted(d["score"] for d in raw))
        np.testing.assert_allclose(row["scores"], calibrator(np.array(row["raw_scores"])), atol=1e-9)
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert set(row["labels"]) <= set(ws["classes"])
        assert len(row["masks"]) == len(row["boxes"])
        for (x1, y1, x2, y2), rle in zip(row["boxes"], row["masks"]):
            assert -1 <= x1 < x2 <= w + 1 and -1 <= y1 < y2 <= h + 1
            assert mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).shape == (h, w)


def test_served_detector_answers_over_http_outside_the_checkout(detector_workspace, tmp_path):
    """README "Deploy": the real `mlflow models serve -m models:/overlock-detector@latest-pipeline`, started from a
    directory outside the checkout in an environment that hides this repository (tests/mlflow_serving.py),
    answers JPEGs with the calibrated detections of the model itself, and a file that is not an image with a
    clear 400."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    from mlflow_serving import invoke, served
    from overlock.inference.calibrated import ScoreCalibrator
    from overlock.inference.detector import DetectorPredictor, detection_splits, load_detector
    from overlock.inference.images import read_rgb
    from overlock.params import parse_params
    from overlock.serving.package import register_detector
    from overlock.tracking import start_stage

    ws = detector_workspace
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = start_stage("calibrate", parse_params({"tracking": {"uri": uri}}), root=tmp_path)
    register_detector(run, ws["detector"], _score_calibration(tmp_path / "calibration"))
    run.finish()
    _, img_dir = detection_splits(ws["data"])["val"]
    paths = sorted(Path(img_dir).iterdir())[:2]
    jpegs = []
    for path in paths:  # JPEG bytes, as a client sends them
        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
    with served("models:/overlock-detector@latest-pipeline", tmp_path, uri) as srv:
        status, answer = invoke(srv["url"], jpegs, params={"score_threshold": 0.05}, timeout=120)
        bad_status, bad = invoke(srv["url"], [jpegs[0], b"not an image at all"], timeout=120)
    assert status == 200, answer
    assert not (tmp_path / "hidden_opens.log").exists(), (tmp_path / "hidden_opens.log").read_text()
    rows = answer["predictions"]
    direct = DetectorPredictor(load_detector(ws["detector"], "cpu")).detect([read_rgb(b) for b in jpegs])
    calibrator = ScoreCalibrator("temperature", DETECTOR_T)
    assert len(rows) == 2 and sum(len(r["boxes"]) for r in rows) > 0
    for row, raw, path in zip(rows, direct, paths):
        w, h = Image.open(path).size
        assert sorted(row["raw_scores"]) == pytest.approx(sorted(d["score"] for d in raw), abs=1e-5)
        np.testing.assert_allclose(row["scores"], calibrator(np.array(row["raw_scores"])), atol=1e-6)
        assert set(row["labels"]) <= set(ws["classes"]) and len(row["masks"]) == len(row["boxes"])
        for rle in row["masks"]:
            assert mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).shape == (h, w)
    assert bad_status == 400 and "row 1" in bad["message"] and "not a readable image" in bad["message"]


def test_predict_cli_detect_draws_images_and_writes_coco_json(detector_workspace, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from PIL import Image

    from overlock.inference.detector import detection_splits, load_coco

    ws = detector_workspace
    _, img_dir = detection_splits(ws["data"])["val"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for p in sorted(Path(img_dir).iterdir())[:2]:
        shutil.copy(p, inputs / p.name)
    Image.open(inputs / p.name).convert("L").save(inputs / "gray.png")
    (inputs / "empty.png").write_bytes(b"")
    out = tmp_path / "predictions"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "overlock.cli", "predict", str(inputs), "--task", "detect", "--detector",
         str(ws["detector"]), "--calibration", str(_score_calibration(tmp_path / "calibration")), "--out-dir",
         str(out), "--score-threshold", "0.05"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr  # the empty file failed, the others were predicted
    assert f"error: {inputs / 'empty.png'}: not a readable image" in result.stderr
    coco = load_coco(str(out / "detections.json"))
    assert len(coco.getImgIds()) == 3 and coco.getAnnIds()
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(ws["classes"])
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert 0.05 <= ann["score"] <= 1 and ann["bbox"][2] > 0 and coco.annToMask(ann).ndim == 2
    for info in coco.loadImgs(coco.getImgIds()):
        drawn = Image.open(out / info["drawn"])
        assert drawn.size == (info["width"], info["height"]) == Image.open(info["file_name"]).size

def _predictions_only(ws, tmp_path) -> Path:
    """A copy of the detector output without the detector (no detector.pth, no config.py): predictions only."""
    import shutil

    out = tmp_path / "detector"
    shutil.copytree(ws["detector"], out, ignore=shutil.ignore_patterns("detector.pth", "config.py"))
    return out


def test_calibrate_and_evaluate_read_the_predictions_file_not_the_detector(detector_workspace, tmp_path):
    """Both stages' detector parts work from the finetune stage's predictions alone, and what they report
    follows an edit of a score in that file."""
    from overlock.calibration.detection import calibrate_detector
    from overlock.data.coco_results import predictions_file
    from overlock.evaluation.report import Report
    from overlock.evaluation.stage import detection_section

    ws = detector_workspace
    detector = _predictions_only(ws, tmp_path)
    before = calibrate_detector(ws["params"], detector, ws["data"])
    assert before == calibrate_detector(ws["params"], ws["detector"], ws["data"])
    assert before["status"] == "fitted"
    evaluated = detection_section(ws["params"], ws["data"], detector, tmp_path, Report("t"), "cpu")
    assert evaluated["detection.status"] == "evaluated" and evaluated["detection.bbox_AP50"] > 0
    # the most confident val detection's score drops to ~0: the val ECE before calibration and the AP move
    path = predictions_file(detector, "val")
    dets = json.loads(path.read_text())
    top = max(range(len(dets)), key=lambda i: dets[i]["score"])
    dets[top]["score"] = 0.001
    path.write_text(json.dumps(dets))
    after = calibrate_detector(ws["params"], detector, ws["data"])
    assert after["val"]["before"]["ece"] != pytest.approx(before["val"]["before"]["ece"], abs=1e-9)
    assert after["calibrator"] == before["calibrator"]  # fitted on the calibration split's file, unchanged
    edited = detection_section(ws["params"], ws["data"], detector, tmp_path, Report("t"), "cpu")
    assert edited["detection.bbox_AP"] != pytest.approx(evaluated["detection.bbox_AP"], abs=1e-9)


@pytest.mark.parametrize("damage,message", [
    ("missing", "not found"), ("not json", "not valid JSON"), ("object", "not a COCO results list"),
    ("foreign image", "not in the split's annotations"), ("bad score", "not a number in [0, 1]"),
])
def test_bad_or_missing_predictions_fail_clearly(detector_workspace, tmp_path, damage, message):
    from overlock.calibration.detection import calibrate_detector
    from overlock.data.coco_results import PredictionsError, predictions_file

    ws = detector_workspace
    detector = _predictions_only(ws, tmp_path)
    path = predictions_file(detector, "calibration")
    dets = json.loads(path.read_text())
    if damage == "missing":
        path.unlink()
    elif damage == "not json":
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
    elif damage == "object":
        path.write_text(json.dumps({"bbox": dets}))
    else:
        dets[0].update({"image_id": 10**9} if damage == "foreign image" else {"score": 1.5})
        path.write_text(json.dumps(dets))
    with pytest.raises(PredictionsError, match=re.escape(message)) as err:
        calibrate_detector(ws["params"], detector, ws["data"])
    assert str(path) in str(err.value) and "dvc repro -f finetune" in str(err.value)
