"""ContMix aggregation (``na2d_av``) as Triton kernels: the ``triton`` backend of ``overlock.models.contmix``.

Same function as the reference (``_gather_av``), same window rule (natten 0.17, see ``contmix``'s docstring);
called by the dispatcher with maps of at least ``K * dilation`` per axis (it pads smaller ones). Three
kernels over ``attn [N, H*W, Kh*Kw]`` and ``value [N, H*W, C]`` (contiguous):

* forward, one program per (pixel block, n, channel block): ``out[p] = sum_k attn[p, k] * value[src(p, k)]``,
  the window slots in order (k = 0, 1, ...);
* grad of attn, one program per (pixel block, n):
  ``grad_attn[p, k] = sum_c grad_out[p, c] * value[src(p, k), c]``;
* grad of value without atomics (deterministic): for every source pixel ``q`` the kernel visits the
  ``(2Kh - 1) x (2Kw - 1)`` pixels of its dilation group around it (a window clamped at the border reaches at
  most ``K - 1`` group positions away), keeps those whose window holds ``q`` and at which slot, and sums
  ``attn[p, slot] * grad_out[p]``. About ``4x`` the forward's loads (masked); see README (why not default).

Accumulation is in float32 for fp16/bf16/fp32 inputs and in float64 for float64 inputs, results cast back
to the input dtype. Tolerances against the float64 reference (``tests/test_contmix_triton.py``): float64
1e-12, fp32 1e-5, bf16 3e-2 (relative to unit-scale values, as for the ``fast`` backend).

CUDA tensors run compiled kernels. CPU tensors run Triton's interpreter (numpy, slow: tests at tiny shapes
only), and only when ``TRITON_INTERPRET=1`` is set, so that nobody trains on it by accident.
"""
from __future__ import annotations

import os

import torch

__all__ = ["triton_av", "triton_error", "INTERPRET_ENV_VAR"]

INTERPRET_ENV_VAR = "TRITON_INTERPRET"

_TRITON: dict = {}


def triton_error(device: torch.device | str | None = None) -> str | None:
    """Why the Triton backend cannot run on ``device`` (None when it can)."""
    if not _TRITON:
        _TRITON.update(_import_triton())
    if _TRITON.get("error"):
        return _TRITON["error"]
    device_type = torch.device(device).type if device is not None else "cuda"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is visible"
    if device_type == "cpu":
        if os.environ.get(INTERPRET_ENV_VAR, "") in ("1", "true", "True"):
            return None
        return (f"CPU tensors run the Triton interpreter only with {INTERPRET_ENV_VAR}=1 "
                "(slow: for tests); use the 'fast' backend on CPU")
    return f"Triton kernels do not run on {device_type} tensors"


def _import_triton() -> dict:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # CPU-only wheels ship without triton
        return {"error": f"importing triton failed: {type(exc).__name__}: {exc}"}
    return {"error": None}


def triton_av(attn: torch.Tensor, value: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int]):
    """attn [B, heads, H, W, Kh*Kw], value [B, heads, H, W, C] (same dtype, H >= Kh*dh, W >= Kw*dw)."""
    error = triton_error(value.device)
    if error is not None:
        raise RuntimeError(f"ContMix backend 'triton' is unavailable: {error}")
    batch, heads, height, width, channels = value.shape
    n = batch * heads
    out = _TritonAV.apply(attn.reshape(n, height * width, -1), value.reshape(n, height * width, channels),
                          height, width, tuple(kernel), tuple(dilation))
    return out.view(batch, heads, height, width, channels)


class _TritonAV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn, value, height, width, kernel, dilation):
        attn, value = attn.contiguous(), value.contiguous()
        ctx.save_for_backward(attn, value)
        ctx.geometry = (height, width, kernel, dilation)
        return _launch("forward", attn, value, None, height, width, kernel, dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        attn, value = ctx.saved_tensors
        grad_out = grad_out.to(value.dtype).contiguous()
        grad_attn = grad_value = None
        if ctx.needs_input_grad[0]:
            grad_attn = _launch("grad_attn", attn, value, grad_out, *ctx.geometry)
        if ctx.needs_input_grad[1]:
            grad_value = _launch("grad_value", attn, value, grad_out, *ctx.geometry)
        return grad_attn, grad_value, None, None, None, None


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _launch(which, attn, value, grad_out, height, width, kernel, dilation):
    import triton.language as tl
    n, pixels, channels = value.shape
    interpret = value.device.type == "cpu"
    # the interpreter runs each program as numpy calls: few big programs; a GPU wants many small ones
    block_p = min(_next_pow2(pixels), 256) if interpret else 64
    block_c = min(_next_pow2(channels), 128 if interpret else 32)
    block_p, block_c = BLOCK_OVERRIDE.get("p", block_p), BLOCK_OVERRIDE.get("c", block_c)
    acc = tl.float64 if value.dtype == torch.float64 else tl.float32
    common = dict(KH=kernel[0], KW=kernel[1], DH=dilation[0], DW=dilation[1], BLOCK_P=block_p,
                  BLOCK_C=block_c, ACC=acc)
    p_blocks, c_blocks = -(-pixels // block_p), -(-channels // block_c)
    fn = _kernel(which, interpret)
    if which == "forward":
        out = torch.empty_like(value)
        fn[(p_blocks, n, c_blocks)](attn, value, out, height, width, channels, **common)
    elif which == "grad_attn":
        out = torch.empty_like(attn)
        fn[(p_blocks, n)](grad_out, value, out, height, width, channels, **common)
    else:
        out = torch.empty_like(value)
        fn[(p_blocks, n, c_blocks)](attn, grad_out, out, height, width, channels, **common)
    return out


_KERNELS: dict = {}
# tests: {"p": pixels, "c": channels} per program (powers of two), to cover several blocks at tiny shapes
BLOCK_OVERRIDE: dict = {}


def _kernel(which: str, interpret: bool):
    """The kernel compiled for CUDA (``triton.jit``) or wrapped for the interpreter (CPU tensors)."""
    key = (which, interpret)
    if key not in _KERNELS:
        import triton
        from triton.runtime.interpreter import InterpretedFunction
        fn = _SOURCES[which]
        _KERNELS[key] = InterpretedFunction(fn) if interpret else triton.jit(fn)
    return _KERNELS[key]


# The kernels, defined where triton imports (``_kernel`` wraps them for CUDA or the interpreter).
try:
    import triton.language as tl
except Exception:  # CPU-only wheels ship without triton; triton_error() says so
    tl = None

# Only core builtins (no ``tl.zeros``/``tl.sum``, themselves jit functions): the interpreter then runs these
# kernels whether or not TRITON_INTERPRET was set when triton was imported.
if tl is not None:
    def forward_kernel(attn_ptr, value_ptr, out_ptr, H, W, C, KH: tl.constexpr, KW: tl.constexpr,
                       DH: tl.constexpr, DW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                       ACC: tl.constexpr):
        n = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        p_mask, c_mask = p < H * W, c < C
        i, j = p // W, p % W
        # window start per axis (natten 0.17): clamp inside the dilation group
        g_i, g_j = i % DH, j % DW
        len_i, len_j = (H - g_i + DH - 1) // DH, (W - g_j + DW - 1) // DW
        row0 = g_i + DH * tl.minimum(tl.maximum(i // DH - KH // 2, 0), tl.maximum(len_i - KH, 0))
        col0 = g_j + DW * tl.minimum(tl.maximum(j // DW - KW // 2, 0), tl.maximum(len_j - KW, 0))
        attn_base = attn_ptr + n * H * W * (KH * KW) + p * (KH * KW)
        value_base = value_ptr + n * H * W * C
        mask2 = p_mask[:, None] & c_mask[None, :]
        acc = tl.full((BLOCK_P, BLOCK_C), 0.0, ACC)
        for a in range(KH):
            for b in range(KW):
                src = (row0 + a * DH) * W + col0 + b * DW
                w = tl.load(attn_base + (a * KW + b), mask=p_mask, other=0.0).to(ACC)
                v = tl.load(value_base + src[:, None] * C + c[None, :], mask=mask2, other=0.0).to(ACC)
                acc += w[:, None] * v
        out = out_ptr + n * H * W * C + p[:, None] * C + c[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask2)

    def grad_attn_kernel(grad_ptr, value_ptr, out_ptr, H, W, C, KH: tl.constexpr, KW: tl.constexpr,
                         DH: tl.constexpr, DW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                         ACC: tl.constexpr):
        n = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < H * W
        i, j = p // W, p % W
        g_i, g_j = i % DH, j % DW
        len_i, len_j = (H - g_i + DH - 1) // DH, (W - g_j + DW - 1) // DW
        row0 = g_i + DH * tl.minimum(tl.maximum(i // DH - KH // 2, 0), tl.maximum(len_i - KH, 0))
        col0 = g_j + DW * tl.minimum(tl.maximum(j // DW - KW // 2, 0), tl.maximum(len_j - KW, 0))
        base = n * H * W * C
        out_base = out_ptr + n * H * W * (KH * KW) + p * (KH * KW)
        for a in range(KH):
            for b in range(KW):
                src = (row0 + a * DH) * W + col0 + b * DW
                acc = tl.full((BLOCK_P,), 0.0, ACC)
                for c0 in range(0, C, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    mask2 = p_mask[:, None] & (c < C)[None, :]
                    g = tl.load(grad_ptr + base + p[:, None] * C + c[None, :], mask=mask2, other=0.0)
                    v = tl.load(value_ptr + base + src[:, None] * C + c[None, :], mask=mask2, other=0.0)
                    g, v = g.to(ACC), v.to(ACC)
                    acc += tl.reduce(g * v, 1, tl.standard._sum_combine)
                tl.store(out_base + (a * KW + b), acc.to(out_ptr.dtype.element_ty), mask=p_mask)

    def grad_value_kernel(attn_ptr, grad_ptr, out_ptr, H, W, C, KH: tl.constexpr, KW: tl.constexpr,
                          DH: tl.constexpr, DW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                          ACC: tl.constexpr):
        n = tl.program_id(1).to(tl.int64)
        q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # the source pixel whose gradient is summed
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        q_mask, c_mask = q < H * W, c < C
        r, s = q // W, q % W
        attn_base = attn_ptr + n * H * W * (KH * KW)
        grad_base = grad_ptr + n * H * W * C
        acc = tl.full((BLOCK_P, BLOCK_C), 0.0, ACC)
        for u in range(2 * KH - 1):
            i = r + (u - (KH - 1)) * DH  # a candidate output row in q's dilation group
            ok_i = (i >= 0) & (i < H)
            i = tl.minimum(tl.maximum(i, 0), H - 1)
            g_i = i % DH
            len_i = (H - g_i + DH - 1) // DH
            row0 = g_i + DH * tl.minimum(tl.maximum(i // DH - KH // 2, 0), tl.maximum(len_i - KH, 0))
            a = (r - row0) // DH
            ok_i = ok_i & (r >= row0) & (a < KH)
            for v in range(2 * KW - 1):
                j = s + (v - (KW - 1)) * DW
                ok = ok_i & (j >= 0) & (j < W)
                j = tl.minimum(tl.maximum(j, 0), W - 1)
                g_j = j % DW
                len_j = (W - g_j + DW - 1) // DW
                col0 = g_j + DW * tl.minimum(tl.maximum(j // DW - KW // 2, 0), tl.maximum(len_j - KW, 0))
                b = (s - col0) // DW
                ok = ok & (s >= col0) & (b < KW) & q_mask
                p = i * W + j
                k = tl.where(ok, a * KW + b, 0)
                w = tl.load(attn_base + p * (KH * KW) + k, mask=ok, other=0.0).to(ACC)
                g = tl.load(grad_base + p[:, None] * C + c[None, :], mask=ok[:, None] & c_mask[None, :],
                            other=0.0).to(ACC)
                acc += w[:, None] * g
        out = out_ptr + n * H * W * C + q[:, None] * C + c[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & c_mask[None, :])

    _SOURCES = {"forward": forward_kernel, "grad_attn": grad_attn_kernel, "grad_value": grad_value_kernel}
