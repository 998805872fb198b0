"""The OverLoCK segmentation backbone (``overview_fusion=False``): float64 parity with the official
segmentation release, the official parameter names and shapes of every size, and whole UperNet checkpoints
with official names loading into backbone + heads (``overlock/segmentation``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from overlock.models.overlock import OverLoCKBackbone

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "parity" / "seg_tiny_a_96x128.pt"
SEG_STATE_DICTS = FIXTURES / "official_seg_state_dicts.json"  # official_state_dicts.json's ``*_seg`` entries
pytestmark = pytest.mark.usefixtures("one_thread")


def test_levels_match_the_official_segmentation_backbone():
    data = torch.load(PARITY, weights_only=True)
    config = json.loads(bytes(data["config_json"].tolist()).decode())
    state = {k[4:]: v for k, v in data.items() if k.startswith("seg.")}
    model = OverLoCKBackbone(**config, overview_fusion=False).double()
    model.load_state_dict(state, strict=True)  # every official name, nothing more
    with torch.no_grad():
        levels = model.eval()(data["x"])
    for i, level in enumerate(levels):
        expected = data[f"dense_{i}"]
        assert level.shape == expected.shape
        err = (level - expected).abs().max().item()
        assert err < 1e-6, f"level {i}: max abs error {err:.3g}"
    fused = OverLoCKBackbone(**config).double().eval()  # the detection variant differs on level 3 only
    fused.load_state_dict(state, strict=False)
    with torch.no_grad():
        assert not torch.allclose(fused(data["x"])[3], levels[3])


@pytest.mark.parametrize("size", ["xt", "t", "s", "b"])
def test_names_and_shapes_are_the_official_ones(size):
    from overlock.segmentation.backbone import OverLoCKSegBackbone

    expected = json.loads(SEG_STATE_DICTS.read_text())[f"overlock_{size}_seg"]
    with torch.device("meta"):
        model = OverLoCKSegBackbone(size=size)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


def _upernet_cfg(size: str = "t"):
    """The official UperNet config of ``size`` (150 ADE20K classes), BN instead of SyncBN for one process."""
    from mmcv import Config

    from overlock.segmentation.config import config_file

    cfg = Config.fromfile(str(config_file("160k", size)))
    for head in (cfg.model.decode_head, cfg.model.auxiliary_head):
        head.norm_cfg = dict(type="BN", requires_grad=True)
    return cfg


def test_official_configs_hold_the_official_recipe():
    from overlock.segmentation.config import backbone_out_channels

    for size, dpr, channels in (("t", 0.2, [64, 128, 384, 640]), ("s", 0.3, [64, 128, 448, 640]),
                                ("b", 0.5, [80, 160, 528, 720])):
        cfg = _upernet_cfg(size)
        assert cfg.model.backbone.type == f"overlock_{size}" and cfg.model.backbone.drop_path_rate == dpr
        assert cfg.model.decode_head.in_channels == channels == backbone_out_channels(cfg.model.backbone)
        assert cfg.model.auxiliary_head.in_channels == channels[2]
    assert (cfg.optimizer.type, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("AdamW", 6e-5, 0.01)
    assert cfg.optimizer.paramwise_cfg.custom_keys.norm.decay_mult == 0.0
    assert (cfg.lr_config.policy, cfg.lr_config.warmup_iters, cfg.lr_config.power) == ("poly", 1500, 1.0)
    assert cfg.runner.max_iters == 160000 and cfg.data.samples_per_gpu == 2
    assert cfg.data.train.pipeline[3]["crop_size"] == (512, 512)
    assert (cfg.model.decode_head.channels, cfg.model.auxiliary_head.loss_decode.loss_weight) == (512, 0.4)


def test_upernet_checkpoint_with_official_names_loads(tmp_path):
    """A UperNet-T checkpoint synthesised from the official name/shape list (``backbone.*``) plus mmseg
    0.30's UPerHead/FCNHead names for the official head settings loads into backbone + heads, every tensor
    in place; a checkpoint of another size is refused naming the keys."""
    from mmseg.models import build_segmentor

    from overlock.segmentation.registration import register_mmseg_backbones
    from overlock.segmentation.stage import load_segmenter_checkpoint

    register_mmseg_backbones()
    cfg = _upernet_cfg("t")
    model = build_segmentor(cfg.model)
    own = model.state_dict()
    official = json.loads(SEG_STATE_DICTS.read_text())["overlock_t_seg"]
    backbone_names = {k.removeprefix("backbone.") for k in own if k.startswith("backbone.")}
    assert backbone_names == set(official)
    assert {k.split(".")[0] for k in own} == {"backbone", "decode_head", "auxiliary_head"}
    gen = torch.Generator().manual_seed(0)
    state = {}
    for k, v in own.items():
        shape = official[k[9:]] if k.startswith("backbone.") else list(v.shape)
        state[k] = (torch.randn(shape, generator=gen) if v.is_floating_point()
                    else torch.zeros(shape, dtype=v.dtype))
    path = tmp_path / "upernet_overlock_tiny_ade20k.pth"
    torch.save({"meta": {"CLASSES": ("wall",) * 150, "iter": 160000}, "state_dict": state}, path)
    meta = load_segmenter_checkpoint(model, path)
    assert meta["iter"] == 160000
    loaded = model.state_dict()
    for k in ("backbone.sub_blocks4.1.rpb2", "decode_head.fpn_bottleneck.conv.weight",
              "auxiliary_head.conv_seg.weight", "backbone.extra_norm.3.weight"):
        assert torch.equal(loaded[k], state[k]), k

    small = _upernet_cfg("s")
    with torch.device("meta"):
        other = build_segmentor(small.model)
    with pytest.raises(ValueError, match="missing|shapes"):
        load_segmenter_checkpoint(other, path)
