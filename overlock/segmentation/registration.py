"""Register the OverLoCK segmentation backbones in mmsegmentation's ``BACKBONES`` (``overlock_xt`` ...
``overlock_b``, the type names of the official configs). mmseg's registry is its own (a child of mmcv's),
so these names do not clash with the detection backbones registered in mmdet's."""
from __future__ import annotations

import overlock.compat  # noqa: F401  (mmcv/torch 2.x shims before anything imports mmcv)
from overlock.catalog import CATALOG, ModelCfg

__all__ = ["register_mmseg_backbones", "require_mmseg_backbone"]


def register_mmseg_backbones() -> dict[str, type]:
    """Register every OverLoCK size (idempotent); returns type name -> class."""
    from mmseg.models.builder import BACKBONES

    from overlock.segmentation.backbone import OverLoCKSegBackbone
    from overlock.segmentation.compat import apply_mmseg_shims

    apply_mmseg_shims()
    if BACKBONES.get("OverLoCKSegBackbone") is None:
        BACKBONES.register_module(name="OverLoCKSegBackbone", module=OverLoCKSegBackbone)
    registered = {}
    for cfg in CATALOG.values():
        if not cfg.is_overlock:
            continue
        cls = BACKBONES.get(cfg.mmdet_backbone)
        if cls is None:
            cls = OverLoCKSegBackbone.variant_class(cfg)
            BACKBONES.register_module(name=cfg.mmdet_backbone, module=cls)
        registered[cfg.mmdet_backbone] = cls
    return registered


def require_mmseg_backbone(cfg: ModelCfg) -> type:
    """The registered class of ``cfg``; a clear error for an architecture without a segmentation backbone."""
    if not cfg.is_overlock:
        raise ValueError(f"the segment stage supports model.arch=overlock only (got {cfg.arch!r}): set "
                         "data.segmentation_dataset=none to run the pipeline without segmentation")
    return register_mmseg_backbones()[cfg.mmdet_backbone]
