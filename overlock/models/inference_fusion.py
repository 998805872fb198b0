"""Inference-only fusion of the deploy model's layer chains (turned on by ``reparameterize``).

A ``FusibleSequential`` (``overlock.models.blocks``) with fusion enabled, in eval mode, runs chains of its
children as fewer passes over the feature maps. ``run_fused`` matches, left to right:

* conv [-> BatchNorm] [-> GELU | SiLU | ReLU | Sigmoid]: one convolution, the BN folded into its kernel and
  bias, the activation applied inside the convolution as a oneDNN post-op
  (``torch.ops.mkldnn._convolution_pointwise``, the kernel ``torch.compile``'s CPU backend emits for the same
  pattern). A standalone GELU is a full pass over the widest tensors of the model (the MLPs' 4x expansions);
  as a post-op it costs about a fifth of that. Used on CPU for float32/bfloat16 when no gradient is recorded;
  otherwise the folded convolution and then the activation module;
* BatchNorm -> 1x1 conv [-> activation]: the BN folded into the following conv's kernel and bias;
* a merged ``DilatedReparamBlock`` -> BatchNorm: one depth-wise convolution with the BN folded in;
* GRN -> 1x1 conv: GRN's per-sample, per-channel scale ``s[b, c]`` moves into the conv's weights, one
  batched GEMM with weights ``W * s[b]`` (its ``beta`` into the bias), when that is cheaper than scaling the
  activations (output channels <= pixels): it saves the GRN's multiply pass over the 4x-wide tensor;
* SE inside a chain: its input, made inside the chain, is scaled in place (no new allocation);
* a residual ``Shortcut`` (``x * layer_scale + shift``) given to the chain is added inside its last
  convolution (a oneDNN binary post-op, for outputs of at least ``MIN_FUSED_ADD_NUMEL`` elements) or GEMM (as
  the accumulator it starts from), instead of as a separate pass over the block's output;
* pre-packed weights: for channels_last float32 inputs (no autograd, no autocast) every convolution of a
  chain, every merged large kernel and every standalone ``ResDWConv`` runs on a kernel already reordered
  into oneDNN's blocked layout for that input shape (``torch.ops.mkldnn._reorder_convolution_weight``, what
  ``torch.compile``'s weight freezing does), kept per layer for the last ``MAX_PACKED_SHAPES`` input shapes.
  Without it oneDNN reorders every kernel on every call (~140 weight reorders per batch-1 forward of
  OverLoCK-XT). The same oneDNN convolution (a single layer's output is bitwise equal); 1x1 convolutions
  that PyTorch would send to its reference kernel at batch 1 now run in oneDNN too (round-off differs).
  The squeeze-excitation's two 1x1 convolutions of a pooled [B, C, 1, 1] map run as matrix products.

Only tensors made inside the chain are overwritten, never the chain's input. The same function up to float
round-off (``tests/test_models_inference_fusion.py``); the state dict stays the official one: folded kernels
are computed from the current parameters and cached per chain until a parameter or buffer changes.
Measured in ``benchmarks/RESULTS.md`` (``benchmarks/inference.py``).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (GRN, DilatedReparamBlock, ResDWConv, SEModule, Shortcut, fuse_bn_conv1x1, fuse_conv_bn,
                     grn_response_scale)
from .fast_conv import DWCONV_ENV_VAR, depthwise_forward

__all__ = ["run_fused", "conv_with_activation", "grn_conv1x1", "onednn_post_ops_available", "fused_conv_path",
           "gemm_in_place", "packed_conv", "resdw_forward", "MAX_PACKED_SHAPES"]

# Below this many output elements a residual add as a oneDNN post-op is slower than the separate add
# (measured at batch 1: +25% on a [1, 340, 14, 14] output; -10% at batch 32).
MIN_FUSED_ADD_NUMEL = 1 << 20
# Input shapes per layer whose pre-packed kernels are kept (least recently used dropped first): e.g. serving
# batch 1 and a throughput batch side by side.
MAX_PACKED_SHAPES = 4
# Switch for the pre-packed kernels (benchmarks compare with and without; tests check both give the same).
PACK_WEIGHTS = True
# activation module type -> (oneDNN post-op name, algorithm)
_POST_OPS: dict[type, tuple[str, str | None]] = {
    nn.ReLU: ("relu", None),
    nn.SiLU: ("swish", None),
    nn.Sigmoid: ("sigmoid", None),
    nn.GELU: ("gelu", "none"),
}


def onednn_post_ops_available() -> bool:
    """Whether this PyTorch build has oneDNN's fused convolution + post-op kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _post_op(activation: nn.Module | None) -> tuple[str, str | None] | None:
    if activation is None:
        return "none", None
    if isinstance(activation, nn.GELU) and activation.approximate != "none":
        return "gelu", "tanh"
    return _POST_OPS.get(type(activation))


def _is_activation(module: nn.Module) -> bool:
    return type(module) in _POST_OPS


def fused_conv_path(device_type: str, grad_enabled: bool, onednn_available: bool, dtype: torch.dtype) -> str:
    """'onednn' (one fused convolution + post-op call: CPU, float32/bfloat16, no autograd) or 'torch' (the
    convolution, then the activation and the add as separate ops: CUDA, training, other dtypes)."""
    if device_type == "cpu" and not grad_enabled and onednn_available and (
            dtype == torch.float32 or (dtype == torch.bfloat16 and _onednn_bf16_supported())):
        return "onednn"
    return "torch"


def _onednn_bf16_supported() -> bool:
    """oneDNN's bf16 convolution needs AVX512 (bw/vl/dq) or AVX-NE-CONVERT; elsewhere it raises."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def gemm_in_place(device_type: str, grad_enabled: bool, autocast_enabled: bool) -> bool:
    """Whether ``grn_conv1x1`` may accumulate into a preallocated fp32 output (``baddbmm_``) or scale its
    input in place: no autograd, and no autocast on the tensors' device (autocast does not cast in-place
    ops: a bf16 input with fp32 weights would fail)."""
    return not grad_enabled and not autocast_enabled


def _onednn_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``(x, weight, bias)`` in the dtype the fused oneDNN kernel should run in, or None where it does not
    apply (off CPU, with autograd, other dtypes, no oneDNN)."""
    if x.device.type != "cpu":  # autocast state is queried per device type: CPU only from here on
        return None
    if torch.is_autocast_enabled("cpu"):  # what autocast does to F.conv2d
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if weight.dtype != x.dtype or fused_conv_path(x.device.type, torch.is_grad_enabled(),
                                                  onednn_post_ops_available(), x.dtype) != "onednn":
        return None
    return x, weight, bias


def conv_with_activation(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None,
                         activation: nn.Module | None = None, shortcut: Shortcut | None = None) -> torch.Tensor:
    """``activation(conv(x)) + shortcut`` with ``conv``'s geometry and the given kernel/bias, as one oneDNN
    call on CPU (float32/bfloat16, no autograd); otherwise the convolution, the activation module, the add."""
    post_op = _post_op(activation)
    fused = _onednn_inputs(x, weight, bias)
    if post_op is None or fused is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str) \
            or (shortcut is not None and activation is not None):
        out = conv._conv_forward(x, weight, bias)
        out = activation(out) if activation is not None else out
        return out + shortcut.value() if shortcut is not None else out
    x, weight, bias = fused
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    packed = _packable(x, weight)
    if packed:
        x = x.contiguous(memory_format=torch.channels_last)  # a channel slice: copied as oneDNN would copy it
    if shortcut is not None and shortcut.x.numel() >= MIN_FUSED_ADD_NUMEL:
        other = shortcut.value().to(x.dtype)
        kernel = _packed_weight(conv, weight, geometry, x) if packed else weight
        return torch.ops.mkldnn._convolution_pointwise(x, other, kernel, bias, *geometry, "add", None, None, [],
                                                       None)
    if shortcut is not None:
        out = packed_conv(x, conv, weight, bias) if packed else conv._conv_forward(x, weight, bias)
        return out + shortcut.value()
    if activation is None:
        if packed:
            return packed_conv(x, conv, weight, bias)
        return conv._conv_forward(x, weight, bias)  # nothing to fuse (PyTorch's path is as fast or faster)
    name, algorithm = post_op
    kernel = _packed_weight(conv, weight, geometry, x) if packed else weight
    return torch.ops.mkldnn._convolution_pointwise(x, kernel, bias, *geometry, name, [], algorithm)


def _packable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``packed_conv`` applies: CPU, float32 (no autocast), no autograd, a channels_last 4-D input
    (the layout the packed kernels are made for), oneDNN present."""
    return (PACK_WEIGHTS and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 4
            and fused_conv_path(x.device.type, torch.is_grad_enabled(), onednn_post_ops_available(),
                                x.dtype) == "onednn"  # the device's choice (CPU; never CUDA)
            and not torch.is_autocast_enabled("cpu")
            and (x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) == 1))  # or a channel slice


class _PackedStore(OrderedDict):
    """input shape -> (source kernel, its version, packed kernel). Not copied or pickled (oneDNN's opaque
    tensors have no storage): a copy of the model starts empty and packs again."""

    def __deepcopy__(self, memo):
        return _PackedStore()

    def __reduce__(self):
        return _PackedStore, ()


def _packed_weight(conv: nn.Conv2d, weight: torch.Tensor, geometry: tuple, x: torch.Tensor) -> torch.Tensor:
    """``weight`` reordered into oneDNN's blocked layout for inputs shaped like ``x``; kept on ``conv`` (the
    last ``MAX_PACKED_SHAPES`` shapes) while ``weight`` is the same tensor at the same in-place version."""
    store = conv.__dict__.setdefault("_packed_weights", _PackedStore())
    key = tuple(x.shape)
    hit = store.get(key)
    version = weight._version
    if hit is not None and hit[0] is weight and hit[1] == version:
        try:
            store.move_to_end(key)
        except KeyError:  # dropped meanwhile by another thread's call
            pass
        return hit[2]
    with torch.inference_mode(False), torch.no_grad():
        try:
            packed = torch.ops.mkldnn._reorder_convolution_weight(weight.detach(), *geometry, list(key))
        except RuntimeError:  # a geometry oneDNN cannot pre-pack: the plain kernel (reordered per call)
            packed = weight
    store[key] = (weight, version, packed)  # holds weight: a new tensor can never take its identity
    while len(store) > MAX_PACKED_SHAPES:
        store.popitem(last=False)
    return packed


def packed_conv(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s convolution of ``x`` with ``weight``/``bias`` on the pre-packed kernel (caller checked
    ``_packable``); the output is channels_last like the input."""
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    x = x.contiguous(memory_format=torch.channels_last)
    kernel = _packed_weight(conv, weight, geometry, x)
    return torch.ops.mkldnn._convolution_pointwise(x, kernel, bias, *geometry, "none", [], None)


def resdw_forward(conv: ResDWConv, x: torch.Tensor) -> torch.Tensor:
    """A standalone ``ResDWConv`` in the deploy form (eval, no autograd): its identity-centred kernel kept
    while the parameters do not change, and run pre-packed for channels_last float32 inputs."""
    weight, bias = _cached(conv.__dict__.setdefault("_fused_kernel", {}), 0, [conv],
                           lambda: (conv.fused_weight(), conv.bias))
    if _onednn_inputs(x, weight, bias) is not None and _packable(x, weight):
        return packed_conv(x, conv, weight, bias)
    return conv._conv_forward(x, weight, bias)


def _accumulator(bias: torch.Tensor, shortcut: Shortcut | None, layout: str, shape: tuple[int, ...]):
    """The tensor a GEMM output starts from: ``bias`` (broadcast) plus the shortcut, laid out as ``shape``
    ([B, pixels, O] for 'rows', [B, O, pixels] for 'columns'); None when the shortcut's layout differs."""
    view = (1, 1, -1) if layout == "rows" else (1, -1, 1)
    if shortcut is None:
        return bias.view(view).expand(shape).clone()  # written once, then accumulated into in place
    x = shortcut.x
    if layout == "rows" and x.is_contiguous(memory_format=torch.channels_last):
        base = x.permute(0, 2, 3, 1).reshape(shape)
    elif layout == "columns" and x.is_contiguous():
        base = x.reshape(shape)
    else:
        return None
    shift = bias if shortcut.shift is None else bias + shortcut.shift
    if shortcut.scale is None:
        return base + shift.view(view)
    return torch.addcmul(shift.view(view), base, shortcut.scale.view(view))


def grn_conv1x1(x: torch.Tensor, grn: GRN, conv: nn.Conv2d, overwrite_input: bool = False,
                shortcut: Shortcut | None = None) -> torch.Tensor:
    """``conv(grn(x)) + shortcut`` for a 1x1, ungrouped, unpadded ``conv``; the GRN scale applied to the
    weights when that is the smaller tensor (a batched GEMM with per-sample weights, accumulated into the
    bias + shortcut), else to ``x`` (in place when ``overwrite_input``: no new allocation of the widest
    tensor)."""
    batch, channels, height, width = x.shape
    scale = grn_response_scale(x, grn.gamma).view(batch, channels)  # [B, C]
    weight = conv.weight.flatten(1)  # [O, C]
    bias = conv.bias if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if grn.use_bias:
        bias = bias + weight @ grn.beta.flatten()
    out_channels, pixels = weight.shape[0], height * width
    in_place = gemm_in_place(x.device.type, torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type))
    if out_channels <= pixels and in_place and x.is_contiguous(memory_format=torch.channels_last):
        out = _accumulator(bias, shortcut, "rows", (batch, pixels, out_channels))
        if out is not None:
            rows = x.permute(0, 2, 3, 1).reshape(batch, pixels, channels)  # a view
            out.baddbmm_(rows, weight.t().unsqueeze(0) * scale.unsqueeze(-1))
            return out.view(batch, height, width, out_channels).permute(0, 3, 1, 2)  # channels_last
    if out_channels <= pixels and in_place and x.is_contiguous():
        out = _accumulator(bias, shortcut, "columns", (batch, out_channels, pixels))
        if out is not None:
            out.baddbmm_(weight.unsqueeze(0) * scale.unsqueeze(1), x.reshape(batch, channels, pixels))
            return out.view(batch, out_channels, height, width)
    scale = scale.view(batch, channels, 1, 1)
    scaled = x.mul_(scale) if overwrite_input and in_place else x * scale
    return conv_with_activation(scaled, conv, conv.weight, bias, shortcut=shortcut)


def _se_scale(se: SEModule, x: torch.Tensor) -> torch.Tensor:
    """``se.proj(x)`` [B, C, 1, 1]; its two 1x1 convolutions of the pooled [B, C, 1, 1] map run as matrix
    products of [B, C] rows (PyTorch sends such convolutions to its slow reference kernel at batch 1)."""
    layers = list(se.proj)
    if not (len(layers) == 5 and isinstance(layers[0], nn.AdaptiveAvgPool2d)
            and layers[0].output_size in (1, (1, 1)) and all(_pointwise_conv(m) for m in layers[1:4:2])
            and _is_activation(layers[2]) and _is_activation(layers[4])):
        return se.proj(x)
    pool, fc1, act, fc2, gate = layers
    pooled = pool(x).flatten(1)  # [B, C]
    hidden = act(F.linear(pooled, fc1.weight.flatten(1), fc1.bias))
    return gate(F.linear(hidden, fc2.weight.flatten(1), fc2.bias)).view(*pooled.shape, 1, 1)


def _frozen_bn(module: nn.Module | None) -> bool:
    return isinstance(module, nn.BatchNorm2d) and not module.training and module.running_var is not None


def _plain_conv(module: nn.Module | None) -> bool:
    return type(module) in (nn.Conv2d, ResDWConv) and module.padding_mode == "zeros"


def _pointwise_conv(module: nn.Module | None) -> bool:
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.padding == (0, 0)
            and module.stride == (1, 1) and module.groups == 1)


def _conv_kernel(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (conv.fused_weight(), conv.bias) if isinstance(conv, ResDWConv) else (conv.weight, conv.bias)


# A matched chain: how many children it covers, and how to run it on
# (x, x may be overwritten, shortcut to add or None, cache of folded kernels).
Step = tuple[int, Callable[..., torch.Tensor]]


def _cached(cache: dict | None, slot: int, sources: list[nn.Module], compute: Callable[[], tuple]) -> tuple:
    """``compute()`` (folded kernels), kept in ``cache[slot]`` while no parameter/buffer of ``sources``
    changes (same storage, same in-place version); always recomputed when autograd records. Cached values
    are normal tensors even under ``torch.inference_mode``. Weights changed through ``.data`` bypass the
    version counter: call ``enable_inference_fusion(model)`` again afterwards (it empties the caches)."""
    if cache is None or torch.is_grad_enabled():
        return compute()
    tensors = [t for m in sources for t in (*m.parameters(), *m.buffers())]
    key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
    hit = cache.get(slot)
    if hit is None or hit[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            hit = cache[slot] = (key, compute())
    return hit[1]


def _match(modules: list[nn.Module], i: int) -> Step | None:
    """The fusible chain starting at ``modules[i]``, or None."""
    first = modules[i]
    after = modules[i + 1:i + 3] + [None, None]
    if isinstance(first, GRN) and _pointwise_conv(after[0]):
        return 2, lambda x, temporary, shortcut, cache: grn_conv1x1(x, first, after[0], temporary, shortcut)
    if isinstance(first, SEModule) and i + 1 < len(modules):  # x * se(x), x overwritten when temporary
        def squeeze_excite(x, temporary, shortcut, cache):
            scale = _se_scale(first, x)
            return x.mul_(scale) if temporary and not torch.is_grad_enabled() else x * scale
        return 1, squeeze_excite
    if isinstance(first, DilatedReparamBlock) and first.merged and _frozen_bn(after[0]):
        def merged_block(x, temporary, shortcut, cache):
            kernel = _cached(cache, i, [first, after[0]], lambda: fuse_conv_bn(first.lk_origin, after[0]))
            conv = first.lk_origin
            if (_packable(x, kernel[0]) and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros"
                    and (os.environ.get(DWCONV_ENV_VAR, "") or "fast") == "fast"):
                out = packed_conv(x, conv, *kernel)
            else:
                out = depthwise_forward(conv, x, *kernel)
            return out + shortcut.value() if shortcut is not None else out
        return 2, merged_block
    if _plain_conv(first):
        conv, used, bn_before, bn_after = first, 1, None, None
        if _frozen_bn(after[0]):
            bn_after, used = after[0], 2
    elif _frozen_bn(first) and _pointwise_conv(after[0]):
        conv, used, bn_before, bn_after = after[0], 2, first, None
    else:
        return None
    following = modules[i + used] if i + used < len(modules) else None
    activation = following if following is not None and _is_activation(following) else None
    # a lone convolution inside the chain: nothing to fuse, but its kernel (a ResDWConv's identity-centred
    # one) is cached and run pre-packed where that applies

    def folded_kernel():
        if bn_before is not None:
            return fuse_bn_conv1x1(bn_before, conv)
        weight, bias = _conv_kernel(conv)
        return fuse_conv_bn(conv, bn_after, weight, bias) if bn_after is not None else (weight, bias)

    def conv_chain(x, temporary, shortcut, cache):
        weight, bias = _cached(cache, i, modules[i:i + used], folded_kernel)
        return conv_with_activation(x, conv, weight, bias, activation, shortcut)
    return used + (activation is not None), conv_chain


def run_fused(modules: list[nn.Module], x: torch.Tensor, shortcut: Shortcut | None = None,
              cache: dict | None = None) -> torch.Tensor:
    """``modules`` applied in order to ``x`` (eval mode), fusible chains as single passes; ``shortcut``, if
    given, added to the result (inside the last chain when it ends the list). ``cache``: a dict kept by the
    caller where folded kernels are reused between calls while the parameters do not change."""
    i, given = 0, x.untyped_storage().data_ptr()
    while i < len(modules):
        step = _match(modules, i)
        if step is None:
            x = modules[i](x)
            i += 1
            continue
        used, run = step
        last = i + used == len(modules)
        x = run(x, x.untyped_storage().data_ptr() != given, shortcut if last else None, cache)
        shortcut = None if last else shortcut
        i += used
    return x + shortcut.value() if shortcut is not None else x
