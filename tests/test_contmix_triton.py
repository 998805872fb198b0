"""The ``triton`` ContMix backend (``overlock.models.contmix_triton``) through Triton's CPU interpreter.

The interpreter runs every kernel program as numpy calls, so the shapes are tiny; the block-size override
makes them span several pixel and channel blocks, as the GPU's 64 x 32 blocks do at real sizes.
"""
from __future__ import annotations

import pytest
import torch

from overlock.models import contmix
from overlock.models.contmix import na2d_av

contmix_triton = pytest.importorskip("overlock.models.contmix_triton")
TRITON_ERROR = contmix_triton._import_triton().get("error")
pytestmark = [pytest.mark.skipif(TRITON_ERROR is not None, reason=f"triton unavailable: {TRITON_ERROR}"),
              pytest.mark.usefixtures("one_thread")]

from test_contmix import _inputs, naive_av  # noqa: E402  (the float64 reference of tests/test_contmix.py)

# (H, W, kernel, dilation, blocks): non-square, several pixel/channel blocks, dilation with unequal groups,
# per-axis kernels, a map smaller than the kernel (the dispatcher pads it) and one below kernel * dilation.
CASES = [
    (5, 7, 3, 1, {"p": 8, "c": 2}),
    (7, 10, 3, 2, {}),
    (6, 9, (3, 5), (2, 1), {"p": 16}),
    (3, 4, 5, 1, {}),
    (3, 8, 3, 2, {"c": 2}),
]


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv(contmix_triton.INTERPRET_ENV_VAR, "1")
    return monkeypatch


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-k{c[2]}-d{c[3]}-{c[4]}")
def test_triton_float64_matches_naive_loop(case, interpreter):
    height, width, kernel, dilation, blocks = case
    interpreter.setattr(contmix_triton, "BLOCK_OVERRIDE", blocks)
    attn, value, grad = _inputs(height, width, kernel, batch=1, heads=2, channels=3)
    out = na2d_av(attn, value, kernel, dilation, backend="triton")
    grad_attn, grad_value = torch.autograd.grad(out, (attn, value), grad)
    ref_out, ref_attn, ref_value = naive_av(attn, value, grad, kernel, dilation)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.detach(), ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_attn, ref_attn, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_value, ref_value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_triton_low_precision_within_stated_tolerance(dtype, tol, interpreter):
    attn64, value64, grad64 = _inputs(6, 7, 5, batch=1, heads=1, channels=4)
    attn64 = torch.softmax(attn64.detach(), dim=-1)
    ref_out, ref_attn, ref_value = naive_av(attn64, value64, grad64, 5, 1)
    attn = attn64.to(dtype).requires_grad_()
    value = value64.detach().to(dtype).requires_grad_()
    out = na2d_av(attn, value, 5, backend="triton")
    out.backward(grad64.to(dtype))
    assert out.dtype == attn.grad.dtype == value.grad.dtype == dtype
    for got, want in ((out, ref_out), (attn.grad, ref_attn), (value.grad, ref_value)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def test_triton_on_cpu_needs_the_interpreter_flag(monkeypatch):
    monkeypatch.delenv(contmix_triton.INTERPRET_ENV_VAR, raising=False)
    attn, value, _ = _inputs(5, 5, 3, batch=1, heads=1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*fast"):
        na2d_av(attn, value, 3, backend="triton")


def test_auto_never_picks_triton(interpreter, monkeypatch):
    """Opt-in only: ``auto`` (and the default) keep natten/fast even where triton could run."""
    monkeypatch.delenv(contmix.BACKEND_ENV_VAR, raising=False)
    value = torch.zeros(1, 1, 8, 8, 2)
    assert contmix._resolve_backend(None, value, (3, 3)) == "fast"
    assert contmix._resolve_backend("triton", value, (3, 3)) == "triton"
    monkeypatch.setenv(contmix.BACKEND_ENV_VAR, "triton")
    assert contmix._resolve_backend(None, value, (3, 3)) == "triton"
