"""ContMix aggregation (``na2d_av``) as Triton kernels: the ``triton`` backend of ``overlock.models.contmix``.

Same function as the reference (``_gather_av``), same window rule (natten 0.17, see ``contmix``'s docstring);
called by the dispatcher with maps of at least ``K * dilation`` per axis (it pads smaller ones). Three
kernels over ``attn [N, H*W, Kh*Kw]`` and ``value [N, H*W, C]`` (contiguous), each program taking a block of
(image, pixel) rows (a block may span images):

* forward, one program per (row block, channel block): ``out[p] = sum_k attn[p, k] * value[src(p, k)]``,
  the window slots in order (k = 0, 1, ...);
* grad of attn, one program per row block:
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
    block_p = min(_next_pow2(n * pixels), 2048) if interpret else 64
    block_c = min(_next_pow2(channels), 128 if interpret else 32)
    block_p, block_c = BLOCK_OVERRIDE.get("p", block_p), BLOCK_OVERRIDE.get("c", block_c)
    acc = tl.float64 if value.dtype == torch.float64 else tl.float32
    common = dict(KH=kernel[0], KW=kernel[1], DH=dilation[0], DW=dilation[1], BLOCK_P=block_p,
                  BLOCK_C=block_c, ACC=acc)
    rows = n * pixels  # programs take blocks of (image, pixel) rows: a block may span images
    r_blocks, c_blocks = -(-rows // block_p), -(-channels // block_c)
    fn = _kernel(which, interpret)
    if which == "forward":
        out = torch.empty_like(value)
        fn[(r_blocks, c_blocks)](attn, value, out, rows, height, width, channels, **common)
    elif which == "grad_attn":
        out = torch.empty_like(attn)
        fn[(r_blocks,)](grad_out, value, out, rows, height, width, channels, **common)
    else:
        out = torch.empty_like(value)
        fn[(r_blocks, c_blocks)](attn, grad_out, out, rows, height, width, channels, **common)
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
    def forward_kernel(attn_ptr, value_ptr, out_ptr, R, H, W, C, KH: tl.constexpr, KW: tl.constexpr,
                       DH: tl.constexpr, DW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                       ACC: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # row = image * H * W + pixel
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        r_mask, c_mask = r < R, c < C
        image, p = r // (H * W), r % (H * W)
        i, j = p // W, p % W
        # window start per axis (natten 0.17): clamp inside the dilation group
        g_i, g_j = i % DH, j % DW
        len_i, len_j = (H - g_i + DH - 1) // DH, (W - g_j + DW - 1) // DW
        row0 = g_i + DH * tl.minimum(tl.maximum(i // DH - KH // 2, 0), tl.maximum(len_i - KH, 0))
        col0 = g_j + DW * tl.minimum(tl.maximum(j // DW - KW // 2, 0), tl.maximum(len_j - KW, 0))
        value_rows = value_ptr + image * (H * W * C)
        mask2 = r_mask[:, None] & c_mask[None, :]
        acc = tl.full((BLOCK_P, BLOCK_C), 0.0, ACC)
        for a in range(KH):
            for b in range(KW):
                src = (row0 + a * DH) * W + col0 + b * DW
                w = tl.load(attn_ptr + r * (KH * KW) + (a * KW + b), mask=r_mask, other=0.0).to(ACC)
                v = tl.load(value_rows[:, None] + src[:, None] * C + c[None, :], mask=mask2, other=0.0)
                acc += w[:, None] * v.to(ACC)
        tl.store(out_ptr + r[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask2)

    def grad_attn_kernel(grad_ptr, value_ptr, out_ptr, R, H, W, C, KH: tl.constexpr, KW: tl.constexpr,
                         DH: tl.constexpr, DW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                         ACC: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        r_mask = r < R
        image, p = r // (H * W), r % (H * W)
        i, j = p // W, p % W
        g_i, g_j = i % DH, j % DW
        len_i, len_j = (H - g_i + DH - 1) // DH, (W - g_j + DW - 1) // DW
        row0 = g_i + DH * tl.minimum(tl.maximum(i // DH - KH // 2, 0), tl.maximum(len_i - KH, 0))
        col0 = g_j + DW * tl.minimum(tl.maximum(j // DW - KW // 2, 0), tl.maximum(len_j - KW, 0))
        value_rows = value_ptr + image * (H * W * C)
        for a in range(KH):
            for b in range(KW):
                src = (row0 + a * DH) * W + col0 + b * DW
                acc = tl.full((BLOCK_P,), 0.0, ACC)
                for c0 in range(0, C, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    mask2 = r_mask[:, None] & (c < C)[None, :]
                    g = tl.load(grad_ptr + r[:, None] * C + c[None, :], mask=mask2, other=0.0)
                    v = tl.load(value_rows[:, None] + src[:, None] * C + c[None, :], mask=mask2, other=0.0)
                    acc += tl.reduce(g.to(ACC) * v.to(ACC), 1, tl.standard._sum_combine)
                out = out_ptr + r * (KH * KW) + (a * KW + b)
                tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=r_mask)

    def grad_value_kernel(attn_ptr, grad_ptr, out_ptr, R, H, W, C, KH: tl.constexpr, KW: tl.constexpr,
                          DH: tl.constexpr, DW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                          ACC: tl.constexpr):
        q = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # the source row being summed
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        q_mask, c_mask = q < R, c < C
        image_rows = (q // (H * W)) * (H * W)  # first row of q's image
        r, s = (q % (H * W)) // W, q % W
        acc = tl.full((BLOCK_P, BLOCK_C), 0.0, ACC)
        for u in range(2 * KH - 1):
            i = r + (u - (KH - 1)) * DH  # a candidate output row in q's dilation group
            ok_i = (i >= 0) & (i < H)
            i = tl.minimum(tl.maximum(i, 0), H - 1)
            g_i = i % DH
            len_i = (H - g_i + DH - 1) // DH
            row0 = g_i + DH * tl.minimum(tl.maximum(i // DH - KH // 2, 0), tl.maximum(len_i - KH, 0))
            a = (r - row0) // DH
            ok_i = ok_i & (r >= row0) & (a < KH) & q_mask
            for v in range(2 * KW - 1):
                j = s + (v - (KW - 1)) * DW
                ok = ok_i & (j >= 0) & (j < W)
                j = tl.minimum(tl.maximum(j, 0), W - 1)
                g_j = j % DW
                len_j = (W - g_j + DW - 1) // DW
                col0 = g_j + DW * tl.minimum(tl.maximum(j // DW - KW // 2, 0), tl.maximum(len_j - KW, 0))
                b = (s - col0) // DW
                ok = ok & (s >= col0) & (b < KW)
                p = image_rows + i * W + j
                k = tl.where(ok, a * KW + b, 0)
                w = tl.load(attn_ptr + p * (KH * KW) + k, mask=ok, other=0.0).to(ACC)
                g = tl.load(grad_ptr + p[:, None] * C + c[None, :], mask=ok[:, None] & c_mask[None, :],
                            other=0.0)
                acc += w[:, None] * g.to(ACC)
        tl.store(out_ptr + q[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=q_mask[:, None] & c_mask[None, :])

    _SOURCES = {"forward": forward_kernel, "grad_attn": grad_attn_kernel, "grad_value": grad_value_kernel}
