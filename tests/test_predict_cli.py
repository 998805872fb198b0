"""``overlock predict`` as a user runs it: the real console entry point in a subprocess, on a directory of
mixed real-size images (the project's generator: RGB, grayscale, CMYK and PNG-named-.JPEG files) plus RGBA,
palette-with-transparency and 16-bit PNGs and a broken file, with the tiny classifier of
``calib_eval_workspace`` (the detector's ``--task detect`` is tested in ``test_calibration_detector.py``)."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEMPERATURE = 2.3


@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory):
    """A directory of images of every kind and mode (and one broken file, one text file)."""
    from PIL import Image

    from overlock.data.synthetic_images import synthetic_image_bytes, write_synthetic_images

    root = tmp_path_factory.mktemp("predict_inputs")
    images = root / "images"
    write_synthetic_images(images, 4, seed=5)  # RGB, grayscale, CMYK JPEGs and a PNG named .JPEG, ~500x375
    rgb = np.asarray(Image.open(io.BytesIO(synthetic_image_bytes(7, 0, "rgb")[0])).convert("RGB"))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 90, np.uint8)]), "RGBA").save(images / "rgba.png")
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(images / "palette.png", transparency=0)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(images / "gray16.png")  # mode I;16
    (images / "nested").mkdir()
    Image.fromarray(gray).save(images / "nested" / "gray8.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (images / "notes.txt").write_text("not an image")
    calibration = root / "calibration"
    calibration.mkdir()
    (calibration / "temperature.json").write_text(json.dumps({"temperature": TEMPERATURE}))
    return {"images": images, "calibration": calibration, "workdir": root}


def _predict(args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "overlock.cli", "predict", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _reference(classifier: Path, paths: list[Path]) -> dict[str, np.ndarray]:
    """softmax(logits / T) of the model as trained, on the images as read_rgb reads them."""
    from overlock.inference.classifier import eval_transform, load_classifier, read_classifier_info
    from overlock.inference.images import read_rgb

    model = load_classifier(classifier)
    transform = eval_transform(model, read_classifier_info(classifier))
    with torch.no_grad():
        logits = model(torch.stack([transform(read_rgb(p)) for p in paths]))
    return {str(p): row for p, row in zip(paths, (logits / TEMPERATURE).softmax(1).numpy())}


def test_predict_a_directory_as_json_goes_on_after_a_broken_file(calib_eval_workspace, mixed_images):
    images, classifier = mixed_images["images"], calib_eval_workspace["classifier"]
    result = _predict([images, "--classifier", classifier, "--calibration", mixed_images["calibration"],
                       "--format", "json", "--batch-size", "3"], mixed_images["workdir"])
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert any(str(images / "broken.jpg") in e and "not a readable image" in e for e in errors), result.stderr
    assert "1 of 9 images could not be read" in result.stderr
    rows = json.loads(result.stdout)
    expected_files = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".jpeg", ".png", ".jpg")
                            and p.name != "broken.jpg")
    assert [r["image"] for r in rows] == [str(p) for p in expected_files]  # sorted, recursive, in order
    reference = _reference(classifier, expected_files)
    for row in rows:
        assert row["temperature"] == pytest.approx(TEMPERATURE)
        assert sum(row["probabilities"]) <= 1 + 1e-6
        np.testing.assert_allclose(row["probabilities"], reference[row["image"]][row["class_ids"]], atol=1e-5)
    by_name = {Path(r["image"]).name: r for r in rows}
    np.testing.assert_allclose(by_name["gray16.png"]["probabilities"], by_name["gray8.png"]["probabilities"],
                               atol=1e-6)  # 16-bit PNG scaled to 8 bits, not clipped to white


def test_predict_globs_as_csv_in_the_trained_form(calib_eval_workspace, mixed_images):
    images, classifier = mixed_images["images"], calib_eval_workspace["classifier"]
    out = mixed_images["workdir"] / "out" / "predictions.csv"
    result = _predict([images / "*.png", images / "img_000001.JPEG", images / "missing.jpg", "--classifier",
                       classifier / "final.pth", "--calibration", mixed_images["calibration"], "--format", "csv",
                       "--topk", "2", "--form", "trained", "--out", out], mixed_images["workdir"])
    assert result.returncode == 1 and "missing.jpg: no such file" in result.stderr, result.stderr
    rows = list(csv.DictReader(out.open()))
    names = [Path(p).name for p in dict.fromkeys(r["image"] for r in rows)]
    assert names == ["gray16.png", "palette.png", "rgba.png", "img_000001.JPEG"]
    assert [r["rank"] for r in rows] == ["1", "2"] * 4
    reference = _reference(classifier, [images / n for n in names])
    for r in rows:
        assert float(r["probability"]) == pytest.approx(reference[r["image"]][int(r["class_id"])], abs=1e-5)
        assert float(r["temperature"]) == pytest.approx(TEMPERATURE)
