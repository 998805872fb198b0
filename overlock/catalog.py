"""The model catalog: one entry per model variant, in the spirit of timm's pretrained cfgs.

An entry (:class:`ModelCfg`) holds every fact of one variant: its family and size, the timm name and the
constructor arguments, the default drop-path rates of the ImageNet and COCO recipes, the evaluation input
preprocessing, the dense model whose pyramid feeds the FPN, and the MMDetection backbone type with its
adapter class. Everything else reads them from here: the timm registrations (``overlock.models``), the
names params accept (``overlock.registry``), the FPN in_channels of the detection configs
(:meth:`ModelCfg.pyramid_channels`, computed from the built dense model) and the MMDetection registration
(``overlock.detection.registration``).

Plain data: importing this module imports neither torch nor timm (params validation stays cheap); only
:meth:`ModelCfg.pyramid_channels` builds a model (on the meta device).
"""
from __future__ import annotations

import copy
import functools
import importlib
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "InputCfg", "ModelCfg", "CATALOG", "OVERLOCK_SIZES", "ARCH_NAMES",
           "model_cfg", "load_object"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm.data.IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)   # timm.data.IMAGENET_DEFAULT_STD


@dataclass(frozen=True)
class InputCfg:
    """Evaluation preprocessing of a variant (timm's input_size, crop_pct, interpolation, mean, std)."""
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True, eq=False)
class ModelCfg:
    """Everything the stages need to build, train, detect with and evaluate one model variant."""
    arch: str                        # model.arch
    size: str | None                 # model.size (OverLoCK sizes); None for the single-variant baselines
    family: str                      # overlock, resnet, mobilenetv2, convnext
    timm_name: str                   # timm.create_model name of the classifier
    module: str                      # module whose import registers the classifier with timm
    model_args: Mapping[str, Any]    # constructor arguments of the variant (the architecture)
    drop_path_rate: float            # ImageNet recipe default
    detection_drop_path_rate: float  # COCO recipe default
    input: InputCfg                  # evaluation preprocessing
    first_conv: str                  # timm pretrained-cfg fields
    classifier: str
    dense_model: str                 # "module:Class" of the dense model (its pyramid_channels feed the FPN)
    mmdet_backbone: str              # type name in MMDetection's BACKBONES
    mmdet_adapter: str               # "module:Class" whose ``variant_class(cfg)`` is registered as that type
    dense_args: Mapping[str, Any] = field(default_factory=dict)  # extra arguments of the dense model
    pretrained_tag: str = ""         # timm pretrained tag (``overlock_t.in1k``); "" for none
    url: str = ""                    # published weights of that tag

    @property
    def is_overlock(self) -> bool:
        return self.family == "overlock"

    def model_kwargs(self, **overrides) -> dict:
        """The constructor arguments (a fresh copy: lists may be edited) with ``overrides`` applied."""
        return {**copy.deepcopy(dict(self.model_args)), **overrides}

    def pyramid_channels(self, overrides: Mapping[str, Any] | None = None) -> tuple[int, ...]:
        """Channels of the 4 dense levels (the FPN's in_channels), read from the dense model built (on the
        meta device) with ``model.overrides`` applied; cached per overrides."""
        key = json.dumps(dict(overrides or {}), sort_keys=True, default=list)
        return _pyramid_channels(self.arch, self.size, key)

    def pretrained_cfg(self) -> dict:
        """timm's pretrained cfg of the variant (for ``generate_default_cfgs``)."""
        cfg = {"url": self.url, "num_classes": 1000, "input_size": self.input.input_size, "pool_size": (7, 7),
               "crop_pct": self.input.crop_pct, "interpolation": self.input.interpolation,
               "mean": self.input.mean, "std": self.input.std, "first_conv": self.first_conv,
               "classifier": self.classifier}
        if self.is_overlock:
            cfg.update(license="apache-2.0", paper_ids="arXiv:2502.20087",
                       origin_url="https://github.com/LMMMEng/OverLoCK")
        return cfg


def load_object(target: str):
    """The object named by ``"package.module:Name"``."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def _pyramid_channels(arch: str, size: str | None, overrides_json: str) -> tuple[int, ...]:
    import torch

    cfg = model_cfg(arch, size or "xt")
    overrides = json.loads(overrides_json)
    with torch.device("meta"):
        model = load_object(cfg.dense_model)(**cfg.model_kwargs(**dict(cfg.dense_args), **overrides))
    return tuple(int(c) for c in model.pyramid_channels)


# ------------------------------------------------------------------------------------------------ OverLoCK
OVERLOCK_SIZES = ("xt", "t", "s", "b")
_KERNELS = (17, 15, 13, 7)
_MLP = (4, 4, 4, 4)
_OVERLOCK_RELEASE = "https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_{}_in1k_224.pth"
_OVERLOCK = {
    # size: (architecture, ImageNet drop path, COCO drop path, crop_pct) -- the official registrations/recipes
    "xt": (dict(depth=(2, 2, 3, 2), sub_depth=(6, 2), embed_dim=(56, 112, 256, 336), sub_num_heads=(4, 6)),
           0.1, 0.1, 0.925),
    "t": (dict(depth=(4, 4, 6, 2), sub_depth=(12, 2), embed_dim=(64, 128, 256, 512), sub_num_heads=(4, 8)),
          0.15, 0.2, 0.95),
    "s": (dict(depth=(6, 6, 8, 3), sub_depth=(16, 3), embed_dim=(64, 128, 320, 512), sub_num_heads=(8, 16)),
          0.4, 0.3, 0.95),
    "b": (dict(depth=(8, 8, 10, 4), sub_depth=(20, 4), embed_dim=(80, 160, 384, 576), sub_num_heads=(6, 9)),
          0.5, 0.4, 0.975),
}


def _overlock(size: str, arch: dict, drop_path: float, detection_drop_path: float,
              crop_pct: float) -> ModelCfg:
    args = {"depth": arch["depth"], "sub_depth": arch["sub_depth"], "embed_dim": arch["embed_dim"],
            "kernel_size": _KERNELS, "mlp_ratio": _MLP, "sub_num_heads": arch["sub_num_heads"],
            "sub_mlp_ratio": (3, 3)}
    return ModelCfg(
        arch="overlock", size=size, family="overlock", timm_name=f"overlock_{size}", module="overlock.models",
        model_args=MappingProxyType({k: list(v) for k, v in args.items()}),
        drop_path_rate=drop_path, detection_drop_path_rate=detection_drop_path,
        input=InputCfg(crop_pct=crop_pct, interpolation="bicubic"),
        first_conv="patch_embed1.0", classifier="head.4",
        dense_model="overlock.models.overlock:OverLoCKBackbone",
        mmdet_backbone=f"overlock_{size}", mmdet_adapter="overlock.detection.backbone:OverLoCKDetBackbone",
        pretrained_tag="in1k", url=_OVERLOCK_RELEASE.format(size))


# ------------------------------------------------------------------------------------------------ baselines
_BASELINE_FAMILY = {  # family: (classifier/dense class, first conv, classifier, interpolation)
    "resnet": ("overlock.models.baselines.resnet:DCResNet", "conv1", "fc", "bilinear"),
    "mobilenetv2": ("overlock.models.baselines.mobilenetv2:DCMobileNetV2", "features.0.0", "classifier",
                    "bilinear"),
    "convnext": ("overlock.models.baselines.convnext:DCConvNeXt", "downsample_layers.0.0", "head", "bicubic"),
}
_BASELINES = {
    # arch: (family, constructor arguments, ImageNet drop path, COCO drop path) -- the official settings of
    # OSVAI/ODConv and OSVAI/KernelWarehouse; timm and mmdet names are f"dc_{arch}"
    "resnet50": ("resnet", dict(conv_type="plain"), 0.0, 0.0),
    "odconv1x_resnet50": ("resnet", dict(conv_type="odconv", kernel_num=1), 0.0, 0.0),
    "odconv4x_resnet50": ("resnet", dict(conv_type="odconv", kernel_num=4), 0.0, 0.0),
    "kw1x_resnet50": ("resnet", dict(conv_type="kw", cell_num_ratio=1), 0.1, 0.1),
    "kw4x_resnet50": ("resnet", dict(conv_type="kw", cell_num_ratio=4), 0.1, 0.1),
    "mobilenetv2_100": ("mobilenetv2", dict(conv_type="plain"), 0.0, 0.0),
    "odconv1x_mobilenetv2_100": ("mobilenetv2", dict(conv_type="odconv", kernel_num=1), 0.0, 0.0),
    "odconv4x_mobilenetv2_100": ("mobilenetv2", dict(conv_type="odconv", kernel_num=4), 0.0, 0.0),
    "kw1x_mobilenetv2_100": ("mobilenetv2", dict(conv_type="kw", cell_num_ratio=1,
                                                 sharing_range=("layer", "pwconv")), 0.0, 0.0),
    "kw4x_mobilenetv2_100": ("mobilenetv2", dict(conv_type="kw", cell_num_ratio=4, sharing_range=("layer",)),
                             0.0, 0.0),
    "convnext_tiny": ("convnext", dict(conv_type="plain"), 0.1, 0.4),
    "kw1x_convnext_tiny": ("convnext", dict(conv_type="kw", cell_num_ratio=1), 0.3, 0.4),
}


def _baseline(arch: str, family: str, args: dict, drop_path: float, detection_drop_path: float) -> ModelCfg:
    cls, first_conv, classifier, interpolation = _BASELINE_FAMILY[family]
    return ModelCfg(
        arch=arch, size=None, family=family, timm_name=f"dc_{arch}", module="overlock.models.baselines",
        model_args=MappingProxyType(dict(args)), drop_path_rate=drop_path,
        detection_drop_path_rate=detection_drop_path, input=InputCfg(interpolation=interpolation),
        first_conv=first_conv, classifier=classifier, dense_model=cls,
        dense_args=MappingProxyType({"num_classes": 0}), mmdet_backbone=f"dc_{arch}",
        mmdet_adapter="overlock.detection.baseline_backbones:DenseBaselineBackbone")


# ------------------------------------------------------------------------------------------------ the catalog
CATALOG: Mapping[str, ModelCfg] = MappingProxyType({
    **{f"overlock_{size}": _overlock(size, *entry) for size, entry in _OVERLOCK.items()},
    **{arch: _baseline(arch, *entry) for arch, entry in _BASELINES.items()},
})
"""Variant name (``overlock_<size>`` or the baseline's ``model.arch``) -> its entry."""

ARCH_NAMES = tuple(dict.fromkeys(cfg.arch for cfg in CATALOG.values()))


def model_cfg(arch: str, size: str = "xt") -> ModelCfg:
    """The entry of ``model.arch``/``model.size`` (the size matters for OverLoCK only); errors list the
    valid names."""
    if arch == "overlock":
        if size not in OVERLOCK_SIZES:
            raise ValueError(f"unknown OverLoCK size {size!r}; valid: {', '.join(OVERLOCK_SIZES)}")
        return CATALOG[f"overlock_{size}"]
    if arch in CATALOG:
        return CATALOG[arch]
    raise ValueError(f"unknown model.arch {arch!r}; valid: {', '.join(ARCH_NAMES)}")
