"""The MMDetection 2.x adapter of the dynamic-convolution baselines, and their temperature hook.

``DenseBaselineBackbone.variant_class(cfg)`` makes the backbone class of a baseline catalog entry;
``overlock.detection.registration`` registers it as ``dc_<arch>`` (the catalog's ``ModelCfg.mmdet_backbone``)
in mmdet's ``BACKBONES`` and ``DynamicConvTemperatureHook`` in mmcv's ``HOOKS``. Importing this module
registers nothing; ``overlock.models.baselines`` never imports it.

A backbone is the classifier of the same arch without its head (same parameter names, so a pretrain-stage
checkpoint loads directly) returning the 4 dense levels (strides 4-32), with the usual mmdet options:

* ``out_indices``: levels to return (subset of 0..3); ``out_channels`` gives their channels;
* ``frozen_stages``: -1 none, 0 the stem, k the stem and levels 1..k (parameters frozen, modules in eval);
* ``norm_eval``: keep every BatchNorm (including the KW attentions') in eval mode while training;
* ``pretrained``: a classifier checkpoint (ours or official) loaded by ``init_weights``;
* ``imagenet_head``: keep the (unused) 1000-way ImageNet classifier of the official detection backbones --
  only for reproducing the published whole-detector parameter counts, which include it.

ConvNeXt backbones add a channels-first LayerNorm on every returned level, as Meta's detection backbone does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from mmcv.runner import Hook
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from overlock.catalog import ModelCfg
from overlock.models.baselines import (
    DCConvNeXt,
    baseline_class,
    baseline_kwargs,
    checkpoint_filter_fn,
    set_temperature,
    temperature_schedule,
)

log = logging.getLogger(__name__)

__all__ = [
    "DenseBaselineBackbone",
    "DynamicConvTemperatureHook",
    "load_classifier_weights",
]

_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "norm.")


def load_classifier_weights(backbone: nn.Module, checkpoint: str | Path) -> list[str]:
    """Load a classifier checkpoint (pretrain-stage ``final.pth``/``best.pth`` or official) into ``backbone``.

    Head keys are dropped, shapes must agree; returns the keys left at their initial values. Raises if no
    key matches (wrong ``model.arch`` for the checkpoint).
    """
    ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and ckpt.get("state_dict_ema"):
        ckpt = ckpt["state_dict_ema"]
    state = checkpoint_filter_fn(ckpt, backbone)
    own = backbone.state_dict()
    keep_head = getattr(backbone, "num_classes", 0) > 0
    state = {k: v for k, v in state.items() if k in own and (keep_head or not k.startswith(_HEAD_PREFIXES))}
    bad = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape
    ]
    if bad:
        raise ValueError(f"{checkpoint}: shape mismatch with the backbone for: " + "; ".join(bad))
    if not state:
        raise ValueError(
            f"{checkpoint}: no weight matches backbone {type(backbone).__name__}; "
            "check that model.arch matches the checkpoint"
        )
    missing = backbone.load_state_dict(state, strict=False).missing_keys
    if missing:
        log.warning(
            "%s: %d backbone tensors not in the checkpoint: %s", checkpoint, len(missing), missing[:8]
        )
    return list(missing)


class DenseBaselineBackbone:
    """Mixin turning a baseline classifier class into an mmdet dense backbone (see the module docstring)."""

    arch: str = ""

    @classmethod
    def variant_class(cls, cfg: ModelCfg) -> type[nn.Module]:
        """The backbone class of the baseline catalog entry ``cfg``, importable by name (pickling)."""
        base = baseline_class(cfg.arch)  # the name keeps the family (mmdet's layer decay checks "ConvNeXt")
        name = f"{base.__name__}Backbone_{cfg.arch}"
        variant = globals().get(name)
        if variant is None:
            variant = type(name, (cls, base), {
                "arch": cfg.arch,
                "__doc__": f"MMDetection dense backbone of baseline {cfg.arch!r} (``{cfg.mmdet_backbone}``).",
                "__module__": __name__,
            })
            globals()[name] = variant
        return variant

    def __init__(
        self,
        out_indices=(0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = True,
        pretrained: str | None = None,
        init_cfg=None,
        imagenet_head: bool = False,
        **kwargs,
    ):
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ValueError(f"{self.arch}: out_indices must be a subset of (0, 1, 2, 3), got {out_indices}")
        if frozen_stages not in range(-1, 5):
            raise ValueError(f"{self.arch}: frozen_stages must be in -1..4, got {frozen_stages}")
        if init_cfg is not None and pretrained is None and init_cfg.get("type") == "Pretrained":
            pretrained = init_cfg.get("checkpoint")
        baseline_class(self.arch).__init__(
            self, num_classes=1000 if imagenet_head else 0, **{**baseline_kwargs(self.arch), **kwargs}
        )
        self.out_indices, self.frozen_stages, self.norm_eval = out_indices, frozen_stages, norm_eval
        self.pretrained = pretrained
        if isinstance(self, DCConvNeXt):
            if not imagenet_head:
                del self.norm  # the classifier's final norm: unused by the dense outputs
            for i in out_indices:
                self.add_module(f"norm{i}", LayerNorm2d(self.feature_info[i]["num_chs"], eps=1e-6))
        self._freeze_stages()

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.feature_info[i]["num_chs"] for i in self.out_indices)

    def init_weights(self) -> None:
        """Load ``pretrained`` (if set) and put the dynamic convolutions at their final temperature."""
        if self.pretrained:
            load_classifier_weights(self, self.pretrained)
        schedule = temperature_schedule(self)
        if schedule is not None:
            set_temperature(self, schedule.end)

    def _freeze_stages(self) -> None:
        for stage in self.pyramid_stages()[: self.frozen_stages + 1]:
            stage.eval()
            for p in stage.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.forward_pyramid(x)
        outs = []
        for i in self.out_indices:
            norm = getattr(self, f"norm{i}", None)
            outs.append(norm(feats[i]) if norm is not None else feats[i])
        return tuple(outs)


class DynamicConvTemperatureHook(Hook):
    """Temperature of ODConv/KW backbones during detection training.

    ``anneal_epochs=0`` (default, fine-tuning a pretrained backbone as the official detection code does):
    the final temperature (ODConv 1, KW 0) throughout. ``anneal_epochs>0`` (training from scratch): the
    published start value annealed linearly to the final one over that many epochs, updated every iteration.
    """

    def __init__(self, anneal_epochs: float = 0.0):
        if anneal_epochs < 0:
            raise ValueError(f"anneal_epochs must be >= 0, got {anneal_epochs}")
        self.anneal_epochs = float(anneal_epochs)

    @staticmethod
    def _model(runner) -> nn.Module:
        return getattr(runner.model, "module", runner.model)

    def _apply(self, runner, epoch: float) -> float | None:
        model = self._model(runner)
        schedule = temperature_schedule(model)
        if schedule is None:
            return None
        value = schedule.at(epoch, self.anneal_epochs)
        set_temperature(model, value)
        return value

    def before_run(self, runner) -> None:
        self._apply(runner, 0.0)

    def before_train_iter(self, runner) -> None:
        if self.anneal_epochs > 0:
            per_epoch = max(1, len(runner.data_loader)) if getattr(runner, "data_loader", None) else 1
            self._apply(runner, runner.iter / per_epoch)


def __getattr__(name: str):
    """``<Family>Backbone_<arch>`` made on first use, so pickled backbones load in a fresh process."""
    from overlock.catalog import CATALOG

    for cfg in CATALOG.values():
        if not cfg.is_overlock and name.endswith(f"Backbone_{cfg.arch}"):
            variant = DenseBaselineBackbone.variant_class(cfg)
            if variant.__name__ == name:
                return variant
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
