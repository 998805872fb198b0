"""The mmsegmentation 0.x adapter of the OverLoCK segmentation backbone.

The official segmentation release (``segmentation/models/overlock.py`` of LMMMEng/OverLoCK) differs from the
detection one in one place: the last pyramid level is the LayerNormed stage-4 output alone, without the
projected Overview-Net context (no ``h_proj``, no fifth ``extra_norm``). ``OverLoCKSegBackbone`` is the
detection adapter built with ``overview_fusion=False``; parameter names are the official ones
(``backbone.patch_embed1...`` in an UperNet checkpoint), so the released ``upernet_overlock_*_ade20k.pth``
load unchanged. One subclass per size (``OverLoCKSeg_t``...) is registered in mmseg's ``BACKBONES`` as
``overlock_t``... by ``overlock.segmentation.registration``. Importing this module registers nothing.
"""
from __future__ import annotations

from overlock.catalog import ModelCfg
from overlock.detection.backbone import OverLoCKDetBackbone

__all__ = ["OverLoCKSegBackbone"]


class OverLoCKSegBackbone(OverLoCKDetBackbone):
    """``OverLoCKDetBackbone`` without the Overview-Net fusion of the last level (the official segmentation
    variant). Same arguments (``size``, ``out_indices``, ``frozen_stages``, ``with_cp``, ``init_cfg``, ...)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("overview_fusion", False)
        super().__init__(*args, **kwargs)

    @classmethod
    def variant_class(cls, cfg: ModelCfg) -> type[OverLoCKSegBackbone]:
        """The subclass of the catalog entry ``cfg``, importable by name (pickling)."""
        name = f"OverLoCKSeg_{cfg.size}"
        variant = globals().get(name)
        if variant is None:
            variant = type(name, (cls,), {
                "default_size": cfg.size,
                "__doc__": f"OverLoCK-{cfg.size.upper()} segmentation backbone (mmseg ``{cfg.mmdet_backbone}``).",
                "__module__": __name__,
            })
            globals()[name] = variant
        return variant


def __getattr__(name: str):
    """``OverLoCKSeg_<size>`` made on first use, so pickled backbones load in a fresh process."""
    if name.startswith("OverLoCKSeg_"):
        from overlock.catalog import model_cfg

        return OverLoCKSegBackbone.variant_class(model_cfg("overlock", name.removeprefix("OverLoCKSeg_")))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
