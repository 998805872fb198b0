"""Optional classifier-head variants of OverLoCK (the FPN and CBAM variants of the derived seed project).

* :class:`PyramidFusion` (``head_type="fpn"``): FPN-style lateral 1x1 projections (conv + BN) of the 1/8 and
  1/16 pyramid levels, average-pooled to the 1/32 grid and added to the Focus-Net output *before* the head's
  pooling. The lateral BNs start at zero, so an untrained fusion leaves the plain model's function unchanged
  (and an official checkpoint loaded into the variant starts from the official model's outputs).
* :class:`CBAM` (``attention="cbam"``): Convolutional Block Attention Module (Woo et al., ECCV 2018):
  channel attention (shared MLP over average- and max-pooled features) then spatial attention (7x7 conv
  over the channel mean and max), applied to the fused map before the head.

Both live under their own module names (``pyramid_fusion.``, ``cbam.``), so the plain model's parameter
names (and official checkpoints) are untouched.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HEAD_TYPES", "ATTENTIONS", "PyramidFusion", "CBAM"]

HEAD_TYPES = ("plain", "fpn")
ATTENTIONS = ("none", "cbam")


class PyramidFusion(nn.Module):
    """Sum of the coarsest map and lateral projections of finer levels, pooled to the coarsest grid."""

    def __init__(self, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
            for c in in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero the lateral BN scales: the fusion starts as the identity on the coarsest map."""
        for lateral in self.lateral:
            nn.init.zeros_(lateral[1].weight)

    def forward(self, coarsest: torch.Tensor, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        out = coarsest
        for lateral, x in zip(self.lateral, levels):
            out = out + F.adaptive_avg_pool2d(lateral(x), coarsest.shape[2:])
        return out


class CBAM(nn.Module):
    """Channel then spatial attention (CBAM); ``reduction`` sets the channel MLP's hidden width."""

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.channel_mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                         nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.channel_mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.channel_mlp(F.adaptive_max_pool2d(x, 1))
        x = x * torch.sigmoid(avg + mx)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))
