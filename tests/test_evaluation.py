"""Evaluation: the evaluate stage on a tiny trained classifier, its report, plots, metrics; `overlock predict`."""

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run_stage(module: str, root: Path, args: list[str]) -> int:
    old = os.environ.get("OVERLOCK_REPO")
    os.environ["OVERLOCK_REPO"] = str(root)
    sys.path.insert(0, str(REPO))  # the repo's stages/ package
    try:
        return __import__(module, fromlist=["main"]).main(["--params", str(root / "params.yaml"), *args])
    finally:
        sys.path.remove(str(REPO))
        if old is None:
            os.environ.pop("OVERLOCK_REPO", None)
        else:
            os.environ["OVERLOCK_REPO"] = old


@pytest.fixture(scope="session")
def evaluated(calib_eval_workspace):
    """calibrate then evaluate through the stages' real entry points."""
    ws = calib_eval_workspace
    root = ws["root"]
    common = [
        "--data",
        str(ws["data"]),
        "--classifier",
        str(ws["classifier"]),
        "--detector",
        str(ws["detector"]),
    ]
    if not (root / "models/calibration/temperature.json").exists():
        assert (
            _run_stage(
                "stages.calibrate",
                root,
                [
                    *common,
                    "--out",
                    str(root / "models/calibration"),
                    "--metrics",
                    str(root / "metrics/calibrate.json"),
                    "--plots",
                    str(root / "plots/calibrate"),
                ],
            )
            == 0
        )
    assert (
        _run_stage(
            "stages.evaluate",
            root,
            [
                *common,
                "--calibration",
                str(root / "models/calibration"),
                "--out",
                str(root / "reports"),
                "--metrics",
                str(root / "metrics/evaluate.json"),
                "--plots",
                str(root / "plots/evaluate"),
            ],
        )
        == 0
    )
    return {**ws, "reports": root / "reports"}


def test_report_has_every_section_and_embeds_figures(evaluated):
    from overlock.evaluation.report import DEMO_NOTE, SECTIONS

    md = (evaluated["reports"] / "report.md").read_text()
    html = (evaluated["reports"] / "report.html").read_text()
    for section in SECTIONS:
        assert f"## {section}" in md, section
        assert f">{section}</h2>" in html, section
    assert DEMO_NOTE in md  # demo data: published columns are not compared
    assert (
        "T = " in md
        and "does **not count**" in md
        and "incl. ContMix" in md
        and "Skipped: data.detection_dataset" in md
    )
    assert html.count('src="data:image/png;base64,') >= 7  # self-contained
    for name in (
        "confusion.png",
        "per_class_accuracy.png",
        "erf.png",
        "gradcam.png",
        "training_curves.png",
        "reliability_val.png",
        "speed.png",
    ):
        assert f"]({name})" in md, name


@pytest.mark.parametrize(
    "name",
    ["confusion.png", "per_class_accuracy.png", "erf.png", "gradcam.png", "training_curves.png", "speed.png"],
)
def test_pngs_are_real_images(evaluated, name):
    from PIL import Image

    img = np.asarray(Image.open(evaluated["reports"] / name).convert("RGB")).astype(float)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 30


def test_metrics_plots_and_mlflow(evaluated):
    root = evaluated["root"]
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert 0.5 < metrics["val.top1"] <= 1.0  # better than chance (1/3)
    assert 0 <= metrics["val.top1_ema"] <= 1
    assert metrics["val.nll_calibrated"] < metrics["val.nll"]
    assert metrics["complexity.train.params_m"] == pytest.approx(
        sum(p.numel() for p in __import__("timm").create_model("test_resnet", num_classes=3).parameters())
        / 1e6
    )
    assert metrics["complexity.train.gflops"] > 0 and metrics["complexity.train.throughput"] > 0
    assert 0 < metrics["erf.area_ratio_20"] < metrics["erf.area_ratio_99"] <= 1
    assert metrics["detection.status"] == "skipped"
    with (root / "plots/evaluate/per_class_accuracy.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class"] for r in rows] == ["red", "green", "blue"]
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("overlock-pipeline")
    run = client.search_runs([exp.experiment_id], "tags.`overlock.stage` = 'evaluate'")[0]
    assert run.info.status == "FINISHED" and run.data.metrics["val.top1"] == pytest.approx(
        metrics["val.top1"]
    )
    names = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.html", "report/gradcam.png"} <= names


def test_predict_prints_calibrated_topk(evaluated, capsys):
    from PIL import Image

    from overlock.evaluation.predict import main
    from overlock.inference.predictor import ClassifierPredictor

    image = next((evaluated["data"] / "classification/val/c2").glob("*.png"))
    args = [
        str(image),
        "--classifier",
        str(evaluated["classifier"]),
        "--calibration",
        str(evaluated["root"] / "models/calibration"),
        "--topk",
        "2",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "calibrated, T=" in out and out.count("%") == 2
    calibrated = ClassifierPredictor.load(evaluated["classifier"], evaluated["root"] / "models/calibration")
    uncalibrated = ClassifierPredictor.load(evaluated["classifier"], None)
    images = [Image.open(image).convert("RGB")]
    cal = calibrated.top_k(calibrated.probabilities(images), 3)[0]
    raw = uncalibrated.top_k(uncalibrated.probabilities(images), 3)[0]
    assert cal.classes == raw.classes  # T keeps the ranking
    assert cal.probabilities[0] < raw.probabilities[0]  # over-confident model: T > 1 softens
    assert set(raw.classes) == {"red", "green", "blue"}


def test_predict_reports_bad_input(evaluated, tmp_path, capsys):
    from overlock.evaluation.predict import main

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    assert main([str(bad), "--classifier", str(evaluated["classifier"])]) == 1  # reported; the batch goes on
    assert f"error: {bad}: not a readable image" in capsys.readouterr().err
    assert main([str(bad), "--classifier", str(tmp_path / "none")]) == 2
    assert "dvc repro pretrain" in capsys.readouterr().err


def test_erf_of_a_single_conv_is_its_kernel_footprint():
    from torch import nn

    from overlock.evaluation.erf import effective_receptive_field, high_contribution_ratio

    class OneConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 5, padding=2)

        def forward_features(self, x):
            return self.conv(x)

    contribution = effective_receptive_field(OneConv(), torch.randn(2, 3, 17, 17))
    nonzero = np.argwhere(contribution > 0)
    assert nonzero.min(0).tolist() == [6, 6] and nonzero.max(0).tolist() == [10, 10]  # 5x5 around the centre
    assert high_contribution_ratio(contribution, 0.99) <= 25 / 17**2


def test_report_renders_tables_and_escapes(tmp_path):
    from overlock.evaluation.report import Report, table

    report = Report("t")
    report.add("Summary", table(["a", "b"], [["x|y", 0.123456], ["z", float("nan")]]))
    _, html_path = report.write(tmp_path)
    html = html_path.read_text()
    assert "<table>" in html and "x|y" in html and "0.1235" in html and "—" in html
    with pytest.raises(KeyError, match="valid"):
        report.add("Nope", "x")


def test_dvc_metrics_show_lists_calibrate_and_evaluate_metrics(evaluated, tmp_path):
    import shutil
    import subprocess

    dvc = str(Path(sys.executable).parent / "dvc")
    for name in ("calibrate.json", "evaluate.json"):
        (tmp_path / "metrics").mkdir(exist_ok=True)
        shutil.copy2(evaluated["root"] / "metrics" / name, tmp_path / "metrics" / name)
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - metrics/calibrate.json\n  - metrics/evaluate.json\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=env, capture_output=True)
    shown = json.loads(
        subprocess.run(
            [dvc, "metrics", "show", "--json"],
            cwd=tmp_path,
            check=True,
            env=env,
            capture_output=True,
            text=True,
        ).stdout
    )
    data = next(iter(shown.values()))["data"]
    assert data["metrics/evaluate.json"]["data"]["val.top1"] == pytest.approx(
        json.loads((evaluated["root"] / "metrics/evaluate.json").read_text())["val.top1"]
    )
    assert "val.ece_after" in data["metrics/calibrate.json"]["data"]


def test_coco_per_class_ap_and_drawing_with_pycocotools(tmp_path):
    from PIL import Image
    from pycocotools.coco import COCO

    from overlock.evaluation.detection import coco_evaluate, draw_gt_vs_pred

    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 64, "height": 64, "file_name": f"{i}.png"} for i in (1, 2)],
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [4, 4, 20, 20],
                "area": 400,
                "iscrowd": 0,
                "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]],
            },
            {
                "id": 2,
                "image_id": 2,
                "category_id": 2,
                "bbox": [30, 30, 20, 20],
                "area": 400,
                "iscrowd": 0,
                "segmentation": [[30, 30, 50, 30, 50, 50, 30, 50]],
            },
        ],
    }
    coco.createIndex()
    results = {
        "bbox": [
            {"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9},
            {"image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.8},
        ],
        "segm": [],
    }
    ev = coco_evaluate(coco, results["bbox"], "bbox")
    assert ev["per_class"]["square"] == pytest.approx(1.0) and ev["per_class"]["disc"] == pytest.approx(0.0)
    assert ev["summary"]["AP"] == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    for i in (1, 2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    png = draw_gt_vs_pred(coco, str(tmp_path), results, [1, 2], tmp_path / "det.png")
    img = np.asarray(Image.open(png).convert("RGB")).astype(float)
    assert img.shape[0] > 400 and img.std() > 10


def test_detector_parts_skip_with_reason_when_no_detector(tmp_path):
    from overlock.calibration.detection import calibrate_detector
    from overlock.params import parse_params

    params = parse_params({"data": {"detection_dataset": "demo_coco"}})
    result = calibrate_detector(params, tmp_path / "detector", tmp_path / "data", "cpu")
    assert result["status"] == "skipped" and "detector.pth" in result["reason"]
