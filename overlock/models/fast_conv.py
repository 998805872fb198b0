"""Depth-wise convolution with a fast CPU backward for the large kernels of ``DilatedReparamBlock``.

PyTorch's CPU kernels for a depth-wise convolution with a large kernel (17x17 at 56x56, and the dilated
branches next to it) are slow in two places: the weight gradient (seconds per layer: a direct loop, in
either memory format) and, for contiguous (NCHW) tensors, the forward pass (the oneDNN kernel only runs
for channels_last). ``depthwise_conv2d`` computes exactly the same function with other formulations:

* forward: the oneDNN convolution in channels_last (tensors converted when needed; the output keeps the
  input's memory format);
* input gradient: the same forward convolution of the output gradient with the spatially flipped kernel;
* weight gradient: one batched matrix product per chunk of channels. With the input padded and unfolded
  along the width only, ``U[c, (h', j), (b, w)] = x_pad[b, c, h', w + j*d]``, the product
  ``M = U @ g[c, (b, w), h]`` holds every needed sum, and ``grad_w[c, i, j] = sum_h M[c, (h + i*d, j), h]``
  (a strided diagonal of ``M``). It does ~4x the multiply-adds of the direct sum, in a GEMM.

Every formulation is a re-ordering of the same sums: float64 results equal PyTorch's to round-off
(``tests/test_fast_conv.py`` checks 1e-6 in float64 and fp32 to ~1e-5 relative). Only stride 1,
``groups == channels`` and symmetric zero padding are handled (what the model uses); ``use_fast_depthwise``
tells whether a call qualifies. Off CPU the plain ``F.conv2d`` is used. Under CPU autocast,
``depthwise_forward`` runs these convolutions in the weights' dtype (fp32): PyTorch's bf16 depth-wise
kernels are slower than its fp32 ones on CPU (measured in ``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["depthwise_conv2d", "depthwise_forward", "use_fast_depthwise", "DWCONV_ENV_VAR", "MIN_FAST_KERNEL",
           "MIN_FAST_KERNEL_CHANNELS_LAST"]

# Kernels at least this large (after dilation) take the fast path; 3x3 layers stay with PyTorch.
MIN_FAST_KERNEL = 5
# For channels_last inputs PyTorch's own (oneDNN) path is competitive up to ~9x9 (and for the dilated
# branches): only kernels of at least this many taps per side take the fast path (13x13: ~2x, 17x17: ~3x).
MIN_FAST_KERNEL_CHANNELS_LAST = 11
# Bound on the unfolded input per channel chunk of the weight gradient (elements).
_UNFOLD_BUDGET = 8 * 1024 * 1024


def use_fast_depthwise(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether ``depthwise_conv2d`` handles this convolution (CPU, depth-wise, stride 1, 'same' padding)."""
    if x.device.type != "cpu" or x.dim() != 4 or groups != x.shape[1] or weight.shape[0] != groups:
        return False
    if weight.shape[1] != 1 or tuple(stride) != (1, 1) or isinstance(padding, str):
        return False
    kh, kw = weight.shape[2:]
    (ph, pw), (dh, dw) = tuple(padding), tuple(dilation)
    span_h, span_w = dh * (kh - 1), dw * (kw - 1)
    if not (kh == kw and ph == pw and dh == dw and span_h == 2 * ph and span_w == 2 * pw):
        return False
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return kh >= MIN_FAST_KERNEL_CHANNELS_LAST  # oneDNN's own backward wins for the smaller kernels
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
    out = F.conv2d(x.contiguous(memory_format=torch.channels_last),
                   weight.contiguous(memory_format=torch.channels_last), bias,
                   padding=padding, dilation=dilation, groups=x.shape[1])
    return out.contiguous(memory_format=fmt)


def _weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel: int, padding: int, dilation: int) -> torch.Tensor:
    """grad_w[c, 0, i, j] = sum_{b,h,w} x_pad[b, c, h + i*d, w + j*d] * grad[b, c, h, w] (see module doc)."""
    batch, channels, height, width = x.shape
    x_pad = F.pad(x, (padding,) * 4)
    padded_h = height + 2 * padding
    per_channel = batch * padded_h * width * kernel
    chunk = max(1, min(channels, _UNFOLD_BUDGET // max(per_channel, 1)))
    out = []
    for c0 in range(0, channels, chunk):
        c1 = min(channels, c0 + chunk)
        xs = x_pad[:, c0:c1]  # [B, c, Hp, Wp]
        # [B, c, Hp, W, K] view: unfold along the width with the dilation as the step
        unfolded = xs.unfold(3, dilation * (kernel - 1) + 1, 1)[..., ::dilation]
        u = unfolded.permute(1, 2, 4, 0, 3).reshape(c1 - c0, padded_h * kernel, batch * width)
        g = grad[:, c0:c1].permute(1, 0, 3, 2).reshape(c1 - c0, batch * width, height)
        m = torch.bmm(u, g)  # [c, Hp*K, H]: m[c, h'*K + j, h]
        # strided diagonal: element (c, i, j, h) at h'= h + i*d -> offset (h + i*d)*K*H + j*H + h
        diag = m.as_strided((c1 - c0, kernel, kernel, height),
                            (m.stride(0), dilation * kernel * height, height, kernel * height + 1),
                            m.storage_offset())
        out.append(diag.sum(-1))
    return torch.cat(out, 0).unsqueeze(1)


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
            grad_w = _weight_grad(x.contiguous(), grad_out.contiguous(), weight.shape[-1], ctx.padding,
                                  ctx.dilation).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3)).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


DWCONV_ENV_VAR = "OVERLOCK_DWCONV_BACKEND"


def depthwise_forward(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a depth-wise ``nn.Conv2d``, through ``depthwise_conv2d`` when it qualifies.

    ``$OVERLOCK_DWCONV_BACKEND`` (read per call): ``fast`` (default) or ``torch`` (always ``conv(x)``).
    """
    backend = os.environ.get(DWCONV_ENV_VAR, "") or "fast"
    if backend not in ("fast", "torch"):
        raise ValueError(f"unknown depth-wise conv backend {backend!r} (from ${DWCONV_ENV_VAR}); "
                         f"valid: fast, torch")
    if backend != "fast" or torch.jit.is_tracing() or torch.jit.is_scripting() or conv.padding_mode != "zeros" \
            or not use_fast_depthwise(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups):
        return conv(x)  # also under jit tracing, so that fvcore & co. count the convolution
    if torch.is_autocast_enabled("cpu"):
        # bf16 depth-wise kernels are slower than fp32 ones on CPU (no AMX/GEMM to gain): run them in the
        # weights' dtype, outside autocast (also the more accurate choice)
        with torch.autocast("cpu", enabled=False):
            return depthwise_forward(conv, x.to(conv.weight.dtype))
    if not torch.is_grad_enabled():
        return _forward_cl(x, conv.weight, conv.bias, conv.padding[0], conv.dilation[0])
    return depthwise_conv2d(x, conv.weight, conv.bias, conv.padding[0], conv.dilation[0])
