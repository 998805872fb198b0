"""The registered classifier serves: ``mlflow models serve`` from the registry, outside the checkout.

The tiny trained classifier of ``calib_eval_workspace`` and a fitted temperature are registered into a real
temporary sqlite MLflow store as the calibrate stage registers them (``overlock.serving.package``), then the
real ``mlflow models serve -m models:/overlock-classifier@latest-pipeline --env-manager local`` runs (once
for the module) from a temporary directory with an environment that hides this repository: no PYTHONPATH to
it, the editable install's path entries and finders removed, and an audit hook that refuses (and records)
every file opened under the repository's ``overlock``/``stages``/``pipelines`` (``sitecustomize`` below).
The model can only answer by importing the copy of ``overlock`` it carries. The README's "Deploy a
classifier" section shows the same commands.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEMPERATURE = 1.7
SERVER_START_TIMEOUT = 240

HIDE_REPO = textwrap.dedent('''
    """Test-only sitecustomize: hide the overlock repositories from this interpreter and its children."""
    import json, os, sys

    _roots = json.loads(os.environ["HIDDEN_REPOS"])
    _forbidden = [os.path.join(r, d) for r in _roots for d in ("overlock", "stages", "pipelines")]
    _log = os.environ["HIDDEN_REPOS_LOG"]

    def _inside(path, dirs):
        path = os.path.abspath(path)
        return any(path == d or path.startswith(d + os.sep) for d in dirs)

    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) not in _roots
                   and not _inside(p or os.getcwd(), _forbidden)]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]

    def _refuse(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if _inside(path, _forbidden):
                with open(_log, "a") as fh:
                    fh.write(f"{os.getpid()} {path}\\n")
                raise PermissionError(f"test: {path} is in the hidden repository")

    sys.addaudithook(_refuse)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _hidden_env(base: Path, uri: str) -> dict[str, str]:
    import overlock

    site = base / "hide_repo"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HIDE_REPO)
    roots = sorted({str(ROOT), str(Path(overlock.__file__).resolve().parents[1])})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "OVERLOCK", "MLFLOW"))}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1", HIDDEN_REPOS=json.dumps(roots),
               HIDDEN_REPOS_LOG=str(base / "hidden_opens.log"), MLFLOW_TRACKING_URI=uri,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}")
    return env


@pytest.fixture(scope="module")
def server(registered):
    """The real `mlflow models serve` of models:/overlock-classifier@latest-pipeline, shared by the module."""
    base = registered["base"]
    workdir = base / "elsewhere"
    workdir.mkdir()
    env = _hidden_env(base, registered["uri"])
    port = _free_port()
    log_path = base / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/overlock-classifier@latest-pipeline",
           "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {url}/ping after {SERVER_START_TIMEOUT}s:\n"
                            f"{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"url": url, "env": env, "workdir": workdir, "log": log_path, **registered}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def _invoke(url: str, images: list[bytes], params: dict | None = None) -> tuple[int, dict]:
    body = {"dataframe_split": {"columns": ["image"],
                                "data": [[base64.b64encode(b).decode("ascii")] for b in images]}}
    if params:
        body["params"] = params
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


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
    status, answer = _invoke(server["url"], images)
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
    status, answer = _invoke(server["url"], images[:1], params={"top_k": 2})
    assert status == 200 and len(answer["predictions"][0]["classes"]) == 2
    assert sum(answer["predictions"][0]["probabilities"]) < 1


def test_served_classifier_rejects_a_file_that_is_not_an_image(server):
    status, answer = _invoke(server["url"], [_jpeg((40, 30)), b"this is not a JPEG"])
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
