"""Depth-wise convolution with a fast CPU backward for the kernels of ``DilatedReparamBlock``.

PyTorch's CPU kernels for depth-wise convolutions larger than 3x3 (17x17 at 56x56, and the 5x5, 7x7 and
dilated branches next to it) are slow in three places: the weight gradient (oneDNN's depth-wise
backward-weights kernel is a direct loop: 300 ms for 17x17 at 56x56, 8-25 ms for a 5x5-9x9 branch, in either
memory format), the input gradient of the dilated branches (3-8 ms where the forward takes 0.2-0.7 ms),
and, for contiguous (NCHW) tensors, the forward pass (the oneDNN kernel only runs for channels_last).
``depthwise_conv2d`` computes exactly the same function with other formulations:

* forward: the oneDNN channels_last convolution (tensors converted when needed; the output keeps the
  input's memory format). oneDNN's vectorised depth-wise kernel does not take dilated convolutions with a
  padding of 7 or more (9x9 dilation 2, 3x3 dilation 7); those get their zero padding explicitly first
  (28 ms -> 5 ms for 9x9 dilation 2 at 56x56);
* input gradient: the same forward convolution of the output gradient with the spatially flipped kernel;
* weight gradient: itself a depth-wise convolution, with the output gradient as the kernel:
  ``grad_w[c, i, j] = sum_b sum_{h,w} x_pad[b, c, h + i*d, w + j*d] * g[b, c, h, w]`` is, for every
  (b, c) pair as one channel, the correlation of the padded input with the H x W kernel ``g[b, c]`` at
  stride ``d``, a K x K output; summed over b. Exactly the multiply-adds of the direct sum, through
  oneDNN's vectorised depth-wise kernel (17x17 at 56x56: 25 ms instead of 300 ms).

Every formulation is a re-ordering of the same sums: float64 results equal PyTorch's to round-off
(``tests/test_fast_conv.py`` checks 1e-6 in float64 and fp32 to ~1e-5 relative). Only stride 1,
``groups == channels`` and symmetric zero padding are handled (what the model uses); ``use_fast_depthwise``
tells whether a call qualifies (3x3 kernels without dilation stay with PyTorch, whose kernels are fast
there). Off CPU the plain ``F.conv2d`` is used. Under CPU autocast, ``depthwise_forward`` runs these
convolutions in the weights' dtype (fp32): PyTorch's bf16 depth-wise kernels are slower than its fp32 ones
on CPU (measured in ``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["depthwise_conv2d", "depthwise_forward", "depthwise_path", "use_fast_depthwise", "DWCONV_ENV_VAR",
           "MIN_FAST_KERNEL"]

# Kernels spanning at least this many pixels (after dilation) take the fast path; 3x3 layers stay with
# PyTorch (its oneDNN 3x3 backward is as fast as the forward).
MIN_FAST_KERNEL = 5
# Dilated convolutions with at least this much padding miss oneDNN's vectorised depth-wise kernel
# (measured: 9x9 d2 and 3x3 d7 fall back to a ~6x slower path; 7x7 d2, 3x3 d5 and 17x17 d1 do not).
_PREPAD_MIN_PADDING = 7


def use_fast_depthwise(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether ``depthwise_conv2d`` handles this convolution (CPU, depth-wise, stride 1, 'same' padding,
    spanning at least ``MIN_FAST_KERNEL`` pixels)."""
    return x.device.type == "cpu" and _fast_geometry(x, weight, stride, padding, dilation, groups)


def depthwise_path(device_type: str, backend: str, tracing: bool, fast_geometry: bool) -> str:
    """'fast' (this module's oneDNN formulations: CPU only) or 'torch' (the layer's own convolution: cuDNN
    on CUDA, and what jit tracers/FLOP counters must see)."""
    if backend not in ("fast", "torch"):
        raise ValueError(f"unknown depth-wise conv backend {backend!r} (from ${DWCONV_ENV_VAR}); "
                         f"valid: fast, torch")
    if backend == "fast" and device_type == "cpu" and fast_geometry and not tracing:
        return "fast"
    return "torch"


def _fast_geometry(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    if x.dim() != 4 or groups != x.shape[1] or weight.shape[0] != groups:
        return False
    if weight.shape[1] != 1 or tuple(stride) != (1, 1) or isinstance(padding, str):
        return False
    kh, kw = weight.shape[2:]
    (ph, pw), (dh, dw) = tuple(padding), tuple(dilation)
    span_h, span_w = dh * (kh - 1), dw * (kw - 1)
    if not (kh == kw and ph == pw and dh == dw and span_h == 2 * ph and span_w == 2 * pw):
        return False
    return span_h + 1 >= MIN_FAST_KERNEL


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int,
                     dilation: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=C)`` with a fast CPU backward.

    ``weight`` [C, 1, K, K]; stride 1 and 'same' padding (``dilation * (K - 1) == 2 * padding``).
    """
    return _DepthwiseConv2d.apply(x, weight, bias, int(padding), int(dilation))


def _forward_cl(x: torch.Tensor, weight: torch.Tensor, bias, padding: int, dilation: int) -> torch.Tensor:
    """The convolution run in channels_last (oneDNN), returned in the memory format of ``x``."""
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    x_cl = x.contiguous(memory_format=torch.channels_last)
    if dilation > 1 and padding >= _PREPAD_MIN_PADDING:
        x_cl, padding = F.pad(x_cl, (padding,) * 4), 0  # keeps channels_last
    out = F.conv2d(x_cl, weight.contiguous(memory_format=torch.channels_last), bias,
                   padding=padding, dilation=dilation, groups=x.shape[1])
    return out.contiguous(memory_format=fmt)


def _weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel: int, padding: int, dilation: int) -> torch.Tensor:
    """grad_w[c, 0, i, j] = sum_{b,h,w} x_pad[b, c, h + i*d, w + j*d] * grad[b, c, h, w] (see module doc):
    a depth-wise convolution over the B*C (batch, channel) pairs with ``grad`` as the H x W kernels."""
    batch, channels, height, width = x.shape
    pairs = batch * channels
    # [1, B*C, H, W] in channels_last (memory [H, W, B, C]), the layout oneDNN's depth-wise kernel runs in
    image = x.permute(2, 3, 0, 1).reshape(1, height, width, pairs).permute(0, 3, 1, 2)
    kernels = grad.reshape(pairs, 1, height, width)
    out = F.conv2d(image, kernels, stride=dilation, padding=padding, groups=pairs)  # [1, B*C, K, K]
    return out.view(batch, channels, kernel, kernel).sum(0).unsqueeze(1)


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, weight, bias, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation, ctx.has_bias = padding, dilation, bias is not None
        return _forward_cl(x, weight, bias, padding, dilation)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(-1, -2)
            grad_x = _forward_cl(grad_out, flipped, None, ctx.padding, ctx.dilation).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(x, grad_out, weight.shape[-1], ctx.padding, ctx.dilation).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3)).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


DWCONV_ENV_VAR = "OVERLOCK_DWCONV_BACKEND"


def depthwise_forward(conv: torch.nn.Conv2d, x: torch.Tensor, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x)`` for a depth-wise ``nn.Conv2d``, through ``depthwise_conv2d`` when it qualifies.

    ``weight``/``bias`` replace the layer's own (e.g. with a BatchNorm folded in); both or neither.
    ``$OVERLOCK_DWCONV_BACKEND`` (read per call): ``fast`` (default) or ``torch`` (always ``conv(x)``).
    """
    if weight is None:
        weight, bias = conv.weight, conv.bias
    backend = os.environ.get(DWCONV_ENV_VAR, "") or "fast"
    geometry = conv.padding_mode == "zeros" and _fast_geometry(x, weight, conv.stride, conv.padding,
                                                                 conv.dilation, conv.groups)
    # jit tracers must see the plain conv; so must torch.compile under CPU autocast (its fp32 detour below
    # trips Dynamo's global-state check: "Global autocast(cpu)_enabled state changed while dynamo tracing")
    tracing = torch.jit.is_tracing() or torch.jit.is_scripting() or (
        torch.compiler.is_compiling() and torch.is_autocast_enabled("cpu"))
    if depthwise_path(x.device.type, backend, tracing, geometry) == "torch":
        return conv._conv_forward(x, weight, bias)  # also under jit tracing, so that fvcore & co. count it
    if torch.is_autocast_enabled("cpu"):
        # bf16 depth-wise kernels are slower than fp32 ones on CPU (no AMX/GEMM to gain): run them in the
        # weights' dtype, outside autocast (also the more accurate choice)
        with torch.autocast("cpu", enabled=False):
            return depthwise_forward(conv, x.to(weight.dtype), weight, bias)
    if not torch.is_grad_enabled():
        return _forward_cl(x, weight, bias, conv.padding[0], conv.dilation[0])
    return depthwise_conv2d(x, weight, bias, conv.padding[0], conv.dilation[0])
