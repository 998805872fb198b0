"""The registered classifier serves: ``mlflow models serve`` from the registry, outside the checkout.

The tiny trained classifier of ``calib_eval_workspace`` and a fitted temperature are registered into a real
temporary sqlite MLflow store as the calibrate stage registers them (``overlock.serving.package``), then the
real ``mlflow models serve -m models:/overlock-classifier@latest-pipeline --env-manager local`` runs (once
for the module) from a temporary directory with an environment that hides this repository: no PYTHONPATH to
it, the editable install's path entries and finders removed, and an audit hook that refuses (and records)
every file opened under the repository's ``overlock``/``stages``/``pipelines`` (``tests/mlflow_serving.py``).
The model can only answer by importing the copy of ``overlock`` it carries. The README's "Deploy a
classifier" section shows the same commands.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow_serving import ROOT, invoke, served

TEMPERATURE = 1.7


def _jpeg(size=(640, 480), seed=1) -> bytes:
    from overlock.data.synthetic_images import photo_like

    buf = io.BytesIO()
    photo_like(np.random.default_rng(seed), size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG") if mode else Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def registered(calib_eval_workspace, tmp_path_factory):
    """The classifier registered as the calibrate stage registers it; {"uri", "version", "workdir"}."""
    from overlock.params import parse_params
    from overlock.serving.package import register_classifier
    from overlock.tracking import start_stage

    base = tmp_path_factory.mktemp("serving")
    calibration = base / "calibration"
    calibration.mkdir()
    (calibration / "temperature.json").write_text(json.dumps({"temperature": TEMPERATURE}))
    uri = f"sqlite:///{base / 'store' / 'mlflow.db'}"
    (base / "store").mkdir()
    params = parse_params({"tracking": {"uri": uri, "experiment": "serving"}})
    run = start_stage("calibrate", params, root=base)
    version = register_classifier(run, calib_eval_workspace["classifier"] / "final.pth", calibration)
    run.finish()
    return {"uri": uri, "version": version, "base": base, "classifier": calib_eval_workspace["classifier"]}


@pytest.fixture(scope="module")
def server(registered):
    """The real `mlflow models serve` of models:/overlock-classifier@latest-pipeline, shared by the module."""
    with served("models:/overlock-classifier@latest-pipeline", registered["base"], registered["uri"]) as srv:
        yield {**srv, **registered}


def _reference_probabilities(classifier: Path, images: list[bytes]) -> torch.Tensor:
    """softmax(logits / T) of PyTorch's own output of the model as trained (not the served deploy form)."""
    from overlock.inference.classifier import eval_transform, load_classifier, read_classifier_info
    from overlock.inference.images import read_rgb

    model = load_classifier(classifier)
    transform = eval_transform(model, read_classifier_info(classifier))
    with torch.no_grad():
        logits = model(torch.stack([transform(read_rgb(b)) for b in images]))
    return (logits / TEMPERATURE).softmax(1)


def test_the_environment_hides_the_repository(server):
    """The server's environment cannot import this repository's overlock (so the model used its own copy)."""
    probe = subprocess.run([sys.executable, "-c", "import overlock"], cwd=server["workdir"], env=server["env"],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "No module named 'overlock'" in probe.stderr, probe.stderr
    opened = server["base"] / "hidden_opens.log"
    assert not opened.exists(), f"the server opened repository files:\n{opened.read_text()}"


def test_served_classifier_answers_calibrated_top5_of_jpegs_of_any_size(server):
    from PIL import Image

    gray = np.asarray(Image.open(io.BytesIO(_jpeg((300, 500), seed=2))).convert("L"))
    rgba = np.dstack([np.asarray(Image.open(io.BytesIO(_jpeg((97, 61), seed=3)))), np.full((61, 97), 128, np.uint8)])
    images = [_jpeg((640, 480)), _jpeg((33, 1200), seed=4), _png(gray), _png(rgba, "RGBA")]
    status, answer = invoke(server["url"], images)
    assert status == 200, answer
    rows = answer["predictions"]
    expected = _reference_probabilities(server["classifier"], images)
    names = [c["name"] for c in json.loads((server["classifier"] / "model.json").read_text())["classes"]]
    assert len(rows) == len(images)
    for row, probs in zip(rows, expected):
        assert len(row["classes"]) == len(row["probabilities"]) == min(5, len(names))
        assert row["probabilities"] == sorted(row["probabilities"], reverse=True)
        assert sum(row["probabilities"]) <= 1 + 1e-6
        assert [names[i] for i in row["class_ids"]] == row["classes"]
        np.testing.assert_allclose(row["probabilities"], probs[row["class_ids"]].numpy(), atol=1e-5)
    status, answer = invoke(server["url"], images[:1], params={"top_k": 2})
    assert status == 200 and len(answer["predictions"][0]["classes"]) == 2
    assert sum(answer["predictions"][0]["probabilities"]) < 1


def test_served_classifier_rejects_a_file_that_is_not_an_image(server):
    status, answer = invoke(server["url"], [_jpeg((40, 30)), b"this is not a JPEG"])
    assert status == 400
    assert "row 1" in answer["message"] and "not a readable image" in answer["message"]


def test_registered_version_carries_code_signature_example_and_tags(registered):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(registered["uri"])
    version = client.get_model_version_by_alias("overlock-classifier", "latest-pipeline")
    assert str(version.version) == registered["version"]
    assert version.tags["overlock.weights"] == "final" and version.tags["overlock.ema"] == "false"
    assert float(version.tags["overlock.temperature"]) == pytest.approx(TEMPERATURE)
    mlflow.set_tracking_uri(registered["uri"])
    local = Path(mlflow.artifacts.download_artifacts("models:/overlock-classifier@latest-pipeline",
                                                     dst_path=str(registered["base"] / "download")))
    carried = local / "code/overlock/inference/predictor.py"
    assert carried.read_text() == (ROOT / "overlock/inference/predictor.py").read_text()
    mlmodel = (local / "MLmodel").read_text()
    assert "binary" in mlmodel and "top_k" in mlmodel and "probabilities" in mlmodel
    assert (local / "serving_input_example.json").exists()
