"""Building blocks of OverLoCK that are not ContMix itself.

Stem/downsampling layers, normalisation helpers (``LayerNorm2d``, ``GRN``), ``SEModule``, ``LayerScale``,
the UniRepLKNet-style ``DilatedReparamBlock`` with its re-parameterisation, and the Base-Net/Overview-Net
block ``RepConvBlock``. Module and parameter names follow the official release so that state dicts
load both ways without renaming.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

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


class Shortcut(NamedTuple):
    """A residual branch's shortcut ``x * scale + shift`` (per channel; ``None``: 1 and 0), for chains that
    add it inside their last convolution/GEMM (``FusibleSequential.run(..., shortcut=...)``)."""

    x: torch.Tensor
    scale: torch.Tensor | None = None  # [C]
    shift: torch.Tensor | None = None  # [C]

    def value(self) -> torch.Tensor:
        """The shortcut as a tensor."""
        view = (1, -1, 1, 1)
        if self.scale is not None and self.shift is not None:
            return torch.addcmul(self.shift.view(view), self.x, self.scale.view(view))
        out = self.x if self.scale is None else self.x * self.scale.view(view)
        return out if self.shift is None else out + self.shift.view(view)


def shortcut_of(layer_scale: nn.Module, x: torch.Tensor) -> Shortcut:
    """``layer_scale(x)`` (a ``LayerScale`` or ``nn.Identity``) as a ``Shortcut``."""
    if isinstance(layer_scale, LayerScale):
        return Shortcut(x, layer_scale.weight.view(-1), layer_scale.bias)
    if isinstance(layer_scale, nn.Identity):
        return Shortcut(x)
    raise TypeError(f"no Shortcut form for {type(layer_scale).__name__}")


class FusibleSequential(nn.Sequential):
    """``nn.Sequential`` that, in the deploy form, runs chains of its children as fewer passes.

    Off by default; ``reparameterize`` (the deploy transform) turns ``fuse_for_inference`` on. Then, in eval
    mode, conv -> BatchNorm -> activation, BatchNorm -> 1x1 conv and GRN -> 1x1 conv chains run as single
    convolutions/GEMMs, and a residual shortcut is added inside the last one
    (``overlock.models.inference_fusion``); kernels are folded from the current parameters (cached until
    they change): the state dict (names and values) stays the official one and newly loaded weights need no
    re-folding. The same function up to float round-off; in training mode, under jit tracing (FLOP counters)
    and under torch.compile the children run one by one.
    """

    fuse_for_inference: bool = False

    @property
    def fusing(self) -> bool:
        """Whether calls run fused now: enabled, eval mode, not traced (FLOP counters see the official
        structure), not compiled (inductor folds and fuses the plain graph itself)."""
        return (self.fuse_for_inference and not self.training and not torch.jit.is_tracing()
                and not torch.jit.is_scripting() and not torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def run(self, x: torch.Tensor, stop: int | None = None, shortcut: Shortcut | None = None) -> torch.Tensor:
        """The children ``[:stop]`` applied in order (fused chains when enabled), plus ``shortcut`` if given."""
        modules = list(self._modules.values())[:stop]
        if self.fusing:
            from .inference_fusion import run_fused  # local: inference_fusion imports this module

            return run_fused(modules, x, shortcut, cache=self.__dict__.setdefault("_folded_kernels", {}))
        for module in modules:
            x = module(x)
        return x + shortcut.value() if shortcut is not None else x


def enable_inference_fusion(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Set ``fuse_for_inference`` on every ``FusibleSequential`` and ``ResDWConv`` in ``model`` and empty their
    caches of folded and pre-packed kernels (in place; returns it)."""
    for module in model.modules():
        if isinstance(module, (FusibleSequential, ResDWConv)):
            module.fuse_for_inference = enabled
        for cache in ("_folded_kernels", "_packed_weights", "_fused_kernel", "_position_bias"):
            module.__dict__.pop(cache, None)
    return model


def conv_bn_stem(in_chans: int, embed_dim: int) -> FusibleSequential:
    """Four 3x3 conv+BN layers (two of stride 2) taking the image to 1/4 resolution."""
    half = embed_dim // 2
    return FusibleSequential(
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


def conv_bn_downsample(in_dim: int, out_dim: int) -> FusibleSequential:
    """Stride-2 3x3 conv + BN between pyramid levels."""
    return FusibleSequential(
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

    Stored as a depth-wise 1x1 kernel (``weight`` of shape [C, 1, 1, 1]) like the official release. Under
    jit tracing (fvcore) it is applied as that grouped convolution, so FLOPs are counted as for the official
    model; otherwise as one fused multiply-add (``addcmul``): the same value, while PyTorch's CPU grouped
    1x1 convolution loops over the channels in its backward (hundreds of small ops per call).
    """

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            return F.conv2d(x, self.weight, self.bias, groups=x.shape[1])
        channels = self.bias.shape[0]
        return torch.addcmul(self.bias.view(1, channels, 1, 1), x, self.weight.view(1, channels, 1, 1))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor (eps 1e-6)."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


GRN_EPS = 1e-6


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt V2) for NCHW tensors.

    ``(gamma * r + 1) * x + beta`` with ``r`` the spatial L2 norm of each channel over its mean across
    channels. Runs as one autograd Function (``_GRNFunction``): one pass over ``x`` forward (a fused
    multiply-add) and a hand-written backward with fewer passes than autograd's; under jit tracing as the
    plain expression (FLOP counters).
    """

    def __init__(self, dim: int, use_bias: bool = True):
        super().__init__()
        self.use_bias = use_bias
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        if use_bias:
            self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.beta if self.use_bias else None
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            out = grn_response_scale(x, self.gamma) * x
            return out + beta if beta is not None else out
        return _GRNFunction.apply(x, self.gamma, beta)


def spatial_l2_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of every channel over H, W of an NCHW tensor: [B, C, 1, 1].

    For a channels_last tensor, computed per sample as the column sums of squares of its [H*W, C] rows:
    PyTorch's norm kernel reduces channels_last tensors over H, W 5-15x slower than contiguous ones
    (measured at the OverLoCK-XT GRN shapes, benchmarks/RESULTS.md). Under jit tracing, torch.compile and
    torch.export (ONNX) always the plain norm (the per-sample loop would fix the batch size).
    """
    batch, channels = x.shape[:2]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
        rows = x.permute(0, 2, 3, 1).reshape(batch, -1, channels)  # a view
        squares = torch.stack([sample.square().sum(dim=0) for sample in rows.unbind(0)])
        return squares.sqrt_().view(batch, channels, 1, 1)
    return torch.linalg.vector_norm(x, ord=2, dim=(-2, -1), keepdim=True)


def grn_response_scale(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """GRN's multiplier ``gamma * r + 1`` [B, C, 1, 1] of an NCHW tensor (``r``: relative spatial L2 norm)."""
    norm = spatial_l2_norm(x)
    return gamma * (norm / (norm.mean(dim=1, keepdim=True) + GRN_EPS)) + 1


class _GRNFunction(torch.autograd.Function):
    """GRN forward (one fused multiply-add over x) and its gradient, written out:
    with n = ||x||_HW, m = mean_C(n) + eps, r = n / m, s = gamma * r + 1, y = s * x + beta:
    dx = g * s + x * dn / n, dn = dr / m - sum_C(dr * n) / (C m^2), dr = gamma * sum_HW(g * x)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, gamma, beta):
        norm = spatial_l2_norm(x)  # [B, C, 1, 1]
        denom = norm.mean(dim=1, keepdim=True) + GRN_EPS  # [B, 1, 1, 1]
        relative = norm / denom
        scale = gamma * relative + 1
        out = torch.addcmul(beta, x, scale) if beta is not None else x * scale
        ctx.save_for_backward(x, gamma, norm, denom, relative, scale)
        ctx.has_beta = beta is not None
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        x, gamma, norm, denom, relative, scale = ctx.saved_tensors
        grad_scale = (grad * x).sum(dim=(-2, -1), keepdim=True)  # [B, C, 1, 1]
        grad_gamma = (grad_scale * relative).sum(dim=0, keepdim=True) if ctx.needs_input_grad[1] else None
        grad_beta = None
        if ctx.has_beta and ctx.needs_input_grad[2]:
            grad_beta = grad.sum(dim=(0, 2, 3), keepdim=True)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_rel = grad_scale * gamma
            grad_norm = grad_rel / denom - (grad_rel * norm).sum(dim=1, keepdim=True) / (
                denom * denom * x.shape[1])
            # d||x|| / dx = x / ||x||, taken as 0 where the norm is 0 (as autograd's vector_norm does)
            per_pixel = torch.where(norm == 0, torch.zeros_like(norm), grad_norm / norm)
            grad_x = (grad * scale).addcmul_(x, per_pixel)
        return grad_x, grad_gamma, grad_beta


class ResDWConv(nn.Conv2d):
    """Depth-wise convolution with an identity shortcut: ``x + dwconv(x)``.

    Computed as one convolution whose kernel has 1 added at its centre (the same function; saves a pass
    over the tensor forward and backward); under jit tracing as the explicit sum, so that FLOP counters
    see the official structure.
    """

    # set by ``enable_inference_fusion`` (the deploy form): in eval mode without autograd, the fused kernel is
    # cached and run pre-packed (``inference_fusion.resdw_forward``)
    fuse_for_inference: bool = False

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            return x + super().forward(x)
        if (self.fuse_for_inference and not self.training and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            from .inference_fusion import resdw_forward  # local: inference_fusion imports this module

            return resdw_forward(self, x)
        return self._conv_forward(x, self.fused_weight(), self.bias)

    def fused_weight(self) -> torch.Tensor:
        """The kernel with the identity added at its centre: ``x + conv(x, w) == conv(x, w + identity)``."""
        centre = self.kernel_size[0] // 2
        weight = self.weight.clone()
        weight[:, :, centre, centre] += 1
        return weight


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn(x) == x * scale + shift`` per channel in eval mode."""
    scale = 1.0 / (bn.running_var + bn.eps).sqrt()
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    return scale, shift + bn.bias if bn.bias is not None else shift


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of the single conv equal to ``bn(conv(x))`` in eval mode (``weight``/``bias``: the
    conv's effective kernel and bias when not its own parameters)."""
    if weight is None:
        weight, bias = conv.weight, conv.bias
    scale, shift = _bn_scale_shift(bn)
    conv_bias = bias * scale if bias is not None else 0
    return weight * scale.reshape(-1, 1, 1, 1), shift + conv_bias


def fuse_bn_conv1x1(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of the single 1x1 conv equal to ``conv(bn(x))`` in eval mode (no padding)."""
    scale, shift = _bn_scale_shift(bn)
    bias = conv.weight.flatten(1) @ shift
    return conv.weight * scale.reshape(1, -1, 1, 1), bias + conv.bias if conv.bias is not None else bias


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
            out = out.add_(bn(depthwise_forward(conv, x)))  # in place: BN's backward does not need its output
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
        self.proj = FusibleSequential(
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
        if self.res_scale and self.proj.fusing:  # deploy form: the shortcut added inside fc2 (drop path: eval)
            return self.proj.run(x, stop=-1, shortcut=shortcut_of(self.ls, x))
        if self.res_scale:
            return self.ls(x) + self.proj(x)
        drop_path = self.proj[-1]
        return x + drop_path(self.ls(self.proj.run(x, stop=-1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and x.requires_grad:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)
