"""ResNet-50 (torchvision layout), plain or with ODConv / KernelWarehouse convolutions."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from timm.layers import DropPath

from .base import _DynamicConvModel, _reject_unknown

__all__ = ["DCResNet"]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        net: _DynamicConvModel,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        names: tuple[str | None, str, str],
        drop_path: float,
    ):
        super().__init__()
        self.conv1 = net._conv(inplanes, planes, 1, name=names[0])
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = net._conv(planes, planes, 3, stride, 1, name=names[1])
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = net._conv(planes, planes * 4, 1, name=names[2])
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(shortcut + self.drop_path(out))


class DCResNet(_DynamicConvModel):
    """Bottleneck ResNet (ResNet-50 by default), plain, ODConv or KW."""

    head_name = "fc"

    def __init__(
        self,
        conv_type: str = "plain",
        num_classes: int = 1000,
        depth: Sequence[int] = (3, 4, 6, 3),
        embed_dim: Sequence[int] = (64, 128, 256, 512),
        kernel_num: int = 1,
        reduction: float = 0.0625,
        cell_num_ratio: float = 1,
        sharing_range: Sequence[str] = ("layer", "conv"),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        **kwargs,
    ):
        super().__init__()
        _reject_unknown(kwargs, type(self).__name__)
        self._init_convs(conv_type, kernel_num, reduction, cell_num_ratio, sharing_range)
        self.inplanes = stem = 64
        self.conv1 = nn.Conv2d(in_chans, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.feature_info = []
        prev_blocks = 0
        for s, (blocks, planes) in enumerate(zip(depth, embed_dim)):
            layer = self._make_layer(s, planes, blocks, 1 if s == 0 else 2, prev_blocks, drop_path_rate)
            setattr(self, f"layer{s + 1}", layer)
            self.feature_info.append(dict(num_chs=planes * 4, reduction=4 * 2**s, module=f"layer{s + 1}"))
            prev_blocks = blocks
        self.num_features = self.inplanes
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._finish_warehouses()

    def _make_layer(self, s: int, planes: int, blocks: int, stride: int, prev_blocks: int, drop_path: float):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            # KW: a strided shortcut draws from the previous stage's warehouse; ODConv keeps it static
            ds_name = f"stage{s - 1}_layer{prev_blocks + 1}_conv0" if stride != 1 else None
            downsample = nn.Sequential(
                self._conv(self.inplanes, planes * 4, 1, stride, name=ds_name, odconv=False),
                nn.BatchNorm2d(planes * 4),
            )
        first_conv1 = f"stage{s - 1}_layer{prev_blocks}_conv0" if s > 0 else None
        layers = [
            Bottleneck(
                self,
                self.inplanes,
                planes,
                stride,
                downsample,
                (first_conv1, f"stage{s}_layer0_conv1", f"stage{s}_layer0_conv2"),
                drop_path,
            )
        ]
        self.inplanes = planes * 4
        for j in range(1, blocks):
            names = tuple(f"stage{s}_layer{j}_conv{c}" for c in range(3))
            layers.append(Bottleneck(self, self.inplanes, planes, 1, None, names, drop_path))
        return nn.Sequential(*layers)

    def pyramid_stages(self) -> list[nn.Module]:
        return [
            nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool),
            self.layer1,
            self.layer2,
            self.layer3,
            self.layer4,
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.pyramid_stages():
            x = stage(x)
        return x
