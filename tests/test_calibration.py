"""Calibration: metrics against hand computations, temperature scaling, the calibrate stage end to end."""

import csv
import itertools
import json

import numpy as np
import pytest
import torch

from overlock.calibration.detection import fit_score_calibrator, match_detections
from overlock.calibration.temperature import EvaluationSplitError, fit_temperature
from overlock.inference.calibrated import ScoreCalibrator, load_temperature
from overlock.metrics.calibration import (
    adaptive_ece,
    binary_calibration,
    classification_calibration,
    reliability_bins,
)


def _logits_for(confidences, predictions, num_classes=2):
    """Two-class logits whose softmax top-1 is ``predictions`` with probability ``confidences``."""
    rows = []
    for c, p in zip(confidences, predictions):
        z = np.zeros(num_classes)
        z[p] = np.log(c / (1 - c))
        rows.append(z)
    return torch.tensor(np.array(rows), dtype=torch.float32)


def test_ece_mce_match_hand_computation_with_explicit_bins():
    conf = [0.55, 0.58, 0.62, 0.71, 0.74, 0.76, 0.83, 0.91, 0.93, 0.97]
    preds = [0, 1, 0, 1, 1, 0, 0, 1, 0, 1]
    labels = [0, 0, 0, 1, 0, 0, 1, 1, 0, 1]  # right: 1, 0, 1, 1, 0, 1, 0, 1, 1, 1
    logits = _logits_for(conf, preds)
    edges = np.linspace(0, 1, 16)
    ece, mce = 0.0, 0.0
    for lo, hi in itertools.pairwise(edges):
        idx = [i for i, c in enumerate(conf) if lo <= c < hi]
        if idx:
            gap = abs(np.mean([preds[i] == labels[i] for i in idx]) - np.mean([conf[i] for i in idx]))
            ece += len(idx) / len(conf) * gap
            mce = max(mce, gap)
    got = classification_calibration(logits, torch.tensor(labels), bins=15)
    assert got["ece"] == pytest.approx(ece, abs=1e-5)
    assert got["mce"] == pytest.approx(mce, abs=1e-5)
    assert got["top1"] == pytest.approx(0.7)
    probs = torch.softmax(logits, 1).numpy()
    onehot = np.eye(2)[labels]
    assert got["brier"] == pytest.approx(((probs - onehot) ** 2).sum(1).mean(), abs=1e-5)
    assert got["nll"] == pytest.approx(-np.log(probs[np.arange(10), labels]).mean(), abs=1e-5)
    rows = reliability_bins(torch.tensor(conf), torch.tensor([p == y for p, y in zip(preds, labels)]), 15)
    assert sum(r["count"] for r in rows) == 10
    assert sum(r["count"] / 10 * abs(r["accuracy"] - r["confidence"]) for r in rows) == pytest.approx(
        ece, abs=1e-6
    )


def test_adaptive_ece_uses_equal_mass_bins():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([1, 0, 1, 1])
    # two bins of two samples: {0.6, 0.7} acc 1 conf .65 ; {0.8, 0.9} acc .5 conf .85
    assert adaptive_ece(conf, correct, bins=2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.35)


def test_fit_temperature_recovers_a_known_scale():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=g) * 2
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    t = fit_temperature(true_logits * 3.0, labels, split="calibration")
    assert t == pytest.approx(3.0, rel=0.1)


@pytest.mark.parametrize("split", ["val", "test"])
def test_fit_temperature_refuses_the_evaluation_split(split):
    logits, labels = torch.randn(20, 3), torch.randint(0, 3, (20,))
    with pytest.raises(EvaluationSplitError, match="evaluation split.*optimistic.*'calibration'"):
        fit_temperature(logits, labels, split=split)


def test_fit_temperature_rejects_nan_logits():
    logits = torch.full((4, 3), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(logits, torch.zeros(4, dtype=torch.long), split="calibration")


def test_params_refuse_val_split_with_reason():
    from overlock.params import ParamsError, parse_params

    with pytest.raises(ParamsError, match="calibrate.split.*evaluation split"):
        parse_params({"calibrate": {"split": "val"}})


def test_detection_matching_and_calibrators():
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 7, "name": "box"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [60, 60, 20, 20], "area": 400, "iscrowd": 0},
        ],
    }
    coco.createIndex()
    dets = [
        {"image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "score": 0.9},  # match gt 1
        {"image_id": 1, "category_id": 7, "bbox": [11, 11, 20, 20], "score": 0.8},  # duplicate: wrong
        {"image_id": 1, "category_id": 7, "bbox": [62, 61, 20, 20], "score": 0.4},  # match gt 2
        {"image_id": 1, "category_id": 7, "bbox": [40, 40, 5, 5], "score": 0.95},
    ]  # background: wrong
    scores, correct = match_detections(dets, coco, 0.5)
    assert dict(zip(scores.tolist(), correct.tolist())) == {0.95: False, 0.9: True, 0.8: False, 0.4: True}

    rng = np.random.default_rng(0)
    raw = rng.uniform(0.05, 0.99, 3000)
    true_p = 1 / (1 + np.exp(-np.log(raw / (1 - raw)) / 3))  # over-confident scores (true T = 3)
    hit = rng.uniform(size=raw.size) < true_p
    for method in ("temperature", "isotonic"):
        cal = fit_score_calibrator(method, raw, hit)
        before = binary_calibration(torch.tensor(raw), torch.tensor(hit))["ece"]
        after = binary_calibration(torch.tensor(cal(raw)), torch.tensor(hit))["ece"]
        assert after < before / 2, (method, before, after)
        assert np.allclose(ScoreCalibrator.from_dict(json.loads(json.dumps(cal.to_dict())))(raw), cal(raw))
    with pytest.raises(ValueError, match="both correct and wrong"):
        fit_score_calibrator("temperature", raw[:5], np.ones(5, bool))


@pytest.fixture(scope="session")
def calibrated(calib_eval_workspace, tmp_path_factory):
    """The calibrate stage run through the real CLI entry point (MLflow sqlite in the workspace)."""
    import os

    ws = calib_eval_workspace
    root = ws["root"]
    old = os.environ.get("OVERLOCK_REPO")
    os.environ["OVERLOCK_REPO"] = str(root)
    try:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's stages/ package
        from stages.calibrate import main

        rc = main(
            [
                "--params",
                str(root / "params.yaml"),
                "--data",
                str(ws["data"]),
                "--classifier",
                str(ws["classifier"]),
                "--detector",
                str(ws["detector"]),
                "--out",
                str(root / "models/calibration"),
                "--metrics",
                str(root / "metrics/calibrate.json"),
                "--plots",
                str(root / "plots/calibrate"),
            ]
        )
    finally:
        if old is None:
            os.environ.pop("OVERLOCK_REPO", None)
        else:
            os.environ["OVERLOCK_REPO"] = old
    assert rc == 0
    return {**ws, "calibration": root / "models/calibration"}


def test_calibrate_stage_lowers_nll_on_held_out_split(calibrated):
    root = calibrated["root"]
    temp = json.loads((calibrated["calibration"] / "temperature.json").read_text())
    assert temp["temperature"] > 1.2  # the fixture's classifier is over-confident
    assert temp["after"]["calibration"]["nll"] < temp["before"]["calibration"]["nll"]
    assert temp["after"]["val"]["nll"] < temp["before"]["val"]["nll"]
    assert temp["after"]["val"]["top1"] == temp["before"]["val"]["top1"]  # T never changes the argmax
    assert load_temperature(calibrated["calibration"]) == pytest.approx(temp["temperature"])
    metrics = json.loads((root / "metrics/calibrate.json").read_text())
    for key in (
        "val.ece_before",
        "val.ece_after",
        "val.mce_after",
        "val.adaptive_ece_after",
        "val.brier_after",
        "calibration.nll_after",
        "val.top1_before",
        "temperature",
    ):
        assert isinstance(metrics[key], float), key
    det = json.loads((calibrated["calibration"] / "detector_calibration.json").read_text())
    assert det["status"] == "skipped" and "detection_dataset" in det["reason"]
    with (root / "plots/calibrate/reliability.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert set(rows[0]) == {"confidence", "accuracy", "count", "when"}
    assert {r["when"] for r in rows} == {"before", "after"}
    assert sum(int(r["count"]) for r in rows if r["when"] == "before") == 3 * 8


def test_calibrate_stage_logs_to_mlflow(calibrated):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{calibrated['root']}/mlflow.db")
    exp = client.get_experiment_by_name("overlock-pipeline")
    runs = client.search_runs([exp.experiment_id], "tags.`overlock.stage` = 'calibrate'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["val.nll_after"] < runs[0].data.metrics["val.nll_before"]
    names = {a.path for a in client.list_artifacts(runs[0].info.run_id, "calibration")}
    assert "calibration/reliability_val.png" in names and "calibration/temperature.json" in names


def test_reliability_png_is_a_real_image(calibrated):
    from PIL import Image

    img = np.asarray(Image.open(calibrated["calibration"] / "reliability_val.png").convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 600
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50


def test_calibrate_fails_cleanly_without_a_classifier(calib_eval_workspace, tmp_path):
    from overlock.calibration.stage import run_calibrate
    from overlock.params import parse_params
    from overlock.pipeline.context import open_stage

    params = parse_params(calib_eval_workspace["raw_params"])
    paths = {"data": calib_eval_workspace["data"], "classifier": tmp_path / "nope", "detector": tmp_path / "det",
             "out": tmp_path / "out", "metrics": tmp_path / "m.json", "plots": tmp_path / "plots"}
    with pytest.raises(FileNotFoundError, match="dvc repro pretrain"):
        with open_stage("calibrate", params, track=False, **paths) as ctx:
            run_calibrate(ctx)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
