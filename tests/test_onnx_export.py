"""``overlock export --format onnx`` (``overlock.onnx_export.main``) with real ONNX Runtime.

A tiny OverLoCK is written as a real pretrain-stage output (``write_classifier_outputs``: final.pth,
best.pth, model.json) plus a calibrate-stage ``temperature.json``; it is exported once per module through
the CLI entry point and the exported file is run with ONNX Runtime at batch 1 and 3 (the traced batch is 2)
against independently loaded PyTorch models.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from overlock.calibration.temperature import save_temperature
from overlock.models import create_overlock
from overlock.onnx_export import (ExportError, check_onnx, load_deploy_classifier, main, onnx_metadata,
                                  ort_session, read_onnx_metadata)
from overlock.training.checkpoints import write_classifier_outputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# 64 px: stage maps 16x16 down to 2x2 (below the ContMix kernels: the resize-and-pool path is exported too).
TINY = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 32, 64, 96], sub_num_heads=[2, 2])
CLASSES = [{"id": "n01", "name": "red fox"}, {"id": "n02", "name": "grey wolf"},
           {"id": "n03", "name": "lynx"}]
DATA_CONFIG = {"input_size": [3, 64, 64], "crop_pct": 0.875, "interpolation": "bilinear",
               "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
TEMPERATURE = 1.7361


def _tiny_trained(seed: int, trained_bn_stats) -> torch.nn.Module:
    """A tiny classifier with trained-looking BNs/GRNs/LayerScales and logits of order 1."""
    torch.manual_seed(seed)
    model = trained_bn_stats(create_overlock("xt", num_classes=len(CLASSES), **TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta")) or ".ls" in name or "_scale" in name:
                p.uniform_(-0.5, 0.5)
        model.head[-1].weight.mul_(50)
    return model


def _write_pretrain_output(model, out):
    """final.pth/best.pth/model.json exactly as the pretrain stage writes them."""
    meta = {"arch": "overlock", "size": "xt", "model_kwargs": TINY, "num_classes": len(CLASSES),
            "classes": CLASSES}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"meta": meta, "model": weights, "ema": weights, "epoch": 1,
             "history": [{"epoch": 1, "val_top1": 0.5}],
             "best": {"model": weights, "ema": weights, "epoch": 1, "metrics": {"val_top1": 0.5}}}
    info = {"arch": "overlock", "size": "xt", "timm_name": "overlock_xt", "model_kwargs": TINY,
            "num_classes": len(CLASSES), "classes": CLASSES, **DATA_CONFIG}
    write_classifier_outputs(state, info, out)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_bn_stats):
    root = tmp_path_factory.mktemp("onnx_export")
    model = _tiny_trained(3, trained_bn_stats).eval()
    classifier = _write_pretrain_output(model, root / "models/classifier")
    save_temperature(root / "models/calibration", TEMPERATURE, before={"nll": 1.0}, after={"nll": 0.8})
    out = root / "models/classifier.onnx"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["--checkpoint", str(classifier), "--out", str(out), "--format", "onnx",
                     "--calibration", str(root / "models/calibration")])
    assert code == 0, stdout.getvalue()
    return {"root": root, "classifier": classifier, "onnx": out, "model": model, "stdout": stdout.getvalue()}


def _onnx_logits(path, images):
    return torch.from_numpy(ort_session(path).run(["logits"], {"images": images.numpy()})[0])


def test_onnx_runtime_matches_pytorch_at_batch_1_and_3(exported, trained_bn_stats):
    # the check the CLI ran, printed for both batch sizes (traced at 2: these prove the dynamic batch)
    assert "check batch 1:" in exported["stdout"] and "check batch 3:" in exported["stdout"]
    trained_form = exported["model"]  # as trained (dilated branches, BNs), not the exported deploy object
    other = _tiny_trained(4, trained_bn_stats).eval()  # same architecture, other weights
    torch.manual_seed(11)
    for batch in (1, 3):
        images = torch.randn(batch, *DATA_CONFIG["input_size"])
        got = _onnx_logits(exported["onnx"], images)
        with torch.no_grad():
            expected, wrong = trained_form(images), other(images)
        assert got.shape == (batch, len(CLASSES))
        scale = float(expected.abs().max())
        assert scale > 0.1  # non-trivial logits
        diff = float((got - expected).abs().max())
        assert diff <= 1e-4 + 1e-4 * scale, (batch, diff, scale)
        assert float((got - wrong).abs().max()) > 100 * (1e-4 + 1e-4 * scale)


def test_the_check_rejects_a_slightly_different_model(exported, trained_bn_stats):
    model = _tiny_trained(3, trained_bn_stats).eval().reparameterize(remove_aux_head=True)
    rows = check_onnx(model, exported["onnx"], DATA_CONFIG["input_size"])
    assert [r["batch"] for r in rows] == [1, 3] and all(r["max_rel"] < 1e-4 for r in rows)
    with torch.no_grad():
        model.head[-1].bias.add_(torch.tensor([0.0, 0.01, 0.0]))  # one logit moved by 0.01
    with pytest.raises(ExportError, match="differs from PyTorch at batch 1"):
        check_onnx(model, exported["onnx"], DATA_CONFIG["input_size"])


def test_preprocessing_classes_and_temperature_travel_in_the_metadata(exported):
    meta = read_onnx_metadata(exported["onnx"])
    for key, value in DATA_CONFIG.items():
        assert meta[key] == value, key
    assert meta["classes"] == ["red fox", "grey wolf", "lynx"]
    assert meta["temperature"] == TEMPERATURE
    assert meta["timm_name"] == "overlock_xt" and meta["model_kwargs"] == TINY
    assert meta["checkpoint"] == "final.pth" and meta["weights"] == "state_dict"
    # what an onnxruntime-only consumer sees
    raw = ort_session(exported["onnx"]).get_modelmeta().custom_metadata_map
    assert json.loads(raw["mean"]) == DATA_CONFIG["mean"] and raw["interpolation"] == "bilinear"
    session = ort_session(exported["onnx"])
    assert session.get_inputs()[0].shape[0] == "batch" and session.get_outputs()[0].name == "logits"


def test_a_checkpoint_file_loads_as_the_deploy_form_without_a_temperature(exported):
    classifier = load_deploy_classifier(exported["classifier"] / "best.pth", ema=True)
    assert classifier.checkpoint.name == "best.pth" and classifier.weights == "state_dict_ema"
    assert classifier.data_config == DATA_CONFIG and not hasattr(classifier.model, "aux_head")
    meta = onnx_metadata(classifier)
    assert "temperature" not in meta and meta["checkpoint"] == "best.pth"
    images = torch.randn(2, *DATA_CONFIG["input_size"])
    with torch.inference_mode():
        expected = classifier.model(images)
    np.testing.assert_allclose(_onnx_logits(exported["onnx"], images), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["missing", "no-model-json", "not-a-checkpoint", "detector-weights",
                                  "missing-calibration"])
def test_bad_checkpoints_get_a_clear_error_and_no_output(case, exported, tmp_path, capsys):
    checkpoint, extra = tmp_path / "nowhere", []
    expected = "does not exist"
    if case == "no-model-json":
        checkpoint = tmp_path / "detector"
        checkpoint.mkdir()
        torch.save({"state_dict": {"backbone.w": torch.zeros(1)}}, checkpoint / "latest.pth")
        expected = "not a pipeline classifier: no model.json"
    elif case in ("not-a-checkpoint", "detector-weights"):
        checkpoint = tmp_path / "classifier"
        checkpoint.mkdir()
        (checkpoint / "model.json").write_text((exported["classifier"] / "model.json").read_text())
        if case == "not-a-checkpoint":
            (checkpoint / "final.pth").write_text("not a checkpoint")
            expected = "not a readable PyTorch checkpoint"
        else:
            torch.save({"state_dict": {"backbone.patch_embed1.0.weight": torch.zeros(8, 3, 3, 3)}},
                       checkpoint / "final.pth")
            expected = "does not match the classifier"
    elif case == "missing-calibration":
        checkpoint, extra = exported["classifier"], ["--calibration", str(tmp_path / "calibration")]
        expected = "no temperature.json"
    out = tmp_path / "out" / "model.onnx"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), *extra]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))  # nothing partial


def test_readme_onnxruntime_snippet_gives_the_pipelines_calibrated_probabilities(exported, tmp_path):
    """The README's consumer code (onnxruntime + the metadata only) against the PyTorch pipeline's own
    preprocessing (``eval_transform`` of model.json), weights and temperature."""
    from PIL import Image

    from overlock.inference.classifier import eval_transform, load_classifier, read_classifier_info

    paths = []
    for i, size in enumerate([(90, 70), (50, 120)]):
        rgb = np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rgb).save(paths[-1])

    # --- as in README "Deploy a classifier"
    import onnxruntime as ort
    from timm.data import create_transform

    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    transform = create_transform(input_size=json.loads(meta["input_size"]), crop_pct=float(meta["crop_pct"]),
                                 interpolation=meta["interpolation"], mean=json.loads(meta["mean"]),
                                 std=json.loads(meta["std"]))
    classes, temperature = json.loads(meta["classes"]), float(meta.get("temperature", 1.0))
    images = np.stack([transform(Image.open(p).convert("RGB")).numpy() for p in paths])
    logits = session.run(["logits"], {"images": images})[0] / temperature
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    # ---

    info = read_classifier_info(exported["classifier"])
    model = load_classifier(exported["classifier"])
    pipeline = eval_transform(model, info)
    with torch.no_grad():
        expected = (model(torch.stack([pipeline(Image.open(p).convert("RGB")) for p in paths])) / TEMPERATURE)
    np.testing.assert_allclose(probs, expected.softmax(1).numpy(), atol=1e-5)
    assert classes == info.class_names and temperature == TEMPERATURE


def test_registered_pyfunc_serves_the_deploy_form_of_the_chosen_weights(exported, tmp_path):
    """The MLflow model the calibrate stage registers (overlock.serving), from best.pth's EMA weights: a JPEG
    in, softmax(logits / T) of the tiny OverLoCK as trained out (the pyfunc runs the re-parameterized form)."""
    import mlflow
    import pandas as pd

    from overlock.inference.classifier import eval_transform, load_classifier, read_classifier_info
    from overlock.inference.images import read_rgb
    from overlock.params import parse_params
    from overlock.serving.package import example_jpeg, register_classifier
    from overlock.tracking import start_stage

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = start_stage("calibrate", parse_params({"tracking": {"uri": uri}}), root=tmp_path)
    version = register_classifier(run, exported["classifier"] / "best.pth", exported["root"] / "models/calibration",
                                  ema=True)
    run.finish()
    tags = mlflow.tracking.MlflowClient(uri).get_model_version("overlock-classifier", version).tags
    assert tags["overlock.weights"] == "best" and tags["overlock.ema"] == "true"
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/overlock-classifier@latest-pipeline")
    jpeg = example_jpeg((300, 200), seed=3)
    answer = model.predict(pd.DataFrame({"image": [jpeg]}), params={"top_k": 3}).iloc[0]
    trained = load_classifier(exported["classifier"], ema=True)
    x = eval_transform(trained, read_classifier_info(exported["classifier"]))(read_rgb(jpeg))[None]
    with torch.no_grad():
        out = trained(x)
    expected = ((out[0] if isinstance(out, (tuple, list)) else out) / TEMPERATURE).softmax(1)[0]
    assert answer["classes"] == [CLASSES[i]["name"] for i in answer["class_ids"]]
    np.testing.assert_allclose(answer["probabilities"], expected[answer["class_ids"]].numpy(), atol=1e-4)
