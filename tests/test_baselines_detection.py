"""ODConv / KernelWarehouse baselines in MMDetection: published detector sizes, dense outputs, the hook."""

from __future__ import annotations

import json
import logging
import pickle
from importlib import resources

import numpy as np
import pytest
import timm
import torch

pytest.importorskip("mmcv.ops", reason="mmcv-full (with ops) is not installed")
pytest.importorskip("mmdet")

from mmcv.runner import EpochBasedRunner, Hook  # noqa: E402
from mmdet.core import BitmapMasks, build_optimizer  # noqa: E402
from mmdet.models import build_backbone, build_detector  # noqa: E402

from overlock.detection.baseline_backbones import DynamicConvTemperatureHook  # noqa: E402
from overlock.detection.config import load_config  # noqa: E402
from overlock.detection.registration import register_mmdet_backbones  # noqa: E402
from overlock.models.baselines import BASELINE_ARCHS, set_temperature  # noqa: E402
from overlock.models.kernelwarehouse import KWConv2d  # noqa: E402
from overlock.models.odconv import ODConv2d  # noqa: E402
from overlock.registry import import_model_modules, resolve_model  # noqa: E402

register_mmdet_backbones()

torch.set_num_threads(1)

CONFIGS = resources.files("overlock.detection") / "configs" / "baselines"
PUBLISHED = json.loads((resources.files("overlock") / "reference" / "published_results.json").read_text())
ODCONV_ROWS = [
    (det, arch)
    for det in ("faster_rcnn", "mask_rcnn")
    for arch in ("resnet50", "odconv4x_resnet50", "mobilenetv2_100", "odconv4x_mobilenetv2_100")
]
KW_CONFIGS = {  # arch -> config of the KernelWarehouse table
    "resnet50": "mask_rcnn_resnet50_fpn_adamw_1x_coco.py",
    "kw1x_resnet50": "mask_rcnn_kw1x_resnet50_fpn_1x_coco.py",
    "kw4x_resnet50": "mask_rcnn_kw4x_resnet50_fpn_1x_coco.py",
    "mobilenetv2_100": "mask_rcnn_mobilenetv2_100_fpn_adamw_1x_coco.py",
    "kw1x_mobilenetv2_100": "mask_rcnn_kw1x_mobilenetv2_100_fpn_1x_coco.py",
    "kw4x_mobilenetv2_100": "mask_rcnn_kw4x_mobilenetv2_100_fpn_1x_coco.py",
    "convnext_tiny": "mask_rcnn_convnext_tiny_fpn_1x_coco.py",
    "kw1x_convnext_tiny": "mask_rcnn_kw1x_convnext_tiny_fpn_1x_coco.py",
}
# ImageNet classifier sizes from the KernelWarehouse README (M): the backbone is the classifier minus its head
KW_CLASSIFIER_PARAMS_M = {
    "resnet50": 25.56,
    "kw1x_resnet50": 28.05,
    "kw4x_resnet50": 102.02,
    "mobilenetv2_100": 3.50,
    "kw1x_mobilenetv2_100": 5.17,
    "kw4x_mobilenetv2_100": 11.38,
    "convnext_tiny": 28.59,
    "kw1x_convnext_tiny": 39.37,
}


def tiny(arch: str) -> dict:
    return {"depth": [1] * 7} if "mobilenetv2" in arch else {"depth": [1, 1, 1, 1]}


def count_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("det,arch", ODCONV_ROWS)
def test_odconv_table_detectors_match_published_parameter_counts(det, arch):
    cfg = load_config(CONFIGS / f"{det}_{arch}_fpn_1x_coco.py")
    assert cfg.model.roi_head.bbox_head.num_classes == 80
    # the published counts include the unused ImageNet classifier the official detection backbones keep
    cfg.model.backbone.imagenet_head = True
    with torch.device("meta"):
        detector = build_detector(cfg.model)
    published = PUBLISHED["odconv_coco"][f"{arch}_{det}"]["params_m"]
    assert abs(count_m(detector) - published) / published < 0.01, (det, arch, count_m(detector), published)


@pytest.mark.parametrize("arch", list(KW_CONFIGS))
def test_kw_table_detectors_build_with_the_published_backbones(arch):
    cfg = load_config(CONFIGS / KW_CONFIGS[arch])
    assert cfg.optimizer.type == "AdamW" and cfg.model.type == "MaskRCNN"
    with torch.device("meta"):
        detector = build_detector(cfg.model)
        classifier = timm.create_model(f"dc_{arch}")
    head = count_m(classifier.get_classifier())
    assert abs(count_m(classifier) - KW_CLASSIFIER_PARAMS_M[arch]) / KW_CLASSIFIER_PARAMS_M[arch] < 0.005
    # backbone = classifier without its head (+ the per-level output norms of ConvNeXt - its final norm)
    extra = (
        sum(count_m(getattr(detector.backbone, f"norm{i}")) for i in range(4)) if "convnext" in arch else 0.0
    )
    dropped = count_m(classifier.norm) if "convnext" in arch else 0.0
    assert count_m(detector.backbone) == pytest.approx(count_m(classifier) - head + extra - dropped, abs=1e-6)


@pytest.mark.parametrize("arch", list(BASELINE_ARCHS))
def test_registry_backbone_gives_dense_levels_and_loads_classifier_weights(arch, tmp_path):
    spec = resolve_model(arch)
    import_model_modules(spec)  # timm; the mmdet backbones are registered above
    torch.manual_seed(0)
    classifier = timm.create_model(
        spec.timm_name, num_classes=4, drop_path_rate=spec.drop_path_rate, **tiny(arch)
    )
    torch.save(
        {"state_dict": classifier.state_dict(), "arch": arch, "num_classes": 4}, tmp_path / "final.pth"
    )
    backbone = build_backbone(
        dict(
            type=spec.mmdet_backbone,
            drop_path_rate=spec.detection_drop_path_rate,
            pretrained=str(tmp_path / "final.pth"),
            **tiny(arch),
        )
    )
    backbone.init_weights()
    backbone.eval()
    classifier.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(x)
        reference = classifier.forward_pyramid(x)
    assert [f.shape[1] for f in feats] == list(backbone.out_channels)
    assert tuple(backbone.out_channels) == spec.pyramid_channels(tiny(arch))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    if "convnext" not in arch:  # ConvNeXt adds an output norm per level
        for f, r in zip(feats, reference):
            torch.testing.assert_close(f, r)


def _mm_batch(n: int = 2, size: int = 64, classes: int = 3):
    rng = np.random.default_rng(0)
    metas, boxes, labels, masks = [], [], [], []
    for _ in range(n):
        metas.append(
            dict(
                img_shape=(size, size, 3),
                ori_shape=(size, size, 3),
                pad_shape=(size, size, 3),
                scale_factor=np.ones(4, dtype=np.float32),
                flip=False,
                flip_direction=None,
            )
        )
        x0, y0 = rng.integers(0, size // 2, 2)
        box = torch.tensor([[x0, y0, x0 + size // 3, y0 + size // 3]], dtype=torch.float32)
        boxes.append(box)
        labels.append(torch.tensor([int(rng.integers(0, classes))]))
        m = np.zeros((1, size, size), dtype=np.uint8)
        m[0, y0 : y0 + size // 3, x0 : x0 + size // 3] = 1
        masks.append(BitmapMasks(m, size, size))
    return torch.randn(n, 3, size, size), metas, boxes, labels, masks


@pytest.mark.parametrize("arch", ["odconv4x_resnet50", "kw4x_mobilenetv2_100", "kw1x_convnext_tiny"])
def test_mask_rcnn_trains_a_step_through_dynamic_backbone(arch):
    cfg = load_config(CONFIGS / (KW_CONFIGS.get(arch) or f"mask_rcnn_{arch}_fpn_1x_coco.py"))
    cfg.model.backbone.update(tiny(arch))
    cfg.model.roi_head.bbox_head.num_classes = cfg.model.roi_head.mask_head.num_classes = 3
    detector = build_detector(cfg.model)
    detector.init_weights()
    detector.train()
    frozen = [p for p in detector.backbone.pyramid_stages()[0].parameters()]
    img, metas, boxes, labels, masks = _mm_batch()
    losses = detector.forward_train(img, metas, boxes, labels, gt_masks=masks)
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(v) for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    optimizer = build_optimizer(detector, cfg.optimizer)  # e.g. ConvNeXt's layer-wise lr decay
    total.backward()
    optimizer.step()
    dynamic = [m for m in detector.backbone.modules() if isinstance(m, (ODConv2d, KWConv2d))]
    weights = [m.weight for m in dynamic if isinstance(m, ODConv2d)] or list(
        detector.backbone.warehouse_manager.weights
    )
    assert any(w.grad is not None and w.grad.abs().sum() > 0 for w in weights)
    if cfg.model.backbone.get("frozen_stages", -1) >= 0:
        assert all(not p.requires_grad for p in frozen)
        bns = [m for m in detector.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and not any(m.training for m in bns)  # norm_eval


class _RecordTemperature(Hook):
    def __init__(self, conv):
        self.conv, self.seen = conv, []

    def after_train_iter(self, runner):
        self.seen.append(self.conv.attention.temperature)


class _TrainStepModel(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def train_step(self, batch, optimizer):
        loss = sum(f.mean() for f in self.backbone(batch))
        return dict(loss=loss, log_vars={"loss": loss.item()}, num_samples=batch.shape[0])


def test_temperature_hook_anneals_per_iteration_in_a_real_runner(tmp_path):
    backbone = build_backbone(dict(type="dc_odconv4x_mobilenetv2_100", depth=[1] * 7))
    set_temperature(backbone, 7.0)  # whatever a previous run left
    model = _TrainStepModel(backbone)
    conv = next(m for m in backbone.modules() if isinstance(m, ODConv2d))
    recorder = _RecordTemperature(conv)
    runner = EpochBasedRunner(
        model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        work_dir=str(tmp_path),
        logger=logging.getLogger("test"),
        max_epochs=2,
    )
    runner.register_hook(DynamicConvTemperatureHook(anneal_epochs=1))
    runner.register_hook(recorder, priority="LOWEST")
    loader = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    runner.run([loader], [("train", 1)])
    assert recorder.seen == [30.0, 22.75, 15.5, 8.25, 1.0, 1.0, 1.0, 1.0]
    # default: fine-tuning keeps the final temperature from the start
    runner2 = EpochBasedRunner(
        model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        work_dir=str(tmp_path),
        logger=logging.getLogger("test"),
        max_epochs=1,
    )
    set_temperature(backbone, 7.0)
    runner2.register_hook(DynamicConvTemperatureHook())
    recorder2 = _RecordTemperature(conv)
    runner2.register_hook(recorder2, priority="LOWEST")
    runner2.run([loader], [("train", 1)])
    assert recorder2.seen == [1.0] * 4


def test_backbone_rejects_a_checkpoint_of_another_arch(tmp_path):
    kw = timm.create_model("dc_kw1x_resnet50", num_classes=3, depth=[1, 1, 1, 1])
    torch.save({"state_dict": kw.state_dict()}, tmp_path / "kw.pth")
    backbone = build_backbone(
        dict(type="dc_odconv4x_resnet50", depth=[1, 1, 1, 1], pretrained=str(tmp_path / "kw.pth"))
    )
    with pytest.raises(ValueError, match=r"shape mismatch .*layer1\.0\.conv1\.weight"):
        backbone.init_weights()
    with pytest.raises(ValueError, match="out_indices"):
        build_backbone(dict(type="dc_mobilenetv2_100", out_indices=(1, 4)))


def test_baseline_backbone_classes_unpickle_before_registration(monkeypatch):
    """A pickled baseline backbone loads in a process that has not registered it yet (module ``__getattr__``)."""
    import overlock.detection.baseline_backbones as module

    cls = module.DenseBaselineBackbone.variant_class(resolve_model("resnet50"))
    assert build_backbone(dict(type="dc_resnet50", **tiny("resnet"))).__class__ is cls
    data = pickle.dumps(cls(**tiny("resnet")))
    monkeypatch.delitem(vars(module), cls.__name__)  # as in a fresh process
    restored = pickle.loads(data)
    assert type(restored).__name__ == cls.__name__ == "DCResNetBackbone_resnet50"
    assert restored.arch == "resnet50"
