"""``model.arch`` -> baseline class and settings (from ``overlock.catalog``), timm registration
(``dc_<arch>``), official checkpoint mapping."""

from __future__ import annotations

from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from overlock.catalog import CATALOG, load_object, model_cfg

from .base import _DynamicConvModel

__all__ = ["BASELINE_ARCHS", "baseline_class", "baseline_kwargs", "checkpoint_filter_fn", "create_baseline"]

_BASELINES = {name: cfg for name, cfg in CATALOG.items() if not cfg.is_overlock}

# model.arch -> family and constructor arguments (official settings of each variant), from the catalog
BASELINE_ARCHS: dict[str, dict] = {
    arch: {"family": cfg.family, **cfg.model_kwargs()} for arch, cfg in _BASELINES.items()
}


def baseline_class(arch: str) -> type[_DynamicConvModel]:
    """The model class of a baseline ``model.arch``; a bad name lists the valid ones."""
    if arch not in _BASELINES:
        raise ValueError(f"unknown baseline arch {arch!r}; valid: {', '.join(_BASELINES)}")
    return load_object(model_cfg(arch).dense_model)


def baseline_kwargs(arch: str) -> dict:
    """Constructor arguments of a baseline ``model.arch`` (a fresh copy)."""
    baseline_class(arch)
    return model_cfg(arch).model_kwargs()


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
        model_cfg(arch).timm_name,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **{**baseline_kwargs(arch), **kwargs},
    )


default_cfgs = generate_default_cfgs({cfg.timm_name: cfg.pretrained_cfg() for cfg in _BASELINES.values()})


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
