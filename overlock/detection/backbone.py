"""The MMDetection 2.x adapter of the OverLoCK dense backbone.

``OverLoCKDetBackbone`` (size-generic) and, through :meth:`OverLoCKDetBackbone.variant_class`, one subclass
per catalog entry, registered by ``overlock.detection.registration`` as types ``overlock_xt``, ``overlock_t``,
``overlock_s``, ``overlock_b`` (the catalog's ``ModelCfg.mmdet_backbone``). Importing this module registers
nothing; ``overlock.models`` never imports it, so it stays importable without mmdet/mmcv.
Config example::

    backbone=dict(type='overlock_t', drop_path_rate=0.2, out_indices=(0, 1, 2, 3), frozen_stages=-1,
                  with_cp=False, init_cfg=dict(type='Pretrained', checkpoint='overlock_t_in1k_224.pth'))

Parameter names are the official ones (``backbone.patch_embed1...`` in a detector checkpoint), so official
OverLoCK detection checkpoints load unchanged; a classification checkpoint initialises the backbone after its
classifier-only keys (``head``, ``aux_head``) are dropped and reported.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from overlock.catalog import ModelCfg
from overlock.models.checkpoint import CheckpointLoadReport, load_official_checkpoint
from overlock.models.overlock import OverLoCKBackbone, overlock_arch

__all__ = ["OverLoCKDetBackbone", "convert_to_sync_batchnorm"]

log = logging.getLogger(__name__)


def convert_to_sync_batchnorm(module: nn.Module, process_group=None, force: bool = False) -> nn.Module:
    """Replace every BatchNorm of ``module`` by ``SyncBatchNorm`` for multi-GPU training (in place; returned).

    Does nothing unless ``torch.distributed`` is initialised or ``force`` is set (a single process gains
    nothing and SyncBatchNorm cannot train outside a process group).
    """
    if not force and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)


class OverLoCKDetBackbone(OverLoCKBackbone):
    """``OverLoCKBackbone`` of size ``size`` with MMDetection's conventions.

    Args:
        size: ``xt``/``t``/``s``/``b``; other keyword arguments (``depth``, ``embed_dim``, ... ,
            ``drop_path_rate``) override the size's architecture.
        out_indices / frozen_stages: see ``OverLoCKBackbone``.
        with_cp: activation (gradient) checkpointing in every block.
        pretrained: classification or detection checkpoint path (deprecated mmdet style; same as
            ``init_cfg=dict(type='Pretrained', checkpoint=path)``).
        init_cfg: ``dict(type='Pretrained', checkpoint=path[, state_dict_key='state_dict_ema'])``.
        sync_bn: convert BatchNorms to SyncBatchNorm (when ``torch.distributed`` is initialised).
    """

    default_size = "t"

    def __init__(self, size: str | None = None, out_indices=(0, 1, 2, 3), frozen_stages: int = -1,
                 with_cp: bool = False, pretrained: str | None = None, init_cfg: dict | None = None,
                 sync_bn: bool = False, **overrides):
        size = size or self.default_size
        arch = {**overlock_arch(size), **overrides}
        super().__init__(out_indices=out_indices, frozen_stages=frozen_stages, **arch)
        self.size = size
        if pretrained is not None and init_cfg is not None:
            raise ValueError("pass either pretrained or init_cfg, not both")
        if pretrained is not None:
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        if init_cfg is not None and init_cfg.get("type") != "Pretrained":
            raise ValueError(f"init_cfg type must be 'Pretrained', got {init_cfg!r}")
        self.init_cfg = init_cfg
        self.last_load_report: CheckpointLoadReport | None = None
        if with_cp:
            self.set_grad_checkpointing(True)
        if sync_bn:
            convert_to_sync_batchnorm(self)

    @classmethod
    def variant_class(cls, cfg: ModelCfg) -> type[OverLoCKDetBackbone]:
        """The subclass of the catalog entry ``cfg`` (its size by default), importable by name (pickling)."""
        name = f"OverLoCKDet_{cfg.size}"
        variant = globals().get(name)
        if variant is None:
            variant = type(name, (cls,), {
                "default_size": cfg.size,
                "__doc__": f"OverLoCK-{cfg.size.upper()} dense backbone (mmdet ``{cfg.mmdet_backbone}``).",
                "__module__": __name__,
            })
            globals()[name] = variant
        return variant

    def init_weights(self) -> None:
        """Load ``init_cfg``'s checkpoint (classifier-only keys dropped and logged); else keep the init."""
        if not self.init_cfg:
            return
        checkpoint = self.init_cfg["checkpoint"]
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"init_cfg checkpoint must be a path, got {checkpoint!r}")
        report = load_official_checkpoint(self, checkpoint, strict=False,
                                          state_dict_key=self.init_cfg.get("state_dict_key"))
        self.last_load_report = report
        log.info("%s: loaded %d tensors from %s (%d classifier-only/foreign keys dropped, %d missing)",
                 type(self).__name__, len(report.loaded_keys), checkpoint, len(report.dropped_keys),
                 len(report.missing_keys))
        self._freeze_stages()


def __getattr__(name: str):
    """``OverLoCKDet_<size>`` made on first use, so pickled backbones load in a fresh process."""
    if name.startswith("OverLoCKDet_"):
        from overlock.catalog import model_cfg

        return OverLoCKDetBackbone.variant_class(model_cfg("overlock", name.removeprefix("OverLoCKDet_")))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
