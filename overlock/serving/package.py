"""Packaging the trained models as self-contained MLflow pyfunc models and registering them.

Each model directory holds the weights, the preprocessing, the fitted calibration, an input example (one
small JPEG) with the signature MLflow infers by running the model on it, and a copy of the ``overlock``
package (``code/overlock``: MLflow puts ``code/`` first on ``sys.path`` when it loads the model), so a
server started anywhere with this environment's packages answers without this repository.
"""
from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from overlock.inference.calibrated import DETECTOR_CALIBRATION_FILE, TEMPERATURE_FILE
from overlock.serving import WEIGHTS_FILE

log = logging.getLogger(__name__)

__all__ = ["CLASSIFIER_NAME", "DETECTOR_NAME", "ALIAS", "register_classifier", "register_detector",
           "register_served_models", "example_jpeg"]

CLASSIFIER_NAME, DETECTOR_NAME, ALIAS = "overlock-classifier", "overlock-detector", "latest-pipeline"
INPUT_DOC = "DataFrame column 'image': encoded image files (JPEG, PNG, ...; base64 in JSON requests)"
CLASSIFIER_REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "pandas", "pillow", "pydantic", "pyyaml")
DETECTOR_REQUIREMENTS = (*CLASSIFIER_REQUIREMENTS, "mmcv-full", "mmdet", "pycocotools")


def _requirements(dists) -> list[str]:
    reqs = []
    for dist in dists:
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return reqs


def copy_package_code(dest: Path) -> Path:
    """A copy of the installed ``overlock`` package (sources and package data, no bytecode) in ``dest``."""
    import overlock

    source = Path(overlock.__file__).resolve().parent
    target = Path(dest) / "overlock"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def example_jpeg(size: tuple[int, int] = (96, 72), seed: int = 0) -> bytes:
    """A small JPEG of smooth colour with a bright disc (the input example of both models)."""
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = rng.uniform(40, 200, 3)
    img = base + 50 * np.stack([np.sin(3 * xx), np.cos(2 * yy), np.sin(2 * (xx + yy))], -1)
    disc = (xx - 0.5 * w / max(h, w)) ** 2 + (yy - 0.5 * h / max(h, w)) ** 2 < 0.04
    img[disc] = rng.uniform(150, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _example(params: dict):
    import pandas as pd

    return pd.DataFrame({"image": [example_jpeg()]}), params


def register_classifier(run, checkpoint: Path, calibration: Path | None, *, ema: bool = False,
                        weights: str | None = None, alias: str = ALIAS) -> str:
    """Log the classifier at ``checkpoint`` (a pretrain .pth with model.json beside it) as the pyfunc model
    ``classifier`` of ``run`` and register it as ``overlock-classifier`` with ``alias``. ``weights`` names the
    checkpoint for the tag (default: the file's stem, e.g. ``final``/``best``). Returns the version."""
    from overlock.serving.classifier_model import ClassifierModel

    checkpoint = Path(checkpoint)
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    key = "state_dict_ema" if ema else "state_dict"
    if not payload.get(key):
        raise ValueError(f"{checkpoint} has no {key!r}" + (" (trained without EMA)" if ema else ""))
    temperature = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "classifier"
        model_dir.mkdir()
        shutil.copy2(checkpoint.parent / "model.json", model_dir / "model.json")
        torch.save({"state_dict": payload[key], **{k: v for k, v in payload.items()
                                                   if k in ("arch", "size", "num_classes", "classes", "epoch")}},
                   model_dir / WEIGHTS_FILE)
        artifacts = {"classifier": str(model_dir)}
        if calibration is not None and (Path(calibration) / TEMPERATURE_FILE).exists():
            artifacts["calibration"] = str(Path(calibration) / TEMPERATURE_FILE)
            temperature = json.loads((Path(calibration) / TEMPERATURE_FILE).read_text())["temperature"]
        tags = {"overlock.weights": weights or checkpoint.stem, "overlock.ema": str(ema).lower(),
                "overlock.form": "deploy (re-parameterized, no aux head)",
                "overlock.temperature": f"{temperature:.6g}" if temperature is not None else "none (uncalibrated)",
                "overlock.input": INPUT_DOC, "overlock.output": "top-k classes, class_ids, calibrated probabilities"}
        return run.log_pyfunc_model(
            "classifier", ClassifierModel(), artifacts=artifacts, code_paths=[str(copy_package_code(tmp / "code"))],
            input_example=_example({"top_k": 5}), pip_requirements=_requirements(CLASSIFIER_REQUIREMENTS),
            registered_name=CLASSIFIER_NAME, alias=alias, tags=tags)


def register_detector(run, detector_dir: Path, calibration: Path | None, *, alias: str = ALIAS) -> str:
    """Log the detector of ``detector_dir`` (config.py + detector.pth) with the fitted score calibration as
    the pyfunc model ``detector`` of ``run`` and register it as ``overlock-detector``. Returns the version."""
    from overlock.inference.detector import load_score_calibrator
    from overlock.serving.detector_model import DetectorModel

    detector_dir = Path(detector_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "detector"
        model_dir.mkdir()
        for name in ("config.py", "detector.pth"):
            shutil.copy2(detector_dir / name, model_dir / name)
        artifacts = {"detector": str(model_dir)}
        calibrator = load_score_calibrator(calibration) if calibration is not None else None
        if calibrator is not None:
            artifacts["calibration"] = str(Path(calibration) / DETECTOR_CALIBRATION_FILE)
        tags = {"overlock.weights": "final (detector.pth)",
                "overlock.score_calibration": calibrator.method if calibrator else "none (raw scores)",
                "overlock.input": INPUT_DOC,
                "overlock.output": "boxes [x1,y1,x2,y2], labels, label_ids, calibrated scores, raw_scores, "
                                   "masks (COCO RLE)"}
        return run.log_pyfunc_model(
            "detector", DetectorModel(), artifacts=artifacts, code_paths=[str(copy_package_code(tmp / "code"))],
            input_example=_example({"score_threshold": 0.05}), pip_requirements=_requirements(DETECTOR_REQUIREMENTS),
            registered_name=DETECTOR_NAME, alias=alias, tags=tags)


def register_served_models(run, classifier_dir: Path, detector_dir: Path | None, calibration: Path,
                           detector_ready: bool) -> dict[str, str]:
    """Register the classifier (the raw weights of ``final.pth`` the temperature was fitted on, else
    ``best.pth``) and, when ``detector_ready``, the detector. Returns {registered name: version}."""
    from overlock.inference.classifier import read_checkpoint

    _, checkpoint = read_checkpoint(classifier_dir)
    versions = {CLASSIFIER_NAME: register_classifier(run, checkpoint, calibration)}
    if detector_ready and detector_dir is not None:
        versions[DETECTOR_NAME] = register_detector(run, detector_dir, calibration)
    for name, ver in versions.items():
        log.info("registered %s version %s (alias %s)", name, ver, ALIAS)
    return versions
