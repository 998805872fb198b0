"""The model catalog (``overlock/catalog.py``): one entry per variant, and everything else reads it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import timm
import torch

import overlock.models  # noqa: F401  (timm registration of OverLoCK)
import overlock.models.baselines  # noqa: F401  (timm registration of the baselines)
from overlock.catalog import CATALOG, OVERLOCK_SIZES, model_cfg
from overlock.models.baselines import BASELINE_ARCHS
from overlock.models.overlock import OVERLOCK_ARCHS, OverLoCKBackbone
from overlock.registry import ARCH_NAMES, resolve_model

ROOT = Path(__file__).resolve().parents[1]
TINY = {"depth": [1, 1, 1, 1], "sub_depth": [1, 1], "embed_dim": [16, 32, 64, 96],
        "kernel_size": [7, 7, 7, 7]}


def _published() -> dict:
    return json.loads((resources.files("overlock") / "reference" / "published_results.json").read_text())


def test_importing_the_catalog_and_params_loads_neither_torch_nor_timm():
    code = ("import sys, overlock.params, overlock.registry, overlock.catalog; "
            "print(sorted(m for m in ('torch', 'timm', 'mmdet') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_every_timm_registration_has_a_catalog_entry_and_back():
    registered = set(timm.list_models("overlock_*")) | set(timm.list_models("dc_*"))
    assert registered == {c.timm_name for c in CATALOG.values()}
    assert set(ARCH_NAMES) == {"overlock", *BASELINE_ARCHS}
    assert OVERLOCK_ARCHS == {size: CATALOG[f"overlock_{size}"].model_kwargs() for size in OVERLOCK_SIZES}
    for arch, spec in BASELINE_ARCHS.items():
        assert spec == {"family": CATALOG[arch].family, **CATALOG[arch].model_kwargs()}
    assert resolve_model("overlock", "s") is model_cfg("overlock", "s") is CATALOG["overlock_s"]
    with pytest.raises(ValueError, match="valid: overlock, resnet50"):
        resolve_model("resnet18")


@pytest.mark.parametrize("name", list(CATALOG))
def test_timm_pretrained_cfg_is_the_entry_input_cfg(name):
    cfg = CATALOG[name]
    pretrained = timm.models.get_pretrained_cfg(cfg.timm_name)
    assert pretrained.input_size == cfg.input.input_size and pretrained.crop_pct == cfg.input.crop_pct
    assert pretrained.interpolation == cfg.input.interpolation
    assert tuple(pretrained.mean) == cfg.input.mean and tuple(pretrained.std) == cfg.input.std
    assert (pretrained.first_conv, pretrained.classifier) == (cfg.first_conv, cfg.classifier)


@pytest.mark.parametrize("name", ["overlock_xt", "resnet50", "mobilenetv2_100", "convnext_tiny"])
def test_pretrained_cfg_names_real_modules(name):  # one variant per family: they share the module names
    cfg = CATALOG[name]
    with torch.device("meta"):
        model = timm.create_model(cfg.timm_name, num_classes=3)
    assert model.pretrained_cfg["crop_pct"] == cfg.input.crop_pct
    names = dict(model.named_modules())
    assert cfg.first_conv in names and cfg.classifier in names


def test_overlock_entries_agree_with_the_published_tables():
    published = _published()
    for size in OVERLOCK_SIZES:
        cfg = model_cfg("overlock", size)
        imagenet = published["overlock_imagenet1k"][f"overlock_{size}"]
        assert cfg.input.crop_pct == imagenet["crop_pct"]
        assert cfg.input.input_size[1:] == (imagenet["input"],) * 2
        assert cfg.drop_path_rate == imagenet["drop_path"]
        coco = published["overlock_coco_mask_rcnn"][f"overlock_{size}"]
        assert list(cfg.pyramid_channels()) == coco["pyramid_channels"]


def test_pyramid_channels_come_from_the_built_backbone_with_the_overrides():
    cfg = model_cfg("overlock", "xt")
    assert cfg.pyramid_channels(TINY) == (16, 32, 88, 120)
    backbone = OverLoCKBackbone(**cfg.model_kwargs(**TINY)).eval()
    with torch.no_grad():
        levels = backbone(torch.randn(1, 3, 64, 64))
    assert tuple(level.shape[1] for level in levels) == cfg.pyramid_channels(TINY)
    assert model_cfg("kw1x_resnet50").pyramid_channels({"embed_dim": [8, 16, 32, 64]}) == (32, 64, 128, 256)


def test_model_kwargs_are_a_fresh_copy():
    cfg = model_cfg("overlock", "t")
    kwargs = cfg.model_kwargs(drop_path_rate=0.3)
    kwargs["depth"][0] = 99
    assert cfg.model_kwargs()["depth"][0] == 4 and kwargs["drop_path_rate"] == 0.3
    assert "drop_path_rate" not in cfg.model_kwargs()
