"""OverLoCK outputs against the official fixture (float64) and internal consistency for other configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from overlock.models.overlock import OverLoCK, OverLoCKBackbone, reparameterize

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "tiny_a_128x128.pt"
ATOL = 1e-6

# A second small configuration: other heads/kernel sizes/smk, odd and non-square maps, stage-4 maps below
# than the kernel, no aux head, res_scale off, LayerScale everywhere.
TINY_B = dict(depth=[1, 1, 2, 1], sub_depth=[1, 2], embed_dim=[8, 16, 48, 64], kernel_size=[5, 9, 7, 7],
              mlp_ratio=[2, 3, 2, 2], sub_mlp_ratio=[2, 1.5], sub_num_heads=[3, 2], smk_size=3,
              ls_init_value=[1e-2, 1e-2, 0.5, 0.5], res_scale=False, projection=32, num_classes=7,
              use_ds=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def official():
    data = torch.load(FIXTURE, weights_only=True)
    config = json.loads(bytes(data["config_json"].tolist()).decode())
    cls_state = {k[4:]: v for k, v in data.items() if k.startswith("cls.")}
    det_state = {k[4:]: v for k, v in data.items() if k.startswith("det.")}
    return data, config, cls_state, det_state


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights and BN statistics so that every branch contributes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.2)
    return model


def _close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    assert err < atol, f"max abs error {err:.3g} >= {atol}"


@pytest.fixture(scope="module")
def official_classifier(official):
    data, config, cls_state, _ = official
    model = OverLoCK(**config).double()
    model.load_state_dict(cls_state)
    return model.eval()


@pytest.fixture(scope="module")
def official_dense(official):
    data, config, _, det_state = official
    model = OverLoCKBackbone(**config).double()
    model.load_state_dict(det_state)
    return model.eval()


def test_dense_base_net_levels_match_official(official, official_dense):
    data = official[0]
    with torch.no_grad():
        levels = official_dense(data["x"])
    assert [tuple(t.shape) for t in levels] == [tuple(data[f"dense_{i}"].shape) for i in range(4)]
    _close(levels[0], data["dense_0"])
    _close(levels[1], data["dense_1"])


def test_train_mode_aux_logits_match_official(official, official_classifier):
    data = official[0]
    model = official_classifier
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        with torch.no_grad():
            out = model(data["x"])
    finally:
        model.load_state_dict(state)  # BN running stats moved in train mode
        model.eval()
    assert set(out) == {"main", "aux"}
    _close(out["aux"], data["train_aux"])
    assert out["main"].shape == data["train_main"].shape


@pytest.mark.parametrize("level", [2, 3])
def test_dense_focus_net_levels_match_official(official, official_dense, level):
    data = official[0]
    with torch.no_grad():
        levels = official_dense(data["x"])
    _close(levels[level], data[f"dense_{level}"])


@pytest.mark.parametrize("which", ["eval_logits", "reparam_logits", "train_main"])
def test_classifier_logits_match_official(official, official_classifier, which):
    data = official[0]
    model = official_classifier
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            if which == "train_main":
                out = model.train()(data["x"])["main"]
            elif which == "reparam_logits":
                out = reparameterize(model).eval()(data["x"])
            else:
                out = model(data["x"])
    finally:
        fresh = OverLoCK(**official[1]).double()
        model.__dict__.update(fresh.__dict__)  # undo the re-parameterization for other tests
        model.load_state_dict(state)
        model.eval()
    _close(out, data[which])


def test_reparameterize_keeps_official_outputs(official, official_classifier, official_dense):
    """Merged dilated branches give the same eval outputs (classifier and dense) to 1e-6 in float64."""
    data, config, cls_state, det_state = official
    x = data["x"]
    for build, state in ((OverLoCK, cls_state), (OverLoCKBackbone, det_state)):
        model = build(**config).double()
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            before = model(x)
            after = model.reparameterize()(x)
        if torch.is_tensor(before):
            before, after = (before,), (after,)
        for b, a in zip(before, after):
            _close(a, b)
        assert not any("dil_conv" in k or "origin_bn" in k for k in model.state_dict())


@pytest.mark.parametrize("size", [(96, 160), (75, 121)])
def test_second_config_reparam_equivalence(size):
    """Other heads/kernels, non-square and odd inputs, stage-4 maps smaller than the kernel (both models)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    for build in (OverLoCK, OverLoCKBackbone):
        model = _randomize(build(**TINY_B).double()).eval()
        with torch.no_grad():
            before = model(x)
            after = reparameterize(model)(x)
        if torch.is_tensor(before):
            assert before.shape == (2, 7)
            _close(after, before)
        else:
            strides = (4, 8, 16, 32)
            for level, (b, a) in enumerate(zip(before, after)):
                assert b.shape[1] == model.pyramid_channels[level]
                assert b.shape[2] == -(-size[0] // strides[level])  # ceil: stride-2 convs with padding 1
                _close(a, b)


def test_dense_and_classifier_share_the_trunk():
    """Same weights: the dense backbone's stage features equal the classifier's (maps >= kernel, odd size)."""
    config = dict(TINY_B, kernel_size=[5, 5, 5, 5])
    torch.manual_seed(1)
    x = torch.randn(2, 3, 176, 208, dtype=torch.float64)  # stage 4: 6 x 7 >= kernel 5
    cls = _randomize(OverLoCK(**config).double(), seed=3).eval()
    dense = OverLoCKBackbone(**config).double().eval()
    report = dense.load_state_dict(cls.state_dict(), strict=False)
    assert set(report.unexpected_keys) == {k for k in cls.state_dict() if k.startswith("head.")}
    with torch.no_grad():
        focus_cls, overview_cls = cls.forward_features(x)
        x0, x1 = dense.forward_pre_features(x)
        stage3, focus_dense, overview_dense = dense.forward_sub_features(*dense.forward_base_features(x1))
    _close(focus_dense, focus_cls, 1e-12)
    _close(overview_dense, overview_cls, 1e-12)
    assert stage3.shape[1] == dense.pyramid_channels[2]


def test_dense_stage3_runs_on_normalized_level1(official, official_dense):
    """Official detection code: stage 3 consumes extra_norm[1](stage-2 output), not the raw features."""
    data = official[0]
    model = official_dense
    with torch.no_grad():
        x0, x1 = model.forward_pre_features(data["x"])
        raw = model.extra_norm[2](model.forward_sub_features(*model.forward_base_features(x1))[0])
    assert (raw - data["dense_2"]).abs().max().item() > 1e-4  # the raw path is measurably different


def test_small_maps_are_resized_in_both_models():
    """Maps below the kernel are up-sampled for ContMix in the classifier and the dense backbone (official);
    ``resize_small_maps=False`` (zero-padded window) changes such maps only."""
    torch.manual_seed(2)
    cls = _randomize(OverLoCK(**TINY_B).double(), seed=4).eval()
    assert OverLoCKBackbone(**TINY_B).sub_blocks4[0].resize_small_maps
    blk = cls.sub_blocks4[0]
    assert blk.resize_small_maps and blk.kernel_size == 7
    for size, changes in (((3, 5), True), ((7, 9), False)):
        x = torch.randn(2, blk.fusion[3].out_channels, *size, dtype=torch.float64)
        ctx = torch.randn(2, blk.x_scale.weight.shape[0], *size, dtype=torch.float64)
        with torch.no_grad():
            resized = blk(x, ctx, ctx)[0]
            blk.resize_small_maps = False
            padded = blk(x, ctx, ctx)[0]
            blk.resize_small_maps = True
        assert ((resized - padded).abs().max().item() > 1e-6) == changes
