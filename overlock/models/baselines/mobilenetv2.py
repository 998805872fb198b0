"""MobileNetV2 (1.0x, torchvision layout), plain or with ODConv / KernelWarehouse convolutions."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import _DynamicConvModel, _reject_unknown
from .temperature import KW_MOBILENET_SCHEDULE, ODCONV_MOBILENET_SCHEDULE

__all__ = ["DCMobileNetV2"]


MBV2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)  # expansion t, channels c, repeats n, stride s
KW_MBV2_STAGE = (1, 2, 3, 4, 5, 6, 6)  # KW warehouse stage of each group of blocks


def make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNReLU(nn.Sequential):
    def __init__(self, conv: nn.Module, cout: int):
        super().__init__(conv, nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, net: _DynamicConvModel, inp: int, oup: int, stride: int, expand: int, names: tuple):
        super().__init__()
        hidden = int(round(inp * expand))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU(net._conv(inp, hidden, 1, name=names[0]), hidden))
        layers += [
            ConvBNReLU(net._conv(hidden, hidden, 3, stride, 1, groups=hidden, name=names[1]), hidden),
            net._conv(hidden, oup, 1, name=names[2]),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class DCMobileNetV2(_DynamicConvModel):
    """MobileNetV2 (1.0x by default), plain, ODConv or KW; ``depth`` overrides the 7 repeat counts."""

    head_name = "classifier"

    def __init__(
        self,
        conv_type: str = "plain",
        num_classes: int = 1000,
        width_mult: float = 1.0,
        depth: Sequence[int] | None = None,
        kernel_num: int = 1,
        reduction: float = 0.0625,
        cell_num_ratio: float = 1,
        sharing_range: Sequence[str] = ("layer", "pwconv"),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        **kwargs,
    ):
        super().__init__()
        _reject_unknown(kwargs, type(self).__name__)
        self._init_convs(
            conv_type,
            kernel_num,
            reduction,
            cell_num_ratio,
            sharing_range,
            schedules=(ODCONV_MOBILENET_SCHEDULE, KW_MOBILENET_SCHEDULE),
        )
        depth = [n for *_, n, _ in MBV2_SETTING] if depth is None else list(depth)
        if len(depth) != len(MBV2_SETTING):
            raise ValueError(f"MobileNetV2 depth needs {len(MBV2_SETTING)} repeat counts, got {depth}")
        cin = make_divisible(32 * width_mult)
        self.num_features = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [
            ConvBNReLU(self._conv(in_chans, cin, 3, 2, 1, name="stage0_conv0", odconv=False), cin)
        ]
        level_ends, layer_idx = [], 0
        for g, ((t, c, _, s), n) in enumerate(zip(MBV2_SETTING, depth)):
            cout = make_divisible(c * width_mult)
            for i in range(n):
                handover = i == 0 and g > 0 and KW_MBV2_STAGE[g] != KW_MBV2_STAGE[g - 1]
                st = KW_MBV2_STAGE[g] - 1 if handover else KW_MBV2_STAGE[g]
                names = tuple(
                    f"stage{st}_layer{layer_idx}_{role}" for role in ("pwconv0", "dwconv0", "pwconv1")
                )
                features.append(InvertedResidual(self, cin, cout, s if i == 0 else 1, t, names))
                cin, layer_idx = cout, 0 if handover else layer_idx + 1
            if g in (1, 2, 4):  # last block at strides 4, 8, 16
                level_ends.append((len(features) - 1, cout))
        last = f"stage{KW_MBV2_STAGE[-1]}_layer{layer_idx}_pwconv1"
        features.append(ConvBNReLU(self._conv(cin, self.num_features, 1, name=last), self.num_features))
        level_ends.append((len(features) - 1, self.num_features))
        self.features = nn.Sequential(*features)
        self._level_ends = [i for i, _ in level_ends]
        self.feature_info = [
            dict(num_chs=ch, reduction=4 * 2**k, module=f"features.{i}")
            for k, (i, ch) in enumerate(level_ends)
        ]
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        self._finish_warehouses()

    def pyramid_stages(self) -> list[nn.Module]:
        """Stem (conv + the first block), then the blocks up to each level's end."""
        bounds = [0, 2] + [i + 1 for i in self._level_ends]
        return [self.features[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)
