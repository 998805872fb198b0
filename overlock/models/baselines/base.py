"""Plumbing shared by the baseline classifiers: the plain/ODConv/KW convolution factory, timm head API and
the temperature hook."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..kernelwarehouse import KWConv2d, WarehouseManager
from ..odconv import ODConv2d
from .temperature import KW_SCHEDULE, ODCONV_SCHEDULE, TemperatureSchedule, anneal_temperature

CONV_TYPES = ("plain", "odconv", "kw")


def _reject_unknown(kwargs: dict, cls_name: str) -> None:
    kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    if kwargs:
        raise TypeError(
            f"{cls_name} got unsupported argument(s) {sorted(kwargs)}; baselines accept depth, "
            "embed_dim (ResNet/ConvNeXt), width_mult (MobileNetV2), kernel_num, reduction, "
            "drop_rate, drop_path_rate"
        )


class _DynamicConvModel(nn.Module):
    """Shared classifier plumbing: conv factory, timm head API and the temperature hook."""

    def _init_convs(
        self,
        conv_type: str,
        kernel_num: int,
        reduction: float,
        cell_num_ratio: float,
        sharing_range: Sequence[str],
        kw_norm: type[nn.Module] = nn.BatchNorm1d,
        schedules: tuple[TemperatureSchedule, TemperatureSchedule] = (ODCONV_SCHEDULE, KW_SCHEDULE),
    ):
        if conv_type not in CONV_TYPES:
            raise ValueError(f"unknown conv_type {conv_type!r}; valid: {', '.join(CONV_TYPES)}")
        self.conv_type, self.kernel_num, self.reduction = conv_type, kernel_num, reduction
        self.temperature_schedule = {"plain": None, "odconv": schedules[0], "kw": schedules[1]}[conv_type]
        self.warehouse_manager = None
        if conv_type == "kw":
            self.warehouse_manager = WarehouseManager(
                reduction=reduction,
                cell_num_ratio=cell_num_ratio,
                sharing_range=sharing_range,
                norm_layer=kw_norm,
            )

    def _conv(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = False,
        name: str | None = None,
        odconv: bool = True,
    ) -> nn.Module:
        """A convolution of the configured type; ``name`` is its KW warehouse name (None: plain conv)."""
        if self.conv_type == "odconv" and odconv:
            if bias:
                raise ValueError("ODConv2d has no bias")
            return ODConv2d(
                cin,
                cout,
                k,
                stride=stride,
                padding=padding,
                groups=groups,
                reduction=self.reduction,
                kernel_num=self.kernel_num,
            )
        if self.conv_type == "kw" and name is not None:
            return self.warehouse_manager.reserve(
                cin, cout, k, stride=stride, padding=padding, groups=groups, bias=bias, warehouse_name=name
            )
        return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=bias)

    def _finish_warehouses(self) -> None:
        if self.warehouse_manager is not None:
            self.warehouse_manager.store()
            self.warehouse_manager.allocate(self)

    def update_temperature(self, epoch: float, total_epochs: float | None = None) -> float | None:
        """Training-loop hook: set the published temperature for ``epoch`` (None for plain models)."""
        return anneal_temperature(self, epoch, total_epochs)

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        setattr(
            self, self.head_name, nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        )

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean((2, 3)) if x.ndim == 4 else x)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four dense feature levels (strides 4, 8, 16, 32)."""
        outs = []
        for i, stage in enumerate(self.pyramid_stages()):
            x = stage(x)
            if i > 0:
                outs.append(x)
        return outs

    @property
    def pyramid_channels(self) -> tuple[int, ...]:
        return tuple(info["num_chs"] for info in self.feature_info)
