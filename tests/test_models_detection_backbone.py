"""OverLoCK dense backbones for MMDetection (``overlock/detection/backbone.py``, registered by
``overlock/detection/registration.py``)."""
from __future__ import annotations

import importlib
import pickle

import pytest
import torch

from overlock.catalog import model_cfg
from overlock.models.checkpoint import save_official_checkpoint
from overlock.models.overlock import OverLoCK

TINY = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[8, 16, 32, 48], kernel_size=[5, 5, 5, 5],
            mlp_ratio=[2, 2, 2, 2], sub_mlp_ratio=[2, 2], sub_num_heads=[2, 2])


@pytest.fixture()
def backbone_module():
    """``overlock.detection.backbone`` with the real mmcv (a hard dependency: a broken install must fail here)."""
    return importlib.import_module("overlock.detection.backbone")


def test_sizes_registered(backbone_module):
    from mmdet.models.builder import BACKBONES

    importlib.import_module("overlock.detection.registration")
    for size in ("xt", "t", "s", "b"):
        assert BACKBONES.get(f"overlock_{size}").default_size == size
    assert BACKBONES.get("OverLoCKDetBackbone") is backbone_module.OverLoCKDetBackbone


def test_pretrained_from_classifier_checkpoint(backbone_module, tmp_path):
    torch.manual_seed(0)
    classifier = OverLoCK(**TINY, num_classes=3, projection=16)
    path = save_official_checkpoint(classifier, tmp_path / "cls.pth")
    cls = backbone_module.OverLoCKDetBackbone.variant_class(model_cfg("overlock", "xt"))
    assert cls is backbone_module.OverLoCKDet_xt and cls.default_size == "xt"
    backbone = cls(**TINY, init_cfg=dict(type="Pretrained", checkpoint=str(path)), out_indices=(1, 2, 3),
                   frozen_stages=1, with_cp=True, drop_path_rate=0.1)
    backbone.init_weights()
    report = backbone.last_load_report
    assert report.dropped_keys and all(k.startswith(("head.", "aux_head.")) for k in report.dropped_keys)
    assert torch.equal(backbone.patch_embed1[0].weight, classifier.patch_embed1[0].weight)
    assert not any(p.requires_grad for p in backbone.blocks1.parameters())
    assert all(m.use_checkpoint for m in backbone.sub_blocks3)
    backbone.train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    outs = backbone(x)
    assert [o.shape[1] for o in outs] == list(backbone.out_channels) == [16, 44, 60]
    sum(o.mean() for o in outs).backward()


def test_sync_bn_helper_only_converts_when_asked(backbone_module):
    model = backbone_module.OverLoCKDetBackbone(size="xt", **TINY)
    assert backbone_module.convert_to_sync_batchnorm(model) is model
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    backbone_module.convert_to_sync_batchnorm(model, force=True)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    model.eval()
    assert len(model(torch.randn(1, 3, 64, 64))) == 4  # SyncBatchNorm runs as BN in eval mode


def test_build_from_mmdet_config():
    importlib.import_module("overlock.detection.registration")
    from mmdet.models import build_backbone

    backbone = build_backbone(dict(type="overlock_xt", drop_path_rate=0.1, out_indices=(0, 1, 2, 3), **TINY))
    outs = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [8, 16, 44, 60]


def test_variant_classes_unpickle_before_registration(backbone_module, monkeypatch):
    """A pickled backbone loads in a process that has not registered anything yet (module ``__getattr__``)."""
    cls = backbone_module.OverLoCKDetBackbone.variant_class(model_cfg("overlock", "xt"))
    data = pickle.dumps(cls(**TINY))
    monkeypatch.delitem(vars(backbone_module), "OverLoCKDet_xt")  # as in a fresh process
    restored = pickle.loads(data)
    assert type(restored).__name__ == "OverLoCKDet_xt" and restored.default_size == "xt"
    assert [p.shape for p in restored.parameters()] == [p.shape for p in cls(**TINY).parameters()]
