"""The shipped MMDetection configs: every one builds its detector, FPN in_channels come from the built
backbone (never typed), the recipe values are the official ones, and params reach the built config."""
from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

pytest.importorskip("mmdet")

from overlock.catalog import CATALOG  # noqa: E402
from overlock.detection.config import (  # noqa: E402
    CONFIG_DIR,
    backbone_out_channels,
    build_detection_config,
    config_file,
    load_config,
    shipped_configs,
)
from overlock.params import parse_params  # noqa: E402
from overlock.registry import resolve_model  # noqa: E402

torch.set_num_threads(1)
TINY = {"depth": [1, 1, 1, 1], "sub_depth": [1, 1], "embed_dim": [16, 32, 64, 96], "kernel_size": [7, 7, 7, 7]}


def _published():
    ref = resources.files("overlock") / "reference" / "published_results.json"
    return json.loads(ref.read_text())["overlock_coco_mask_rcnn"]


def test_every_recipe_is_shipped():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in shipped_configs()}
    for size in ("xt", "t", "s", "b"):
        for sched in ("1x", "3x"):
            assert f"mask_rcnn/mask_rcnn_overlock_{size}_fpn_{sched}_coco.py" in names
        assert f"faster_rcnn/faster_rcnn_overlock_{size}_fpn_1x_coco.py" in names
    assert {"demo/mask_rcnn_overlock_demo.py", "demo/faster_rcnn_overlock_demo.py"} <= names


@pytest.mark.parametrize("path", [p for p in shipped_configs() if "baselines" not in p.parts],
                         ids=lambda p: p.stem)
def test_shipped_config_builds_its_detector(path, record_property):
    from mmdet.models import build_detector

    cfg = load_config(path)
    size = cfg.model.backbone.type.removeprefix("overlock_")
    spec = resolve_model("overlock", size)
    assert list(cfg.model.neck.in_channels) == list(spec.pyramid_channels())
    model = build_detector(cfg.model)
    assert tuple(model.backbone.out_channels) == tuple(cfg.model.neck.in_channels)
    assert model.with_mask == cfg.model.type.startswith("Mask")
    n_params = sum(p.numel() for p in model.parameters())
    record_property("params_m", round(n_params / 1e6, 2))
    if path.stem == "mask_rcnn_overlock_t_fpn_1x_coco":
        print(f"\nOverLoCK-T Mask R-CNN 1x: {n_params / 1e6:.2f} M parameters")
        assert 45e6 < n_params < 60e6  # 33.5 M backbone + ~14 M FPN/RPN/RoI heads (80 classes)


def test_official_recipe_values():
    published = _published()
    for size in ("t", "s", "b"):
        for sched, epochs in (("1x", 12), ("3x", 36)):
            cfg = load_config(config_file("mask_rcnn", sched, size))
            assert list(cfg.model.neck.in_channels) == published[f"overlock_{size}"]["pyramid_channels"]
            assert cfg.optimizer.type == "AdamW" and cfg.optimizer.lr == 2e-4 and cfg.optimizer.weight_decay == 0.05
            assert cfg.optimizer.paramwise_cfg.custom_keys["rpb"]["decay_mult"] == 0.0
            assert cfg.optimizer.paramwise_cfg.norm_decay_mult == 0.0 and cfg.optimizer.paramwise_cfg.bias_decay_mult == 0
            assert cfg.runner.max_epochs == epochs
            resize = next(s for s in cfg.data.train.pipeline if s["type"] == "Resize")
            assert (resize.get("multiscale_mode") == "range") == (sched == "3x")
    assert load_config(config_file("mask_rcnn", "1x", "t")).model.backbone.drop_path_rate == 0.2


def test_norm_bias_rpb_get_no_weight_decay():
    from mmcv.runner import build_optimizer
    from mmdet.models import build_detector

    cfg = load_config(config_file("mask_rcnn", "demo"))
    cfg.model.backbone.update(TINY)
    cfg.model.neck.in_channels = backbone_out_channels(cfg.model.backbone)
    assert cfg.model.neck.in_channels == [16, 32, 88, 120]
    model = build_detector(cfg.model)
    optimizer = build_optimizer(model, cfg.optimizer)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    rpb = [n for n in named if n.endswith(("rpb1", "rpb2"))]
    norms = [n for n in named if ".norm" in n or "extra_norm" in n]
    biases = [n for n in named if n.endswith(".bias")]
    assert rpb and norms and biases
    for n in rpb + norms + biases:
        assert decay[id(named[n])] == 0.0, n
    assert decay[id(named["backbone.patch_embed1.0.weight"])] == 0.05


def _detection_layout(data_dir):
    root = data_dir / "detection"
    for rel in ("splits/train.json", "splits/calibration.json", "annotations/instances_val2017.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}")
    return data_dir


def test_params_reach_the_config(tmp_path):
    _detection_layout(tmp_path / "data")
    params = parse_params({"model": {"size": "xt", "overrides": TINY},
                           "finetune": {"max_iters": 12, "img_scale": [96, 64], "lr": 1e-3, "samples_per_gpu": 3,
                                        "checkpoint_interval": 4, "drop_path_rate": 0.05}})
    cfg = build_detection_config(params, tmp_path / "data", tmp_path / "wd", ["a", "b"])
    assert cfg.model.backbone == {"type": "overlock_xt", "drop_path_rate": 0.05, "out_indices": (0, 1, 2, 3), **TINY}
    assert cfg.model.neck.in_channels == [16, 32, 88, 120]
    assert tuple(cfg.model.neck.in_channels) == resolve_model("overlock", "xt").pyramid_channels(TINY)
    assert cfg.model.roi_head.bbox_head.num_classes == 2 and cfg.model.roi_head.mask_head.num_classes == 2
    assert cfg.data.train.ann_file.endswith("detection/splits/train.json") and cfg.data.train.classes == ("a", "b")
    assert cfg.data.test.ann_file.endswith("annotations/instances_val2017.json")
    assert cfg.runner == {"type": "IterBasedRunner", "max_iters": 12} and cfg.lr_config.step == [9]
    assert cfg.checkpoint_config.interval == 4 and cfg.optimizer.lr == 1e-3 and cfg.data.samples_per_gpu == 3
    resize = next(s for s in cfg.data.train.pipeline if s["type"] == "Resize")
    assert resize["img_scale"] == (96, 64)
    assert cfg.data.test.pipeline[1]["img_scale"] == (96, 64)
    assert cfg.work_dir == str(tmp_path / "wd") and cfg.device == "cpu"


def test_bad_combinations_fail_with_the_fix(tmp_path):
    _detection_layout(tmp_path)
    with pytest.raises(ValueError, match="Faster R-CNN ships 1x and demo only"):
        config_file("faster_rcnn", "3x", "t")
    params = parse_params({"compute": {"precision": "bf16"}})
    with pytest.raises(ValueError, match="use fp32 or fp16"):
        build_detection_config(params, tmp_path, tmp_path / "wd", ["a"])
    params = parse_params({"compute": {"precision": "fp16"}})
    with pytest.raises(ValueError, match="needs a GPU"):
        build_detection_config(params, tmp_path, tmp_path / "wd", ["a"])


def test_no_shipped_config_types_the_fpn_in_channels():
    from mmcv import Config

    for path in shipped_configs():
        assert Config.fromfile(str(path)).model.neck.get("in_channels") is None, path


@pytest.mark.parametrize("name", list(CATALOG))
def test_mmdet_backbone_and_catalog_agree_on_pyramid_channels(name):
    cfg = CATALOG[name]
    assert backbone_out_channels({"type": cfg.mmdet_backbone}) == list(cfg.pyramid_channels())


def test_baseline_fpn_in_channels_follow_model_overrides(tmp_path):
    """A baseline with its own shipped config and narrower ``model.overrides``: the FPN takes the narrower
    channels (the old code kept the config's typed ResNet-50 channels and the detector failed to run)."""
    from mmdet.models import build_detector

    _detection_layout(tmp_path / "data")
    overrides = {"depth": [1, 1, 1, 1], "embed_dim": [8, 16, 32, 64]}
    params = parse_params({"model": {"arch": "kw1x_resnet50", "overrides": overrides},
                           "finetune": {"schedule": "1x"}})
    assert config_file("mask_rcnn", "1x", arch="kw1x_resnet50").parent.name == "baselines"
    cfg = build_detection_config(params, tmp_path / "data", tmp_path / "wd", ["a", "b"])
    backbone = cfg.model.backbone
    assert backbone["type"] == "dc_kw1x_resnet50" and backbone["embed_dim"] == [8, 16, 32, 64]
    assert cfg.model.neck.in_channels == [32, 64, 128, 256]
    assert tuple(cfg.model.neck.in_channels) == resolve_model("kw1x_resnet50").pyramid_channels(overrides)
    detector = build_detector(cfg.model).eval()
    with torch.no_grad():
        feats = detector.extract_feat(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [cfg.model.neck.out_channels] * cfg.model.neck.num_outs
