"""Loading and saving official-format OverLoCK checkpoints."""
from __future__ import annotations

import argparse
import logging

import pytest
import torch

from overlock.models.checkpoint import load_official_checkpoint, save_official_checkpoint
from overlock.models.overlock import OverLoCK, OverLoCKBackbone

TINY = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[8, 16, 32, 48], kernel_size=[5, 5, 5, 5],
            mlp_ratio=[2, 2, 2, 2], sub_mlp_ratio=[2, 2], sub_num_heads=[2, 2], projection=16, num_classes=4)
DENSE = {k: v for k, v in TINY.items() if k not in ("projection", "num_classes")}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return OverLoCK(**TINY).eval()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items() if k in sb)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "state_dict_ema"])
@pytest.mark.parametrize("prefix", ["", "module.", "module.backbone."])
def test_top_level_keys_and_prefixes(tmp_path, source, wrap, prefix):
    state = {prefix + k: v for k, v in source.state_dict().items()}
    payload = state if wrap is None else {wrap: state, "epoch": 3, "args": argparse.Namespace(lr=1e-3)}
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    target = OverLoCK(**TINY)
    key = "state_dict_ema" if wrap == "state_dict_ema" else None
    report = load_official_checkpoint(target, path, state_dict_key=key)
    assert report.clean and report.source_key == wrap
    assert len(report.loaded_keys) == len(source.state_dict())
    assert _same_weights(source, target)


def test_ema_entry_is_chosen_by_argument(source):
    other = OverLoCK(**TINY)
    payload = {"state_dict": other.state_dict(), "state_dict_ema": source.state_dict()}
    target = OverLoCK(**TINY)
    report = load_official_checkpoint(target, payload, state_dict_key="state_dict_ema")
    assert report.source_key == "state_dict_ema"
    assert _same_weights(source, target)
    assert load_official_checkpoint(target, payload).source_key == "state_dict"
    assert _same_weights(other, target)
    with pytest.raises(KeyError, match="model_ema"):
        load_official_checkpoint(target, payload, state_dict_key="model_ema")


def test_missing_and_unexpected_keys_are_reported(source, caplog):
    state = dict(source.state_dict())
    state.pop("blocks1.0.dwconv.weight")
    state["blocks1.0.extra.weight"] = torch.zeros(1)
    target = OverLoCK(**TINY)
    with pytest.raises(RuntimeError, match="blocks1.0.dwconv.weight"):
        load_official_checkpoint(target, state)
    with caplog.at_level(logging.WARNING, logger="overlock.models.checkpoint"):
        report = load_official_checkpoint(target, state, strict=False)
    assert report.missing_keys == ["blocks1.0.dwconv.weight"]
    assert report.unexpected_keys == ["blocks1.0.extra.weight"]
    assert "blocks1.0.dwconv.weight" in caplog.text and "blocks1.0.extra.weight" in caplog.text


def test_shape_mismatch_names_the_key(source):
    state = dict(source.state_dict())
    state["patch_embed2.0.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(ValueError, match=r"patch_embed2\.0\.weight: checkpoint \(3, 3, 3, 3\)"):
        load_official_checkpoint(OverLoCK(**TINY), state)


def test_new_number_of_classes_with_exclude(source):
    target = OverLoCK(**{**TINY, "num_classes": 9})
    with pytest.raises(ValueError, match="head.4.weight"):
        load_official_checkpoint(target, source.state_dict())
    report = load_official_checkpoint(target, source.state_dict(), exclude=("head.4.", "aux_head.2."),
                                      strict=False)
    assert set(report.missing_keys) == {"head.4.weight", "head.4.bias", "aux_head.2.weight",
                                        "aux_head.2.bias"}
    assert "head.4.weight" in report.dropped_keys


def test_dense_backbone_drops_classifier_keys(tmp_path, source, caplog):
    path = save_official_checkpoint(source, tmp_path / "cls.pth")
    dense = OverLoCKBackbone(**DENSE)
    with caplog.at_level(logging.INFO, logger="overlock.models.checkpoint"):
        report = load_official_checkpoint(dense, path, strict=False)
    assert report.dropped_keys and all(k.startswith(("head.", "aux_head.")) for k in report.dropped_keys)
    assert "head.*" in caplog.text and "aux_head.*" in caplog.text
    assert not report.unexpected_keys
    dense_only = {k for k in dense.state_dict() if k.startswith(("h_proj.", "extra_norm."))}
    assert set(report.missing_keys) == dense_only
    assert _same_weights(dense, source)


def test_detector_checkpoint_keeps_only_backbone(source):
    dense = OverLoCKBackbone(**DENSE)
    state = {f"backbone.{k}": v for k, v in dense.state_dict().items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(1)
    target = OverLoCKBackbone(**DENSE)
    report = load_official_checkpoint(target, {"state_dict": state, "meta": {}})
    assert report.clean and report.dropped_keys == ["neck.lateral_convs.0.conv.weight"]
    assert _same_weights(dense, target)


def test_saved_checkpoint_round_trip_and_deploy_form(tmp_path, source):
    x = torch.randn(1, 3, 64, 64)
    path = save_official_checkpoint(source, tmp_path / "out" / "official.pth")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict"} and list(raw["state_dict"]) == list(source.state_dict())
    bare = save_official_checkpoint(source, tmp_path / "bare.pth", wrap_key=None)
    assert "patch_embed1.0.weight" in torch.load(bare, weights_only=True)

    deployed = OverLoCK(**TINY).eval()
    deployed.load_state_dict(source.state_dict())
    deployed.reparameterize()
    deploy_path = save_official_checkpoint(deployed, tmp_path / "deploy.pth")
    official_deploy = OverLoCK(**TINY, deploy=True).eval()  # the official deploy=True layout
    assert load_official_checkpoint(official_deploy, deploy_path).clean
    train_form = OverLoCK(**TINY).eval()  # a train-form model is re-parameterized to match
    report = load_official_checkpoint(train_form, deploy_path)
    assert report.reparameterized_model and report.clean
    with torch.no_grad():
        torch.testing.assert_close(train_form(x), source(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(official_deploy(x), source(x), rtol=1e-4, atol=1e-5)
