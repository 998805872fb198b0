"""OverLoCK architecture facts: official state-dict layout, parameter counts, FLOPs, timm registration,
channels_last and torch.compile."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

import overlock.models  # noqa: F401  (registers the timm models)
import overlock.models.overlock as overlock_module
from overlock.models.overlock import OverLoCK, OverLoCKBackbone, create_overlock, overlock_arch

STATE_DICTS = Path(__file__).parent / "fixtures" / "official_state_dicts.json"
SIZES = ("xt", "t", "s", "b")
TINY = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 32, 64, 96], kernel_size=[7, 7, 5, 5],
            mlp_ratio=[2, 2, 2, 2], sub_mlp_ratio=[2, 2], sub_num_heads=[2, 3], projection=32, num_classes=5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def published():
    text = resources.files("overlock").joinpath("reference/published_results.json").read_text()
    return json.loads(text)


@pytest.fixture(scope="module")
def official_state_dicts():
    return json.loads(STATE_DICTS.read_text())


def _meta_model(cls, size, **kwargs):
    with torch.device("meta"):
        return cls(**overlock_arch(size), **kwargs)


@pytest.mark.parametrize("size", SIZES)
def test_state_dict_names_and_shapes_match_official(size, official_state_dicts):
    for cls, key in ((OverLoCK, f"overlock_{size}"), (OverLoCKBackbone, f"overlock_{size}_dense")):
        model = _meta_model(cls, size)
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        expected = official_state_dicts[key]
        assert list(ours) == list(expected), f"{key}: key names/order differ"
        assert ours == expected, f"{key}: shapes differ"


@pytest.mark.parametrize("size", SIZES)
def test_parameter_counts_match_official(size, published):
    counts = published["overlock_official_param_counts"][f"overlock_{size}"]
    model = _meta_model(OverLoCK, size)
    assert sum(p.numel() for p in model.parameters()) == counts["train_form"]
    model.reparameterize(remove_aux_head=True)
    assert sum(p.numel() for p in model.parameters()) == counts["reparam_no_aux"]


def _uncounted_aggregation(attn, value, kernel_size, dilation=1):
    """Stand-in for ``na2d_av`` made only of ops fvcore does not count (shape-preserving)."""
    return value * attn.sum(-1, keepdim=True)


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_fvcore_flops_at_224(size, published, monkeypatch):
    """fvcore FLOPs (multiply-adds) of the re-parameterized classifier without the ContMix aggregation.

    Like the official figures, the aggregation (``na2d_av``) is NOT counted: natten's op is invisible to
    fvcore, so it is replaced here by uncounted elementwise ops. (Counted with the gather backend it would add
    0.03/0.06/0.10/0.15 GFLOPs for XT/T/S/B.) The query-key affinity matmul and everything else are counted.
    """
    from fvcore.nn import FlopCountAnalysis

    with torch.device("meta"):
        model = OverLoCK(**overlock_arch(size))
    model = model.to_empty(device="cpu")  # skip the random init: FLOPs depend on shapes only
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.fill_(1.0 if name.endswith("running_var") else 0.0)
    model.eval().reparameterize(remove_aux_head=True)
    monkeypatch.setattr(overlock_module, "na2d_av", _uncounted_aggregation)
    analysis = FlopCountAnalysis(model, torch.zeros(1, 3, 224, 224))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    gflops = analysis.total() / 1e9
    official_fvcore = published["overlock_official_param_counts"][f"overlock_{size}"]["fvcore_gflops_reparam"]
    paper = published["overlock_imagenet1k"][f"overlock_{size}"]["gflops"]
    assert abs(gflops - official_fvcore) / official_fvcore < 0.01, (gflops, official_fvcore)
    assert abs(gflops - paper) / paper < 0.05, (gflops, paper)


def test_bad_size_lists_valid_sizes():
    with pytest.raises(ValueError, match="valid sizes: xt, t, s, b"):
        create_overlock("m")
    with pytest.raises(ValueError, match="xt, t, s, b"):
        overlock_arch("large")


def test_timm_create_model_with_overrides(published):
    import timm

    assert {f"overlock_{s}" for s in SIZES} <= set(timm.list_models("overlock_*"))
    model = timm.create_model("overlock_xt", drop_path_rate=0.1, **TINY)
    assert isinstance(model, OverLoCK)
    cfg = model.pretrained_cfg
    assert cfg["crop_pct"] == published["overlock_imagenet1k"]["overlock_xt"]["crop_pct"]
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406) and tuple(cfg["std"]) == (0.229, 0.224, 0.225)
    for size in SIZES:
        crop = timm.models.get_pretrained_cfg(f"overlock_{size}").crop_pct
        assert crop == published["overlock_imagenet1k"][f"overlock_{size}"]["crop_pct"]
    drop_paths = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert drop_paths and max(drop_paths) == pytest.approx(0.1)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    assert model(x).shape == (2, 5)
    model.train()
    out = model(x)
    assert set(out) == {"main", "aux"} and out["main"].shape == out["aux"].shape == (2, 5)
    model.reset_classifier(3)
    assert model.eval()(x).shape == (2, 3)
    assert model.forward_head(model.forward_features(x)[0], pre_logits=True).shape == (2, 32)


def test_create_overlock_dense_backbone():
    model = create_overlock("t", dense=True, **{k: v for k, v in TINY.items() if k != "num_classes"},
                            out_indices=(1, 3))
    outs = model.eval()(torch.randn(1, 3, 64, 96))
    assert [o.shape[1] for o in outs] == list(model.out_channels) == [32, 120]
    assert [o.shape[-2:] for o in outs] == [(8, 12), (2, 3)]


@pytest.mark.parametrize("size", SIZES)
def test_pyramid_channels(size, published):
    model = _meta_model(OverLoCKBackbone, size)
    expected = published["overlock_coco_mask_rcnn"][f"overlock_{size}"]["pyramid_channels"]
    assert list(model.pyramid_channels) == expected


def test_frozen_stages_and_grad_checkpointing():
    model = OverLoCKBackbone(**{k: v for k, v in TINY.items() if k != "num_classes"}, frozen_stages=2)
    model.train()
    assert not any(p.requires_grad for p in model.patch_embed2.parameters())
    assert all(p.requires_grad for p in model.blocks3.parameters())
    assert not model.patch_embed1[1].training and model.patch_embed3[1].training
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    sum(o.sum() for o in model(x)).backward()
    assert model.blocks3[0].proj[4].weight.grad is not None


def test_channels_last_and_compile_match_eager():
    torch.manual_seed(0)
    model = OverLoCK(**TINY).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        eager = model(x)
        cl_model = OverLoCK(**TINY).eval()
        cl_model.load_state_dict(model.state_dict())
        cl_model = cl_model.to(memory_format=torch.channels_last)
        channels_last = cl_model(x.to(memory_format=torch.channels_last))
        compiled = torch.compile(model, backend="aot_eager")(x)
    torch.testing.assert_close(channels_last, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
