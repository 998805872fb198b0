"""Evaluation parts on the real OverLoCK model (tiny overrides): loading, FLOPs both ways, re-param, ERF, Grad-CAM."""

import json

import numpy as np
import pytest
import torch

TINY = {
    "depth": [1, 1, 1, 1],
    "sub_depth": [1, 1],
    "embed_dim": [16, 32, 48, 64],
    "sub_num_heads": [2, 2],
    "projection": 64,
}


@pytest.fixture(scope="module")
def tiny_overlock(tmp_path_factory):
    """A tiny OverLoCK written in the pretrain-output format and loaded back through load_classifier."""
    import timm

    import overlock.models  # noqa: F401  (registers overlock_*)
    from overlock.inference.classifier import load_classifier

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("overlock_classifier")
    model = timm.create_model("overlock_xt", num_classes=3, **TINY)
    classes = [{"id": f"c{i}", "name": n} for i, n in enumerate(("a", "b", "c"))]
    torch.save(
        {
            "state_dict": model.state_dict(),
            "arch": "overlock",
            "size": "xt",
            "model_kwargs": TINY,
            "num_classes": 3,
            "classes": classes,
            "epoch": 0,
            "metrics": {},
        },
        out / "final.pth",
    )
    (out / "model.json").write_text(
        json.dumps(
            {
                "arch": "overlock",
                "size": "xt",
                "timm_name": "overlock_xt",
                "model_kwargs": TINY,
                "num_classes": 3,
                "classes": classes,
                "input_size": [3, 64, 64],
                "crop_pct": 0.925,
                "interpolation": "bicubic",
                "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225],
            }
        )
    )
    loaded = load_classifier(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-5)
    assert load_classifier(out, ema=True) is None  # no EMA weights in this checkpoint
    return loaded


def test_complexity_counts_contmix_both_ways_and_reparam_is_exact(tiny_overlock):
    from overlock.evaluation.complexity import complexity_report, reparameterized_copy

    report = complexity_report(tiny_overlock, 64, batch=2, iters=1)
    train, reparam = report["forms"]["train form"], report["forms"]["re-parameterized"]
    assert train["gflops_with_contmix"] > train["gflops"] > 0
    assert reparam["params"] < train["params"] and reparam["params"] == reparam["params_no_aux"]
    assert reparam["gflops"] < train["gflops"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(reparameterized_copy(tiny_overlock)(x), tiny_overlock.eval()(x), atol=1e-4)


def test_official_xt_parameter_count_matches_the_release():
    import timm

    from overlock.evaluation.complexity import count_parameters, reparameterized_copy
    from overlock.evaluation.report import published_results

    counts = published_results()["overlock_official_param_counts"]["overlock_xt"]
    model = timm.create_model("overlock_xt")
    assert count_parameters(model) == counts["train_form"]
    assert count_parameters(reparameterized_copy(model)) == counts["reparam_no_aux"]


def test_erf_and_gradcam_on_overlock(tiny_overlock):
    from overlock.evaluation.erf import effective_receptive_field
    from overlock.evaluation.gradcam import gradcam_maps, last_spatial_layer

    x = torch.randn(2, 3, 64, 64)
    erf = effective_receptive_field(tiny_overlock, x)
    assert erf.shape == (64, 64) and erf.max() > 0 and np.isfinite(erf).all()
    layer = last_spatial_layer(tiny_overlock, x)
    assert layer is tiny_overlock.head[2]  # last spatial map of the last stage, before pooling
    maps = gradcam_maps(tiny_overlock, x, targets=[0, 1])
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()
