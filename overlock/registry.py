"""The model names params accept and the timm registration, read from the catalog (``overlock.catalog``).

``model.arch`` picks a family entry; for OverLoCK ``model.size`` picks xt/t/s/b. Baseline families
(ODConv, KernelWarehouse, plain ResNet/MobileNetV2/ConvNeXt) have one variant per arch name and ignore
``model.size``. ``import_model_modules`` registers the classifiers with timm; the MMDetection backbones are
registered by ``overlock.detection.registration`` alone. This module imports neither torch nor timm, so
params validation stays cheap.
"""
from __future__ import annotations

import importlib

from overlock.catalog import ARCH_NAMES, CATALOG, OVERLOCK_SIZES, ModelCfg, model_cfg

__all__ = ["ARCH_NAMES", "OVERLOCK_SIZES", "ModelCfg", "resolve_model", "import_model_modules"]


def resolve_model(arch: str, size: str = "xt") -> ModelCfg:
    """The catalog entry of ``model.arch``/``model.size``; a clear error lists the valid names."""
    return model_cfg(arch, size)


def import_model_modules(cfg: ModelCfg | None = None) -> None:
    """Import the module(s) that register the classifiers with timm (one variant's, or all)."""
    modules = {cfg.module} if cfg else {c.module for c in CATALOG.values()}
    for module in sorted(modules):
        importlib.import_module(module)
