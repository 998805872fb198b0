"""The one place that registers our backbones (and the baselines' temperature hook) with MMDetection.

For every catalog entry (``overlock.catalog``) the adapter named by ``ModelCfg.mmdet_adapter`` makes the
variant's class (``variant_class(cfg)``), registered in mmdet's ``BACKBONES`` as ``ModelCfg.mmdet_backbone``.
Importing this module registers them (idempotently), which is what the shipped configs' ``custom_imports``
rely on; code calls :func:`register_mmdet_backbones` or :func:`require_mmdet_backbone`.
"""
from __future__ import annotations

import overlock.compat  # noqa: F401  (mmcv/torch 2.x shims before anything imports mmcv)
from overlock.catalog import CATALOG, ModelCfg, load_object

__all__ = ["register_mmdet_backbones", "require_mmdet_backbone"]


def register_mmdet_backbones() -> dict[str, type]:
    """Register every catalog variant's backbone and ``DynamicConvTemperatureHook``; returns type -> class."""
    from mmcv.runner import HOOKS
    from mmdet.models.builder import BACKBONES

    from overlock.detection.backbone import OverLoCKDetBackbone
    from overlock.detection.baseline_backbones import DynamicConvTemperatureHook

    if BACKBONES.get("OverLoCKDetBackbone") is None:
        BACKBONES.register_module(name="OverLoCKDetBackbone", module=OverLoCKDetBackbone)
    if HOOKS.get("DynamicConvTemperatureHook") is None:
        HOOKS.register_module(name="DynamicConvTemperatureHook", module=DynamicConvTemperatureHook)
    registered = {}
    for cfg in CATALOG.values():
        cls = BACKBONES.get(cfg.mmdet_backbone)
        if cls is None:
            cls = load_object(cfg.mmdet_adapter).variant_class(cfg)
            BACKBONES.register_module(name=cfg.mmdet_backbone, module=cls)
        registered[cfg.mmdet_backbone] = cls
    return registered


def require_mmdet_backbone(cfg: ModelCfg) -> type:
    """The registered backbone class of ``cfg``; a clear error when it cannot be registered."""
    from mmdet.models.builder import BACKBONES

    register_mmdet_backbones()
    cls = BACKBONES.get(cfg.mmdet_backbone)
    if cls is None:
        raise KeyError(f"backbone {cfg.mmdet_backbone!r} (model.arch={cfg.arch!r}) is not registered in "
                       f"MMDetection's BACKBONES; registered: {', '.join(sorted(BACKBONES.module_dict))}")
    return cls


register_mmdet_backbones()
