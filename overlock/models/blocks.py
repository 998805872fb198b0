"""Building blocks of OverLoCK that are not ContMix itself.

Stem/downsampling layers, normalisation helpers (``LayerNorm2d``, ``GRN``), ``SEModule``, ``LayerScale``,
the UniRepLKNet-style ``DilatedReparamBlock`` with its re-parameterisation, and the Base-Net/Overview-Net
block ``RepConvBlock``. Module and parameter names follow the official release so that state dicts
load both ways without renaming.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath

from .fast_conv import depthwise_forward

# Dilated branches (kernel size, dilation) added next to each large depth-wise kernel, as in UniRepLKNet.
DILATED_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    19: ((5, 1), (7, 1), (9, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    17: ((5, 1), (7, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    15: ((5, 1), (7, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    13: ((5, 1), (7, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    11: ((5, 1), (7, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    9: ((5, 1), (7, 1), (5, 2), (3, 3), (3, 4)),
    7: ((5, 1), (3, 1), (3, 2), (3, 3)),
    5: ((3, 1), (3, 2)),
}


def conv_bn_stem(in_chans: int, embed_dim: int) -> nn.Sequential:
    """Four 3x3 conv+BN layers (two of stride 2) taking the image to 1/4 resolution."""
    half = embed_dim // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(half),
        nn.GELU(),
        nn.Conv2d(half, half, 3, padding=1, bias=False),
        nn.BatchNorm2d(half),
        nn.GELU(),
        nn.Conv2d(half, embed_dim, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(embed_dim),
        nn.GELU(),
        nn.Conv2d(embed_dim, embed_dim, 3, padding=1, bias=False),
        nn.BatchNorm2d(embed_dim),
    )


def conv_bn_downsample(in_dim: int, out_dim: int) -> nn.Sequential:
    """Stride-2 3x3 conv + BN between pyramid levels."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_dim),
    )


class ContextDownsample(nn.Module):
    """Halves the resolution of the Focus-Net features and of the context features together.

    Named ``patch_embedx`` in the model (``x_proj``/``h_proj`` as in the official release).
    """

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.x_proj = conv_bn_downsample(dim, out_dim)
        self.h_proj = conv_bn_downsample(out_dim // 4, out_dim // 4)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_proj(x), self.h_proj(ctx)


class SEModule(nn.Module):
    """Squeeze-and-excitation with a GELU bottleneck of ``max(16, dim // reduction)`` channels."""

    def __init__(self, dim: int, reduction: int = 8):
        super().__init__()
        hidden = max(16, dim // reduction)
        self.proj = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, hidden, 1),
            nn.GELU(),
            nn.Conv2d(hidden, dim, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.proj(x)


class LayerScale(nn.Module):
    """Per-channel affine ``x * weight + bias``.

    Stored as a depth-wise 1x1 kernel (``weight`` of shape [C, 1, 1, 1]) like the official release and
    applied as a grouped convolution, so fvcore counts it exactly as it counts the official model.
    """

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, groups=x.shape[1])


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor (eps 1e-6)."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt V2) for NCHW tensors."""

    def __init__(self, dim: int, use_bias: bool = True):
        super().__init__()
        self.use_bias = use_bias
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        if use_bias:
            self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial_norm = torch.linalg.vector_norm(x, ord=2, dim=(-2, -1), keepdim=True)
        relative = spatial_norm / (spatial_norm.mean(dim=1, keepdim=True) + 1e-6)
        out = (self.gamma * relative + 1) * x
        return out + self.beta if self.use_bias else out


class ResDWConv(nn.Conv2d):
    """Depth-wise convolution with an identity shortcut: ``x + dwconv(x)``."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of the single conv equal to ``bn(conv(x))`` in eval mode."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * scale.reshape(-1, 1, 1, 1), bn.bias + (conv_bias - bn.running_mean) * scale


def dilated_to_dense_kernel(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """Spread a depth-wise kernel [C, 1, k, k] with dilation ``r`` to its dense [C, 1, r(k-1)+1, ...] form."""
    if dilation == 1:
        return kernel
    channels, in_per_group, k, _ = kernel.shape
    size = dilation * (k - 1) + 1
    dense = kernel.new_zeros(channels, in_per_group, size, size)
    dense[:, :, ::dilation, ::dilation] = kernel
    return dense


def add_centered_kernel(large: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """``large`` plus ``small`` zero-padded to the same (odd) spatial size around the centre."""
    pad = (large.shape[-1] - small.shape[-1]) // 2
    return large + F.pad(small, [pad] * 4)


class DilatedReparamBlock(nn.Module):
    """Large depth-wise conv plus parallel dilated depth-wise convs (UniRepLKNet), each followed by BN.

    ``merge_dilated_branches`` folds every branch and BN into ``lk_origin`` (a biased conv), after which
    the block is a single depth-wise convolution with identical eval-mode output.
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False, use_sync_bn: bool = False):
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(f"DilatedReparamBlock kernel_size must be one of {sorted(DILATED_BRANCHES)}, "
                             f"got {kernel_size}")
        self.kernel_size = kernel_size
        self.lk_origin = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                                   groups=channels, bias=deploy)
        self.kernel_sizes = [k for k, _ in DILATED_BRANCHES[kernel_size]]
        self.dilates = [r for _, r in DILATED_BRANCHES[kernel_size]]
        self.merged = deploy
        if not deploy:
            norm = nn.SyncBatchNorm if use_sync_bn else nn.BatchNorm2d
            self.origin_bn = norm(channels)
            for k, r in zip(self.kernel_sizes, self.dilates):
                setattr(self, f"dil_conv_k{k}_{r}",
                        nn.Conv2d(channels, channels, k, padding=(r * (k - 1) + 1) // 2, dilation=r,
                                  groups=channels, bias=False))
                setattr(self, f"dil_bn_k{k}_{r}", norm(channels))

    def _branches(self):
        for k, r in zip(self.kernel_sizes, self.dilates):
            yield r, getattr(self, f"dil_conv_k{k}_{r}"), getattr(self, f"dil_bn_k{k}_{r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # depthwise_forward(conv, x) == conv(x), with a fast CPU backward (overlock/models/fast_conv.py)
        if self.merged:
            return depthwise_forward(self.lk_origin, x)
        out = self.origin_bn(depthwise_forward(self.lk_origin, x))
        for _, conv, bn in self._branches():
            out = out + bn(depthwise_forward(conv, x))
        return out

    @torch.no_grad()
    def merge_dilated_branches(self) -> None:
        """Fold the BNs and the dilated branches into one biased ``lk_origin`` conv (in place)."""
        if self.merged:
            return
        kernel, bias = fuse_conv_bn(self.lk_origin, self.origin_bn)
        for r, conv, bn in self._branches():
            branch_kernel, branch_bias = fuse_conv_bn(conv, bn)
            kernel = add_centered_kernel(kernel, dilated_to_dense_kernel(branch_kernel, r))
            bias = bias + branch_bias
        old = self.lk_origin
        merged = nn.Conv2d(old.in_channels, old.out_channels, self.kernel_size, padding=self.kernel_size // 2,
                           groups=old.groups, bias=True, device=kernel.device, dtype=kernel.dtype)
        merged.weight.copy_(kernel)
        merged.bias.copy_(bias)
        self.lk_origin = merged
        del self.origin_bn
        for k, r in zip(self.kernel_sizes, self.dilates):
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")
        self.merged = True


class RepConvBlock(nn.Module):
    """Base-Net / Overview-Net block: residual DW conv, then a dilated large-kernel conv + SE + GRN MLP.

    ``proj`` indices (0 norm, 1 DilatedReparamBlock, 2 BN, 3 SE, 4 fc1, 5 GELU, 6 ResDWConv, 7 GRN,
    8 fc2, 9 drop path) match the official state-dict names.
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int = 7,
            mlp_ratio: float = 4,
            ls_init_value: float | None = None,
            res_scale: bool = False,
            drop_path: float = 0.0,
            norm_layer: Callable[[int], nn.Module] = LayerNorm2d,
            deploy: bool = False,
            use_checkpoint: bool = False,
    ):
        super().__init__()
        self.res_scale = res_scale
        self.use_checkpoint = use_checkpoint
        mlp_dim = int(dim * mlp_ratio)
        self.dwconv = ResDWConv(dim, 3)
        self.proj = nn.Sequential(
            norm_layer(dim),
            DilatedReparamBlock(dim, kernel_size, deploy=deploy),
            nn.BatchNorm2d(dim),
            SEModule(dim),
            nn.Conv2d(dim, mlp_dim, 1),
            nn.GELU(),
            ResDWConv(mlp_dim, 3),
            GRN(mlp_dim),
            nn.Conv2d(mlp_dim, dim, 1),
            DropPath(drop_path) if drop_path > 0 else nn.Identity(),
        )
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(x)
        if self.res_scale:
            return self.ls(x) + self.proj(x)
        drop_path = self.proj[-1]
        return x + drop_path(self.ls(self.proj[:-1](x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and x.requires_grad:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)
