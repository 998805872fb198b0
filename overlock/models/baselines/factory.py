"""``model.arch`` -> baseline class and settings, timm registration (``dc_<arch>``), official checkpoint mapping."""

from __future__ import annotations

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .base import _DynamicConvModel
from .convnext import DCConvNeXt
from .mobilenetv2 import DCMobileNetV2
from .resnet import DCResNet

__all__ = ["BASELINE_ARCHS", "baseline_class", "baseline_kwargs", "baseline_pyramid_channels", "checkpoint_filter_fn",
           "create_baseline"]

_FAMILIES = {"resnet": DCResNet, "mobilenetv2": DCMobileNetV2, "convnext": DCConvNeXt}

# model.arch -> family and constructor arguments (official settings of each variant)
BASELINE_ARCHS: dict[str, dict] = {
    "resnet50": dict(family="resnet", conv_type="plain"),
    "odconv1x_resnet50": dict(family="resnet", conv_type="odconv", kernel_num=1),
    "odconv4x_resnet50": dict(family="resnet", conv_type="odconv", kernel_num=4),
    "kw1x_resnet50": dict(family="resnet", conv_type="kw", cell_num_ratio=1),
    "kw4x_resnet50": dict(family="resnet", conv_type="kw", cell_num_ratio=4),
    "mobilenetv2_100": dict(family="mobilenetv2", conv_type="plain"),
    "odconv1x_mobilenetv2_100": dict(family="mobilenetv2", conv_type="odconv", kernel_num=1),
    "odconv4x_mobilenetv2_100": dict(family="mobilenetv2", conv_type="odconv", kernel_num=4),
    "kw1x_mobilenetv2_100": dict(
        family="mobilenetv2", conv_type="kw", cell_num_ratio=1, sharing_range=("layer", "pwconv")
    ),
    "kw4x_mobilenetv2_100": dict(
        family="mobilenetv2", conv_type="kw", cell_num_ratio=4, sharing_range=("layer",)
    ),
    "convnext_tiny": dict(family="convnext", conv_type="plain"),
    "kw1x_convnext_tiny": dict(family="convnext", conv_type="kw", cell_num_ratio=1),
}


def baseline_class(arch: str) -> type[_DynamicConvModel]:
    """The model class of a baseline ``model.arch``; a bad name lists the valid ones."""
    if arch not in BASELINE_ARCHS:
        raise ValueError(f"unknown baseline arch {arch!r}; valid: {', '.join(BASELINE_ARCHS)}")
    return _FAMILIES[BASELINE_ARCHS[arch]["family"]]


def baseline_kwargs(arch: str) -> dict:
    baseline_class(arch)
    return {k: v for k, v in BASELINE_ARCHS[arch].items() if k != "family"}


def baseline_pyramid_channels(arch: str, **overrides) -> tuple[int, ...]:
    """FPN in_channels of a baseline with ``model.overrides`` applied (e.g. ``embed_dim``, ``width_mult``)."""
    with torch.device("meta"):
        model = baseline_class(arch)(**{**baseline_kwargs(arch), **overrides}, num_classes=0)
    return model.pyramid_channels


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Map official checkpoints (``module.`` prefix, ``classifier.1`` head, 4-D layer scale) to ``model``."""
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        if k.startswith("classifier.1.") and "classifier.1." + k[13:] not in own:
            k = "classifier." + k[len("classifier.1.") :]
        if k in own and own[k].shape != v.shape and own[k].numel() == v.numel():
            v = v.reshape(own[k].shape)
        out[k] = v
    return out


def create_baseline(arch: str, pretrained: bool = False, **kwargs) -> _DynamicConvModel:
    """Build the classifier of a baseline ``model.arch`` with timm's builder (``pretrained`` needs a file)."""
    if kwargs.pop("features_only", False):
        raise ValueError("features_only is not supported; use forward_pyramid() or the MMDetection backbone")
    return build_model_with_cfg(
        baseline_class(arch),
        f"dc_{arch}",
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **{**baseline_kwargs(arch), **kwargs},
    )


def _cfg(first_conv: str, classifier: str, **kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        **kwargs,
    }


_CFG_BY_FAMILY = {
    "resnet": dict(first_conv="conv1", classifier="fc"),
    "mobilenetv2": dict(first_conv="features.0.0", classifier="classifier"),
    "convnext": dict(
        first_conv="downsample_layers.0.0", classifier="head", crop_pct=0.875, interpolation="bicubic"
    ),
}
default_cfgs = generate_default_cfgs(
    {f"dc_{arch}": _cfg(**_CFG_BY_FAMILY[spec["family"]]) for arch, spec in BASELINE_ARCHS.items()}
)


@register_model
def dc_resnet50(pretrained: bool = False, **kwargs):
    """ResNet-50 (25.56M params)."""
    return create_baseline("resnet50", pretrained, **kwargs)


@register_model
def dc_odconv1x_resnet50(pretrained: bool = False, **kwargs):
    """ODConv (1x) ResNet-50 (28.64M params)."""
    return create_baseline("odconv1x_resnet50", pretrained, **kwargs)


@register_model
def dc_odconv4x_resnet50(pretrained: bool = False, **kwargs):
    """ODConv (4x) ResNet-50 (90.67M params)."""
    return create_baseline("odconv4x_resnet50", pretrained, **kwargs)


@register_model
def dc_kw1x_resnet50(pretrained: bool = False, **kwargs):
    """KernelWarehouse (1x) ResNet-50 (28.05M params)."""
    return create_baseline("kw1x_resnet50", pretrained, **kwargs)


@register_model
def dc_kw4x_resnet50(pretrained: bool = False, **kwargs):
    """KernelWarehouse (4x) ResNet-50 (102.02M params)."""
    return create_baseline("kw4x_resnet50", pretrained, **kwargs)


@register_model
def dc_mobilenetv2_100(pretrained: bool = False, **kwargs):
    """MobileNetV2 1.0x (3.50M params)."""
    return create_baseline("mobilenetv2_100", pretrained, **kwargs)


@register_model
def dc_odconv1x_mobilenetv2_100(pretrained: bool = False, **kwargs):
    """ODConv (1x) MobileNetV2 1.0x (4.94M params)."""
    return create_baseline("odconv1x_mobilenetv2_100", pretrained, **kwargs)


@register_model
def dc_odconv4x_mobilenetv2_100(pretrained: bool = False, **kwargs):
    """ODConv (4x) MobileNetV2 1.0x (11.52M params)."""
    return create_baseline("odconv4x_mobilenetv2_100", pretrained, **kwargs)


@register_model
def dc_kw1x_mobilenetv2_100(pretrained: bool = False, **kwargs):
    """KernelWarehouse (1x) MobileNetV2 1.0x (5.17M params)."""
    return create_baseline("kw1x_mobilenetv2_100", pretrained, **kwargs)


@register_model
def dc_kw4x_mobilenetv2_100(pretrained: bool = False, **kwargs):
    """KernelWarehouse (4x) MobileNetV2 1.0x (11.38M params)."""
    return create_baseline("kw4x_mobilenetv2_100", pretrained, **kwargs)


@register_model
def dc_convnext_tiny(pretrained: bool = False, **kwargs):
    """ConvNeXt-Tiny (28.59M params)."""
    return create_baseline("convnext_tiny", pretrained, **kwargs)


@register_model
def dc_kw1x_convnext_tiny(pretrained: bool = False, **kwargs):
    """KernelWarehouse (1x) ConvNeXt-Tiny (39.37M params)."""
    return create_baseline("kw1x_convnext_tiny", pretrained, **kwargs)


def register_mmdet_backbones_if_loaded() -> None:
    """When MMDetection is already imported (the finetune stage imports it before the model modules), also
    register the dense backbones, so ``import_model_modules(spec)`` suffices for ``spec.mmdet_backbone``.
    The classifier-only stages never import mmdet."""
    import sys

    if "mmdet.models" in sys.modules:
        import importlib

        importlib.import_module("overlock.detection.baseline_backbones")
