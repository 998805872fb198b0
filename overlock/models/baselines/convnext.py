"""ConvNeXt-Tiny (Meta layout), plain or with KernelWarehouse convolutions."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from timm.layers import DropPath, LayerNorm2d, trunc_normal_

from .base import _DynamicConvModel, _reject_unknown

__all__ = ["DCConvNeXt"]


class ConvNeXtBlock(nn.Module):
    def __init__(
        self, net: _DynamicConvModel, dim: int, drop_path: float, ls_init_value: float, stage: int, index: int
    ):
        super().__init__()
        self.dynamic = net.conv_type == "kw"
        name = f"stage{stage}_layer{index}_"
        self.dwconv = net._conv(dim, dim, 7, padding=3, groups=dim, bias=True, name=name + "dwconv0")
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if self.dynamic:  # KW: point-wise convs stay channels-first
            self.pwconv1 = net._conv(dim, 4 * dim, 1, bias=True, name=name + "pwconv1")
            self.pwconv2 = net._conv(4 * dim, dim, 1, bias=True, name=name + "pwconv2")
        else:
            self.pwconv1 = nn.Linear(dim, 4 * dim)
            self.pwconv2 = nn.Linear(4 * dim, dim)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        if self.dynamic:
            x = self.pwconv2(self.act(self.pwconv1(x.permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)
        else:
            x = self.pwconv2(self.act(self.pwconv1(x)))
        if self.gamma is not None:
            x = x * self.gamma
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class DCConvNeXt(_DynamicConvModel):
    """ConvNeXt (Tiny by default), plain or KW; ``depth``/``embed_dim`` override stage depths and widths."""

    head_name = "head"

    def __init__(
        self,
        conv_type: str = "plain",
        num_classes: int = 1000,
        depth: Sequence[int] = (3, 3, 9, 3),
        embed_dim: Sequence[int] = (96, 192, 384, 768),
        kernel_num: int = 1,
        reduction: float = 0.0625,
        cell_num_ratio: float = 1,
        sharing_range: Sequence[str] = ("layer", "pwconv"),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ls_init_value: float = 1e-6,
        in_chans: int = 3,
        **kwargs,
    ):
        super().__init__()
        _reject_unknown(kwargs, type(self).__name__)
        if conv_type == "odconv":
            raise ValueError("ConvNeXt baselines are plain or KW (conv_type 'plain' or 'kw')")
        self._init_convs(
            conv_type, kernel_num, reduction, cell_num_ratio, sharing_range, kw_norm=nn.LayerNorm
        )
        dims = list(embed_dim)
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    self._conv(in_chans, dims[0], 4, 4, bias=True, name="stagestem_conv0"),
                    LayerNorm2d(dims[0], eps=1e-6),
                )
            ]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm2d(dims[i], eps=1e-6),
                    self._conv(dims[i], dims[i + 1], 2, 2, bias=True, name=f"stage{i}_layerds_conv0"),
                )
            )
        total = sum(depth)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages, cur = nn.ModuleList(), 0
        for i, n in enumerate(depth):
            self.stages.append(
                nn.Sequential(
                    *[ConvNeXtBlock(self, dims[i], rates[cur + j], ls_init_value, i, j) for j in range(n)]
                )
            )
            cur += n
        self.feature_info = [
            dict(num_chs=d, reduction=4 * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)
        ]
        self.num_features = dims[-1]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.head = nn.Linear(dims[-1], num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self._finish_warehouses()

    def pyramid_stages(self) -> list[nn.Module]:
        return [nn.Identity()] + [nn.Sequential(d, s) for d, s in zip(self.downsample_layers, self.stages)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for ds, stage in zip(self.downsample_layers, self.stages):
            x = stage(ds(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.norm(x.mean((2, 3))))
        return x if pre_logits else self.head(x)
