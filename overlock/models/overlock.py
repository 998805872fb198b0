"""OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels (CVPR 2025).

Paper: https://arxiv.org/abs/2502.20087. Our own implementation, compatible with the official release:
module/parameter names, constructor arguments, order of operations and outputs are the official ones, so
official checkpoints load unchanged (see ``overlock.models.checkpoint``) and outputs agree to float64
round-off (``tests/test_models_parity.py``).

Layout (timm style): the ContMix block (``DynamicConvBlock``), the shared trunk, the ImageNet classifier
``OverLoCK`` and the dense backbone ``OverLoCKBackbone``, then ``checkpoint_filter_fn``,
``_create_overlock``, ``default_cfgs`` and the ``@register_model`` size functions.

Architecture: Base-Net (stem, stages 1-3 of ``RepConvBlock``) -> Overview-Net (stage 4 of ``RepConvBlock``
at 1/32, giving a coarse context) -> Focus-Net (``DynamicConvBlock`` at 1/16 and 1/32, guided by the
context at both feature level and kernel-weight level). The ContMix aggregation itself, a neighbourhood
weighted sum with a clamped window, comes from ``overlock.models.contmix.na2d_av``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from overlock.catalog import CATALOG, OVERLOCK_SIZES

from .blocks import (
    ContextDownsample,
    DilatedReparamBlock,
    FusibleSequential,
    GRN,
    LayerNorm2d,
    LayerScale,
    RepConvBlock,
    ResDWConv,
    SEModule,
    conv_bn_downsample,
    conv_bn_stem,
    enable_inference_fusion,
    shortcut_of,
)
from .checkpoint import normalize_state_dict
from .contmix import na2d_av
from .heads import ATTENTIONS, CBAM, HEAD_TYPES, PyramidFusion

__all__ = [
    "OVERLOCK_ARCHS",
    "DynamicConvBlock",
    "OverLoCK",
    "OverLoCKBackbone",
    "create_overlock",
    "overlock_arch",
    "reparameterize",
    "checkpoint_filter_fn",
]

# Side of the pooled context map that forms the keys of the dynamic-kernel weights (49 = 7 * 7).
CONTEXT_POOL_SIZE = 7

# Architecture of each published size (the official registration functions), from the model catalog.
OVERLOCK_ARCHS: dict[str, dict] = {
    size: CATALOG[f"overlock_{size}"].model_kwargs() for size in OVERLOCK_SIZES
}


def overlock_arch(size: str) -> dict:
    """Constructor kwargs of an OverLoCK size (``xt``, ``t``, ``s``, ``b``); a bad name lists the valid."""
    if size not in OVERLOCK_ARCHS:
        raise ValueError(f"unknown OverLoCK size {size!r}; valid sizes: {', '.join(OVERLOCK_ARCHS)}")
    return {k: list(v) for k, v in OVERLOCK_ARCHS[size].items()}


def relative_position_bias(table: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    """Bias of every neighbour of every query, [1, heads, H, W, K*K], from a [heads, 2K-1, 2K-1] table.

    Follows natten's clamped-window convention as the official code indexes it: for a query at row ``i``
    the window row offset is ``r(H-1-i) + a`` (``a`` = 0..K-1) with ``r(t) = t`` for ``t < K//2`` and
    ``max(K//2, t - H + K)`` otherwise (also defined for ``H = K-1``, where the official code still runs).
    """
    half = kernel_size // 2
    span = 2 * kernel_size - 1

    def offsets(length: int) -> torch.Tensor:
        t = torch.arange(length - 1, -1, -1, device=table.device)
        r = torch.where(t < half, t, (t - length + kernel_size).clamp(min=half))
        return r[:, None] + torch.arange(kernel_size, device=table.device)[None, :]  # [length, K]

    rows, cols = offsets(height), offsets(width)
    index = rows[:, None, :, None] * span + cols[None, :, None, :]  # [H, W, K, K]
    bias = table.flatten(1)[:, index.reshape(-1)]
    return bias.reshape(1, table.shape[0], height, width, kernel_size * kernel_size)


def resized_size_for_kernel(height: int, width: int, kernel_size: int) -> tuple[int, int]:
    """Size the dense backbone up-samples a map to when its short side is below the kernel (official)."""
    if height < width:
        return kernel_size, int(kernel_size / height * width)
    return int(kernel_size / width * height), kernel_size


class DynamicConvBlock(nn.Module):
    """Focus-Net block: context-guided fusion, ContMix dynamic convolution, and a GRN MLP.

    Inputs are the Focus-Net features ``x`` [B, dim, H, W], the running context ``ctx``
    [B, ctx_dim // 4, H, W]
    and the reference context ``ctx_ref`` (the Overview-Net output projected to ``ctx_dim // 4``). Returns
    ``(x, ctx)`` split back into features and context, or ``(concat, None)`` for the last block.

    ContMix: queries are the fused features (``weight_query``), keys the context pooled to 7x7
    (``weight_key``), per head; their affinities (49 per pixel) are mixed by ``weight_proj`` into the
    weights of a small (``smk_size``) and a large (``kernel_size``) dynamic kernel per pixel, a relative
    position bias is added (``rpb1``/``rpb2``), softmax over the window, and the kernels aggregate half of
    the heads each over the clamped neighbourhood (``na2d_av``).

    ``resize_small_maps`` (default, classifier and dense backbone): maps whose short side is below
    ``kernel_size`` are up-sampled (bilinear) for the ContMix part and pooled back, as the official code does
    (natten 0.17 rejects maps smaller than the window, so this is the only official behaviour there; the
    shared parity fixture's classifier logits at 128x128, stage-4 maps 4x4 < kernel 5, require it).
    ``False`` keeps the map and lets ``na2d_av`` zero-pad the window instead (not official).
    """

    def __init__(
            self,
            dim: int = 64,
            ctx_dim: int = 32,
            kernel_size: int = 7,
            smk_size: int = 5,
            num_heads: int = 2,
            mlp_ratio: float = 4,
            ls_init_value: float | None = None,
            res_scale: bool = False,
            drop_path: float = 0.0,
            norm_layer: Callable[[int], nn.Module] = LayerNorm2d,
            is_first: bool = False,
            is_last: bool = False,
            deploy: bool = False,
            use_checkpoint: bool = False,
            resize_small_maps: bool = True,
    ):
        super().__init__()
        ctx_dim = ctx_dim // 4
        out_dim = dim + ctx_dim
        mlp_dim = int(dim * mlp_ratio)
        self.kernel_size = kernel_size
        self.smk_size = smk_size
        self.res_scale = res_scale
        self.num_heads = num_heads * 2  # half of the heads use the small kernel, half the large one
        self.scale = (dim // self.num_heads) ** -0.5
        self.is_first = is_first
        self.is_last = is_last
        self.use_checkpoint = use_checkpoint
        self.resize_small_maps = resize_small_maps

        if not is_first:
            self.x_scale = LayerScale(ctx_dim, init_value=1)
            self.h_scale = LayerScale(ctx_dim, init_value=1)
        self.dwconv1 = ResDWConv(out_dim, 3)
        self.norm1 = norm_layer(out_dim)
        self.fusion = FusibleSequential(
            nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim),
            nn.BatchNorm2d(out_dim),
            nn.GELU(),
            nn.Conv2d(out_dim, dim, 1),
            GRN(dim),
        )
        self.weight_query = FusibleSequential(nn.Conv2d(dim, dim // 2, 1, bias=False),
                                              nn.BatchNorm2d(dim // 2))
        self.weight_key = FusibleSequential(
            nn.AdaptiveAvgPool2d(CONTEXT_POOL_SIZE),
            nn.Conv2d(ctx_dim, dim // 2, 1, bias=False),
            nn.BatchNorm2d(dim // 2),
        )
        self.weight_proj = nn.Conv2d(CONTEXT_POOL_SIZE ** 2, kernel_size ** 2 + smk_size ** 2, 1)
        self.dyconv_proj = FusibleSequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.lepe = FusibleSequential(DilatedReparamBlock(dim, kernel_size, deploy=deploy),
                                      nn.BatchNorm2d(dim))
        self.se_layer = SEModule(dim)
        self.gate = FusibleSequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.SiLU())
        self.proj = FusibleSequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, out_dim, 1))
        self.dwconv2 = ResDWConv(out_dim, 3)
        self.norm2 = norm_layer(out_dim)
        self.mlp = FusibleSequential(
            nn.Conv2d(out_dim, mlp_dim, 1),
            nn.GELU(),
            ResDWConv(mlp_dim, 3),
            GRN(mlp_dim),
            nn.Conv2d(mlp_dim, out_dim, 1),
        )
        self.ls1 = LayerScale(out_dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ls2 = LayerScale(out_dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.rpb1 = nn.Parameter(torch.zeros(self.num_heads, 2 * smk_size - 1, 2 * smk_size - 1))
        self.rpb2 = nn.Parameter(torch.zeros(self.num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))

    def context_mixing(self, value_src: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        """ContMix: dynamic kernels from query/context affinities, aggregated over the neighbourhood.

        ``value_src`` is the fused feature map [B, dim, H, W] that is aggregated; ``fused`` the normalised
        concat of features and context [B, dim + ctx, H, W] whose parts give the queries and keys.
        """
        batch, dim, height, width = value_src.shape
        in_size = (height, width)
        resized = self.resize_small_maps and min(height, width) < self.kernel_size
        if resized:
            size = resized_size_for_kernel(height, width, self.kernel_size)
            value_src = F.interpolate(value_src, size=size, mode="bilinear", align_corners=False)
            fused = F.interpolate(fused, size=size, mode="bilinear", align_corners=False)
            height, width = size

        heads = self.num_heads
        query, context = fused.split([dim, fused.shape[1] - dim], dim=1)
        query = self.weight_query(query)  # scaled in kernel_logits
        key = self.weight_key(context)
        query = query.reshape(batch, heads, -1, height * width).transpose(-2, -1)  # [B, g, HW, c]
        key = key.reshape(batch, heads, -1, CONTEXT_POOL_SIZE ** 2)  # [B, g, c, 49]
        small, large = (torch.softmax(logits, dim=-1)
                        for logits in self.kernel_logits(query, key, (batch, heads, height, width)))

        value = value_src.reshape(batch, 2, heads, dim // (2 * heads), height, width)
        value = value.permute(1, 0, 2, 4, 5, 3)  # [2, B, g, H, W, c]
        out = torch.cat([
            na2d_av(small, value[0].contiguous(), kernel_size=self.smk_size),
            na2d_av(large, value[1].contiguous(), kernel_size=self.kernel_size),
        ], dim=1)  # [B, 2g, H, W, c]
        if self.fusion.fusing and value_src.is_contiguous(memory_format=torch.channels_last):
            # deploy form: the same values laid out channels_last like the input (no layout switch after it)
            out = out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, dim).permute(0, 3, 1, 2)
        else:
            out = out.permute(0, 1, 4, 2, 3).reshape(batch, dim, height, width)
        if resized:
            out = F.adaptive_avg_pool2d(out, in_size)
        return out

    def kernel_logits(self, query: torch.Tensor, key: torch.Tensor, shape: tuple[int, int, int, int]):
        """Pre-softmax logits of the small and the large dynamic kernel, [B, g, H, W, k*k] each:
        ``weight_proj(scale * query @ key)`` plus the relative position bias.

        ``query`` [B, g, HW, c], ``key`` [B, g, c, 49]. Computed as ``query @ (key @ scale W^T)``, the same
        products re-associated (16 query channels per head against 49 affinities: 3x fewer multiply-adds than
        projecting the [HW, 49] affinities), per kernel (contiguous logits), with weight_proj's bias added
        together with the position bias; under jit tracing (FLOP counters) in the official order.
        """
        batch, heads, height, width = shape
        sizes = [self.smk_size ** 2, self.kernel_size ** 2]
        tables = [(self.rpb1, self.smk_size), (self.rpb2, self.kernel_size)]
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            affinity = torch.matmul(query * self.scale, key)
            logits = F.linear(affinity, self.weight_proj.weight.flatten(1), self.weight_proj.bias)
            logits = logits.reshape(batch, heads, height, width, -1).split(sizes, dim=-1)
            return [part + relative_position_bias(table, height, width, size)
                    for part, (table, size) in zip(logits, tables)]
        weights = self.weight_proj.weight.flatten(1).split(sizes)
        biases = self.weight_proj.bias.split(sizes)
        cached = self.fusion.fusing and not torch.is_grad_enabled()  # deploy form, inference
        out = []
        for part, (weight, bias, (table, size)) in enumerate(zip(weights, biases, tables)):
            projected_key = torch.matmul(key, weight.t() * self.scale)  # [B, g, c, k*k]
            logits = torch.matmul(query, projected_key).view(batch, heads, height, width, -1)
            if cached:
                position_bias = self._cached_position_bias(part, table, bias, size, height, width)
            else:
                position_bias = relative_position_bias(table, height, width, size) + bias
            out.append(logits.add_(position_bias))  # in place: matmul's backward needs its inputs only
        return out

    def _cached_position_bias(self, part: int, table: torch.Tensor, bias: torch.Tensor, size: int, height: int,
                              width: int):
        """``relative_position_bias(table, height, width, size) + bias`` (``bias``: this kernel's slice of
        ``weight_proj``'s bias, a view sharing its version counter), kept per map size while the table and the
        bias are unchanged (the deploy form without autograd: the gather of [heads, H*W*k*k] entries otherwise
        runs on every call)."""
        store = self.__dict__.setdefault("_position_bias", {})
        version = (table.data_ptr(), table._version, bias.data_ptr(), bias._version, table.dtype, bias.dtype)
        hit = store.get((part, height, width, table.device))
        if hit is None or hit[0] != version:
            if len(store) > 16:
                store.clear()
            with torch.inference_mode(False), torch.no_grad():
                value = relative_position_bias(table, height, width, size) + bias
            hit = store[(part, height, width, table.device)] = (version, value)
        return hit[1]

    def _forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_ref: torch.Tensor | None):
        channels, ctx_channels = x.shape[1], ctx.shape[1]
        if not self.is_first:
            ctx = self.x_scale(ctx) + self.h_scale(ctx_ref)
        fused = self.dwconv1(torch.cat([x, ctx], dim=1))
        shortcut = fused
        fused = self.norm1(fused)
        x = self.fusion(fused)
        gate = self.gate(x)
        lepe = self.lepe(x)
        x = self.dyconv_proj(self.context_mixing(x, fused)) + lepe
        x = gate * self.se_layer(x)
        # deploy form (eval: no drop path): the shortcuts are added inside the last conv of proj / mlp
        if self.res_scale and self.proj.fusing:
            x = self.proj.run(x, shortcut=shortcut_of(self.ls1, shortcut))
        elif self.res_scale:
            x = self.ls1(shortcut) + self.drop_path(self.proj(x))
        else:
            x = shortcut + self.drop_path(self.ls1(self.proj(x)))
        x = self.dwconv2(x)
        if self.res_scale and self.mlp.fusing:
            x = self.mlp.run(self.norm2(x), shortcut=shortcut_of(self.ls2, x))
        elif self.res_scale:
            x = self.ls2(x) + self.drop_path(self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        if self.is_last:
            return x, None
        x, ctx = x.split([channels, ctx_channels], dim=1)
        return x, ctx

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_ref: torch.Tensor | None = None):
        if self.use_checkpoint and x.requires_grad:
            return checkpoint(self._forward, x, ctx, ctx_ref, use_reentrant=False)
        return self._forward(x, ctx, ctx_ref)


def _per_stage(value, name: str, length: int) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ValueError(f"{name} must be a list of {length} values, got {value!r}")
    return list(value)


class _OverLoCKTrunk(nn.Module):
    """Base-Net, Overview-Net and Focus-Net shared by the classifier and the dense backbone."""

    def __init__(
            self,
            depth: Sequence[int] = (2, 2, 2, 2),
            sub_depth: Sequence[int] = (4, 2),
            in_chans: int = 3,
            embed_dim: Sequence[int] = (96, 192, 384, 768),
            kernel_size: Sequence[int] = (7, 7, 7, 7),
            mlp_ratio: Sequence[float] = (4, 4, 4, 4),
            sub_mlp_ratio: Sequence[float] = (4, 4),
            sub_num_heads: Sequence[int] = (4, 8),
            ls_init_value: Sequence[float | None] = (None, None, 1, 1),
            res_scale: bool = True,
            smk_size: int = 5,
            deploy: bool = False,
            use_gemm: bool = True,
            use_ds: bool = True,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Callable[[int], nn.Module] = LayerNorm2d,
            projection: int = 1024,
            num_classes: int = 1000,
            use_checkpoint: Sequence[int] = (0, 0, 0, 0),
    ):
        super().__init__()
        depth = _per_stage(depth, "depth", 4)
        sub_depth = _per_stage(sub_depth, "sub_depth", 2)
        embed_dim = _per_stage(embed_dim, "embed_dim", 4)
        kernel_size = _per_stage(kernel_size, "kernel_size", 4)
        mlp_ratio = _per_stage(mlp_ratio, "mlp_ratio", 4)
        sub_mlp_ratio = _per_stage(sub_mlp_ratio, "sub_mlp_ratio", 2)
        sub_num_heads = _per_stage(sub_num_heads, "sub_num_heads", 2)
        ls_init_value = _per_stage(ls_init_value, "ls_init_value", 4)
        use_checkpoint = _per_stage(use_checkpoint, "use_checkpoint", 4)
        for i, heads in enumerate(sub_num_heads):
            dim = embed_dim[2 + i]
            if dim % (4 * heads):
                raise ValueError(
                    f"embed_dim[{2 + i}]={dim} must be divisible by 4 * sub_num_heads[{i}]={4 * heads}")
        if embed_dim[-1] % 4:
            raise ValueError(f"embed_dim[-1]={embed_dim[-1]} must be divisible by 4")
        # use_gemm selects the official iGEMM large-kernel conv, a CUDA extension we do not ship; the
        # arithmetic is the same, so the flag is accepted and ignored. drop_rate is unused officially too.
        del use_gemm, drop_rate

        self.embed_dim = embed_dim
        self.depth, self.sub_depth = depth, sub_depth
        self.kernel_size, self.smk_size = kernel_size, smk_size
        self.fusion_dim = embed_dim[-1] + embed_dim[-1] // 4
        self.ctx_dim = embed_dim[-1] // 4

        self.patch_embed1 = conv_bn_stem(in_chans, embed_dim[0])
        self.patch_embed2 = conv_bn_downsample(embed_dim[0], embed_dim[1])
        self.patch_embed3 = conv_bn_downsample(embed_dim[1], embed_dim[2])
        self.patch_embed4 = conv_bn_downsample(embed_dim[2], embed_dim[3])
        self.high_level_proj = nn.Conv2d(embed_dim[-1], self.ctx_dim, 1)
        self.patch_embedx = ContextDownsample(embed_dim[2], embed_dim[3])

        total = sum(depth) + sum(sub_depth)
        dpr = torch.linspace(0, drop_path_rate, total, device="cpu").tolist()  # cpu: also under a meta device
        starts = [0, depth[0], sum(depth[:2]), sum(depth[:3]), sum(depth), sum(depth) + sub_depth[0]]

        for stage in range(4):
            blocks = nn.ModuleList(
                RepConvBlock(
                    dim=embed_dim[stage], kernel_size=kernel_size[stage], mlp_ratio=mlp_ratio[stage],
                    ls_init_value=ls_init_value[stage], res_scale=res_scale, drop_path=dpr[starts[stage] + i],
                    norm_layer=norm_layer, deploy=deploy, use_checkpoint=i < use_checkpoint[stage])
                for i in range(depth[stage]))
            setattr(self, f"blocks{stage + 1}", blocks)

        for sub in range(2):
            stage = 2 + sub
            blocks = nn.ModuleList(
                DynamicConvBlock(
                    dim=embed_dim[stage], ctx_dim=embed_dim[-1], kernel_size=kernel_size[stage],
                    smk_size=smk_size, num_heads=sub_num_heads[sub], mlp_ratio=sub_mlp_ratio[sub],
                    ls_init_value=ls_init_value[stage], res_scale=res_scale,
                    drop_path=dpr[starts[4 + sub] + i], norm_layer=norm_layer,
                    is_first=(sub == 0 and i == 0), is_last=(sub == 1 and i == sub_depth[1] - 1),
                    deploy=deploy, use_checkpoint=i < use_checkpoint[stage])
                for i in range(sub_depth[sub]))
            setattr(self, f"sub_blocks{stage + 1}", blocks)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in the backward pass (activation checkpointing) when ``enable``."""
        for m in self.modules():
            if isinstance(m, (RepConvBlock, DynamicConvBlock)):
                m.use_checkpoint = enable

    def reparameterize(self) -> "_OverLoCKTrunk":
        """Fold every ``DilatedReparamBlock`` into one large kernel for inference (in place; returns self)."""
        reparameterize(self)
        return self

    def forward_pre_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Base-Net stages 1 and 2: returns the 1/4 and 1/8 feature maps."""
        x = self.patch_embed1(x)
        for blk in self.blocks1:
            x = blk(x)
        x1 = x
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x)
        return [x1, x]

    def forward_base_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Base-Net stage 3 (1/16) and Overview-Net (1/32 context)."""
        x = self.patch_embed3(x)
        for blk in self.blocks3:
            x = blk(x)
        ctx = self.patch_embed4(x)
        for blk in self.blocks4:
            ctx = blk(ctx)
        return x, ctx

    def forward_sub_features(self, x: torch.Tensor, ctx: torch.Tensor):
        """Focus-Net: returns (stage-3 features+context, stage-4 features+context, Overview-Net output)."""
        overview = ctx
        ctx_ref = self.high_level_proj(ctx)
        # The classifier release up-samples by scale_factor=2, the detection release to x's size: the two
        # are bit-identical whenever both apply, and the latter also covers odd feature sizes.
        ctx_up = F.interpolate(ctx_ref, size=x.shape[2:], mode="bilinear", align_corners=False)
        ctx = ctx_up
        for blk in self.sub_blocks3:
            x, ctx = blk(x, ctx, ctx_up)
        stage3 = torch.cat([x, ctx], dim=1)
        x, ctx = self.patch_embedx(x, ctx)
        for blk in self.sub_blocks4:
            x, ctx = blk(x, ctx, ctx_ref)
        return stage3, x, overview


class OverLoCK(_OverLoCKTrunk):
    """OverLoCK ImageNet classifier (official constructor arguments; see ``OVERLOCK_ARCHS`` for the sizes).

    ``forward(x)`` returns logits [B, num_classes] in eval mode. In training mode with the auxiliary head
    (``use_ds=True``, the default) it returns ``{"main": logits, "aux": aux_logits}`` exactly like the
    official code; the aux head classifies the Overview-Net context and the recipe adds ``0.4 * loss(aux)``.
    ``num_classes=0`` turns both heads' last layers into identities (pooled features).

    Variants (``overlock.models.heads``; new modules only, the plain parameter names are unchanged):
    ``head_type="fpn"`` fuses the 1/8 and 1/16 pyramid levels into the 1/32 map before the head's pooling,
    ``attention="cbam"`` applies CBAM to that map.
    """

    def __init__(self, *args, num_classes: int = 1000, projection: int = 1024, use_ds: bool = True,
                 head_type: str = "plain", attention: str = "none", **kwargs):
        if head_type not in HEAD_TYPES:
            raise ValueError(f"unknown head_type {head_type!r}; valid: {', '.join(HEAD_TYPES)}")
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; valid: {', '.join(ATTENTIONS)}")
        super().__init__(*args, num_classes=num_classes, projection=projection, use_ds=use_ds, **kwargs)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = projection
        embed_dim = self.embed_dim
        if use_ds:
            self.aux_head = nn.Sequential(
                nn.BatchNorm2d(embed_dim[-1]),
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(embed_dim[-1], num_classes, 1) if num_classes > 0 else nn.Identity(),
            )
        self.head = FusibleSequential(
            nn.Conv2d(self.fusion_dim, projection, 1, bias=False),
            nn.BatchNorm2d(projection),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(projection, num_classes, 1) if num_classes > 0 else nn.Identity(),
        )
        self.head_type, self.attention = head_type, attention
        self.pyramid_fusion = PyramidFusion((embed_dim[1], embed_dim[2] + self.ctx_dim), self.fusion_dim) \
            if head_type == "fpn" else None
        self.cbam = CBAM(self.fusion_dim) if attention == "cbam" else None
        self.apply(self._init_weights)
        if self.pyramid_fusion is not None:  # after _init_weights: zero lateral BNs (plain function at init)
            self.pyramid_fusion.reset_parameters()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head[-1]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New final layers for ``num_classes`` classes (main and aux head); 0 gives identities."""
        self.num_classes = num_classes
        ref = self.head[1].weight

        def new_layer(in_ch: int) -> nn.Module:
            if num_classes <= 0:
                return nn.Identity()
            layer = nn.Conv2d(in_ch, num_classes, 1, device=ref.device, dtype=ref.dtype)
            self._init_weights(layer)
            return layer

        self.head[-1] = new_layer(self.head[0].out_channels)
        if hasattr(self, "aux_head"):
            self.aux_head[-1] = new_layer(self.embed_dim[-1])

    def remove_aux_head(self) -> None:
        """Drop the auxiliary head (inference only; training-mode forward then returns plain logits)."""
        if hasattr(self, "aux_head"):
            del self.aux_head

    def reparameterize(self, remove_aux_head: bool = False) -> "OverLoCK":
        """Merge dilated branches/BNs for inference (outputs unchanged); optionally drop the aux head."""
        reparameterize(self)
        if remove_aux_head:
            self.remove_aux_head()
        return self

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Focus-Net output [B, fusion_dim, H/32, W/32], Overview-Net output [B, C4, H/32, W/32]); the
        variants' pyramid fusion and CBAM are applied to the first."""
        level1 = self.forward_pre_features(x)[-1]
        x, ctx = self.forward_base_features(level1)
        stage3, x, overview = self.forward_sub_features(x, ctx)
        if self.pyramid_fusion is not None:
            x = self.pyramid_fusion(x, (level1, stage3))
        if self.cbam is not None:
            x = self.cbam(x)
        return x, overview

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Main head on the Focus-Net output; ``pre_logits`` stops before the last linear layer."""
        if pre_logits:
            return self.head[:-1](x).flatten(1)
        return self.head(x).flatten(1)

    def forward(self, x: torch.Tensor):
        x, overview = self.forward_features(x)
        logits = self.forward_head(x)
        if self.training and hasattr(self, "aux_head"):
            return dict(main=logits, aux=self.aux_head(overview).flatten(1))
        return logits


class OverLoCKBackbone(_OverLoCKTrunk):
    """OverLoCK dense-prediction backbone (official detection/segmentation variant).

    Returns a tuple with the pyramid levels in ``out_indices`` (strides 4, 8, 16, 32; e.g. T has 64, 128,
    384, 640 channels, see ``out_channels``). Level 2 is the stage-3 Focus-Net features concatenated with the
    context, level 3 the stage-4 output plus a projection of the Overview-Net output, each LayerNormed
    (``extra_norm``). As in the official detection code, stage 3 consumes the LayerNormed level-1 output
    (``extra_norm[1]``), not the raw stage-2 features the classifier uses. No classification heads; a
    classifier checkpoint loads after dropping them.

    ``frozen_stages``: ``k`` >= 1 freezes (eval mode, no gradients) the modules of levels 0..k-1; level 1
    includes ``extra_norm[1]`` (it feeds stage 3), level 2 the Overview-Net (``patch_embed4``, ``blocks4``,
    ``high_level_proj``) that guides it.

    ``overview_fusion=False`` gives the official segmentation variant: level 3 is the LayerNormed stage-4
    output alone (no ``h_proj`` and no fifth ``extra_norm``), everything else is the same.
    """

    def __init__(self, *args, out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 overview_fusion: bool = True, **kwargs):
        for drop in ("num_classes", "projection", "use_ds"):  # classifier-only arguments are accepted
            kwargs.pop(drop, None)
        super().__init__(*args, **kwargs)
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in (0, 1, 2, 3) for i in out_indices):
            raise ValueError(f"out_indices must be a non-empty subset of (0, 1, 2, 3), got {out_indices}")
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        embed_dim = self.embed_dim
        self.overview_fusion = overview_fusion
        if overview_fusion:
            self.h_proj = nn.Sequential(
                nn.Conv2d(embed_dim[-1], self.fusion_dim, 1),
                LayerScale(self.fusion_dim, init_value=1e-5),
            )
        self.pyramid_channels = (embed_dim[0], embed_dim[1], embed_dim[2] + self.ctx_dim, self.fusion_dim)
        self.out_channels = tuple(self.pyramid_channels[i] for i in out_indices)
        self.extra_norm = nn.ModuleList(LayerNorm2d(c) for c in self.pyramid_channels)
        if overview_fusion:
            self.extra_norm.append(LayerNorm2d(embed_dim[-1]))
        self.apply(self._init_weights)
        self._freeze_stages()

    def _stage_modules(self, level: int) -> list[nn.Module]:
        return [
            [self.patch_embed1, self.blocks1],
            [self.patch_embed2, self.blocks2, self.extra_norm[1]],
            [self.patch_embed3, self.blocks3, self.patch_embed4, self.blocks4, self.high_level_proj,
             self.sub_blocks3],
            [self.patch_embedx, self.sub_blocks4, *([self.h_proj] if self.overview_fusion else [])],
        ][level]

    def _freeze_stages(self) -> None:
        for level in range(min(self.frozen_stages, 4)):
            for module in self._stage_modules(level):
                module.eval()
                for p in module.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True) -> "OverLoCKBackbone":
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x0, x1 = self.forward_pre_features(x)
        x1 = self.extra_norm[1](x1)  # official: stage 3 runs on the normalised level-1 output
        x, ctx = self.forward_base_features(x1)
        stage3, x, overview = self.forward_sub_features(x, ctx)
        x3 = self.extra_norm[3](x)
        if self.overview_fusion:
            x3 = x3 + self.h_proj(self.extra_norm[4](overview))
        levels = (self.extra_norm[0](x0), x1, self.extra_norm[2](stage3), x3)
        return tuple(levels[i] for i in self.out_indices)


def reparameterize(model: nn.Module) -> nn.Module:
    """Deploy form (in place): merge the dilated branches and their BNs of every ``DilatedReparamBlock``
    into one large kernel, and turn on the inference fusion of the remaining layer chains.

    The merge is structural (the official re-parameterization: the same state dict as the official deploy
    model). The fusion (``overlock.models.inference_fusion``: BatchNorms folded into their neighbouring
    convolutions, activations run as oneDNN post-ops, GRN scales moved into the next 1x1 conv) is computed on
    the fly in eval mode, so the state dict keeps every BatchNorm. Works on the classifier, the dense
    backbone or any module containing them (e.g. a detector). Eval-mode outputs are unchanged up to float
    round-off. Returns ``model``.
    """
    for m in list(model.modules()):
        if isinstance(m, DilatedReparamBlock):
            m.merge_dilated_branches()
    return enable_inference_fusion(model)


def create_overlock(size: str, *, dense: bool = False, **overrides) -> nn.Module:
    """Build an OverLoCK classifier (``dense=False``, via timm: ``pretrained_cfg`` is set) or dense backbone.

    ``overrides`` replace entries of the size's architecture or pass other constructor arguments
    (``num_classes``, ``drop_path_rate``, ``out_indices``, ...). Unknown sizes raise with the valid list.
    """
    arch = overlock_arch(size)
    if dense:  # overview_fusion=False in overrides: the segmentation variant
        return OverLoCKBackbone(**{**arch, **overrides})
    import timm  # local: timm.create_model resolves our registered names

    return timm.create_model(f"overlock_{size}", **overrides)


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Map an official (or DDP/MMDetection-wrapped) OverLoCK checkpoint onto ``model``'s keys."""
    return normalize_state_dict(state_dict, model)


def _create_overlock(variant: str, pretrained: bool = False, **kwargs) -> OverLoCK:
    if kwargs.pop("features_only", False):
        raise ValueError("features_only is not supported for OverLoCK; use OverLoCKBackbone (dense features)")
    return build_model_with_cfg(OverLoCK, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **kwargs)


default_cfgs = generate_default_cfgs({
    f"{cfg.timm_name}.{cfg.pretrained_tag}": cfg.pretrained_cfg()
    for cfg in CATALOG.values() if cfg.is_overlock
})


@register_model
def overlock_xt(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-XT (16.5M params re-parameterized, 2.6 GFLOPs)."""
    return _create_overlock("overlock_xt", pretrained, **{**OVERLOCK_ARCHS["xt"], **kwargs})


@register_model
def overlock_t(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-T (33.5M params re-parameterized, 5.5 GFLOPs)."""
    return _create_overlock("overlock_t", pretrained, **{**OVERLOCK_ARCHS["t"], **kwargs})


@register_model
def overlock_s(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-S (56.2M params re-parameterized, 9.7 GFLOPs)."""
    return _create_overlock("overlock_s", pretrained, **{**OVERLOCK_ARCHS["s"], **kwargs})


@register_model
def overlock_b(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-B (94.9M params re-parameterized, 16.7 GFLOPs)."""
    return _create_overlock("overlock_b", pretrained, **{**OVERLOCK_ARCHS["b"], **kwargs})
