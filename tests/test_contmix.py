"""ContMix aggregation (``overlock.models.contmix.na2d_av``): every backend against a naive float64 loop."""
from __future__ import annotations

import pytest
import torch

from overlock.models import contmix
from overlock.models.contmix import BACKEND_ENV_VAR, BACKENDS, na2d_av

NATTEN_ERROR = contmix._natten_error()
COMPUTE_BACKENDS = ["fast", "gather", "unfold", pytest.param("natten", marks=pytest.mark.skipif(
    NATTEN_ERROR is not None, reason=f"natten unavailable: {NATTEN_ERROR}"))]

# (H, W, kernel, dilation): square/non-square maps, OverLoCK's stage-3/4 shapes, dilation, per-axis kernels,
# and maps smaller than the window (natten 0.17 rejects those; see the module docstring for their meaning).
CASES = [
    (9, 11, 5, 1),
    (14, 14, 13, 1),  # OverLoCK-T stage 3 at 224 (large kernel): one whole-map tile
    (14, 14, 5, 1),  # stage 3, small kernel: tiled
    (7, 7, 7, 1),  # stage 4: every pixel shares one window
    (11, 16, 9, 1),
    (7, 10, 3, 2),
    (12, 17, (3, 5), (2, 1)),
    (5, 4, 7, 1),  # smaller than the kernel on both axes
    (3, 20, 5, 2),  # smaller than kernel * dilation on one axis
    (10, 6, 3, 3),  # dilation groups of unequal length, one axis short
]


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


def window_start(i: int, length: int, kernel: int, dilation: int) -> int:
    """natten 0.17's rule, written out: clamp the window inside the dilation group of ``i``."""
    group = i % dilation
    group_len = len(range(group, length, dilation))
    return group + dilation * min(max(i // dilation - kernel // 2, 0), max(group_len - kernel, 0))


def neighbour_table(height: int, width: int, kernel, dilation) -> torch.Tensor:
    """[H*W, Kh*Kw] flat source pixel of every window slot, -1 past the map edge (maps below the window)."""
    (kh, kw), (dh, dw) = _pair(kernel), _pair(dilation)
    table = []
    for i in range(height):
        r0 = window_start(i, height, kh, dh)
        for j in range(width):
            c0 = window_start(j, width, kw, dw)
            slots = []
            for a in range(kh):
                for b in range(kw):
                    r, c = r0 + a * dh, c0 + b * dw
                    slots.append(r * width + c if r < height and c < width else -1)
            table.append(slots)
    return torch.tensor(table)


def naive_av(attn, value, grad, kernel, dilation):
    """Output and both gradients in float64 from the neighbour table, one window slot at a time."""
    batch, heads, height, width, channels = value.shape
    table = neighbour_table(height, width, kernel, dilation)
    a = attn.detach().double().reshape(batch, heads, height * width, -1)
    v = value.detach().double().reshape(batch, heads, height * width, channels)
    g = grad.double().reshape(batch, heads, height * width, channels)
    out, grad_attn, grad_value = torch.zeros_like(g), torch.zeros_like(a), torch.zeros_like(v)
    for k in range(table.shape[1]):
        valid = table[:, k] >= 0
        pix, src = valid.nonzero()[:, 0], table[valid, k]
        out[:, :, pix] += a[:, :, pix, k, None] * v[:, :, src]
        grad_attn[:, :, pix, k] = (g[:, :, pix] * v[:, :, src]).sum(-1)
        grad_value.index_add_(2, src, a[:, :, pix, k, None] * g[:, :, pix])
    return out.view(value.shape), grad_attn.view(attn.shape), grad_value.view(value.shape)


def _inputs(height, width, kernel, batch=2, heads=2, channels=3, dtype=torch.float64, seed=0):
    kh, kw = _pair(kernel)
    gen = torch.Generator().manual_seed(seed)
    attn = torch.randn(batch, heads, height, width, kh * kw, generator=gen, dtype=dtype).requires_grad_()
    value = torch.randn(batch, heads, height, width, channels, generator=gen, dtype=dtype).requires_grad_()
    grad = torch.randn(batch, heads, height, width, channels, generator=gen, dtype=dtype)
    return attn, value, grad


@pytest.fixture(scope="module")
def references():
    """Naive output and gradients for every case, computed once."""
    out = {}
    for case in CASES:
        height, width, kernel, dilation = case
        attn, value, grad = _inputs(height, width, kernel)
        out[case] = naive_av(attn, value, grad, kernel, dilation)
    return out


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:2])) + f"-k{c[2]}-d{c[3]}")
def test_backend_matches_naive_loop(backend, case, references):
    height, width, kernel, dilation = case
    attn, value, grad = _inputs(height, width, kernel)
    out = na2d_av(attn, value, kernel, dilation, backend=backend)
    grad_attn, grad_value = torch.autograd.grad(out, (attn, value), grad)
    ref_out, ref_attn, ref_value = references[case]
    assert out.shape == value.shape and out.dtype == torch.float64
    torch.testing.assert_close(out.detach(), ref_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_attn, ref_attn, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_value, ref_value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", [(9, 11, 5, 1), (14, 14, 5, 1), (12, 17, (3, 5), (2, 1))])
def test_fast_every_tiling_matches_gather(case):
    """The shape-based tile choice must not matter: all tilings (whole map, uneven, padded) agree."""
    height, width, kernel, dilation = case
    (kh, kw), (dh, dw) = _pair(kernel), _pair(dilation)
    attn, value, grad = _inputs(height, width, kernel)
    ref = na2d_av(attn, value, kernel, dilation, backend="gather")
    ref_grads = torch.autograd.grad(ref, (attn, value), grad)
    for tile in [(height, width), (1, 1), (2, 3), (4, 4), (5, width), (height, 6), (7, 7)]:
        out = contmix._fast_av(attn, value, (kh, kw), (dh, dw), tile=tile)
        grads = torch.autograd.grad(out, (attn, value), grad)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-9, msg=f"tile {tile}")
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-9, msg=f"tile {tile}")


@pytest.mark.parametrize("case", [(4, 5, 3, 1, None), (5, 7, 3, 2, None), (5, 5, 5, 1, None),
                                  (6, 8, 3, 1, (2, 3)), (2, 4, 3, 1, None)])
def test_fast_custom_backward_gradcheck(case):
    """Custom backward vs finite differences: whole map, dilation, shared window, tiled+padded, small map."""
    height, width, kernel, dilation, tile = case
    attn, value, _ = _inputs(height, width, kernel, batch=1, heads=1, channels=2)
    if tile is None:
        fn = lambda a, v: na2d_av(a, v, kernel, dilation, backend="fast")  # noqa: E731
    else:
        fn = lambda a, v: contmix._fast_av(a, v, (kernel,) * 2, (dilation,) * 2, tile=tile)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (attn, value))
    if case[0] == 4:  # the backward is itself differentiable
        assert torch.autograd.gradgradcheck(fn, (attn, value))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("backend", ["fast", "gather"])
def test_low_precision_smoke(dtype, tol, backend):
    attn64, value64, grad64 = _inputs(14, 14, 13, channels=4)
    attn64 = torch.softmax(attn64.detach(), dim=-1)
    ref = na2d_av(attn64, value64.detach(), 13, backend="gather")
    attn = attn64.to(dtype).requires_grad_()
    value = value64.detach().to(dtype).requires_grad_()
    out = na2d_av(attn, value, 13, backend=backend)
    out.backward(grad64.to(dtype))
    assert out.dtype == dtype and attn.grad.dtype == dtype and value.grad.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["fast", "gather", "unfold"])
def test_index_caches_built_under_inference_mode_still_serve_autograd(backend):
    """A first call under torch.inference_mode (a throughput measurement) must not leave inference tensors
    in the shared index caches, which a later call with autograd (Grad-CAM, training) saves for backward."""
    contmix._INDEX_CACHE.clear()
    attn, value, grad = _inputs(8, 13, 5)
    with torch.inference_mode():
        na2d_av(attn.detach(), value.detach(), 5, backend=backend)
    out = na2d_av(attn, value, 5, backend=backend)
    out.backward(grad)
    assert attn.grad is not None and value.grad is not None


def test_attn_is_cast_to_value_dtype():
    attn, value, _ = _inputs(6, 6, 3)
    out = na2d_av(attn.detach().float(), value.detach(), 3, backend="fast")
    assert out.dtype == torch.float64


@pytest.mark.parametrize("case", [(9, 11, 5, 2), (5, 4, 7, 1)])
def test_torch_compile_aot_eager(case):
    height, width, kernel, dilation = case
    attn, value, grad = _inputs(height, width, kernel, batch=1)
    fn = lambda a, v: na2d_av(a, v, kernel, dilation, backend="fast")  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = compiled(attn, value)
    grads = torch.autograd.grad(out, (attn, value), grad)
    ref = fn(attn, value)
    ref_grads = torch.autograd.grad(ref, (attn, value), grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _spy(monkeypatch):
    called = []
    for name, impl in list(contmix._IMPLEMENTATIONS.items()):
        def spy(*args, _name=name, _impl=impl):
            called.append(_name)
            return _impl(*args)
        monkeypatch.setitem(contmix._IMPLEMENTATIONS, name, spy)
    return called


def test_env_var_selects_backend_and_keyword_overrides(monkeypatch):
    called = _spy(monkeypatch)
    attn, value, _ = _inputs(6, 6, 3)
    monkeypatch.setenv(BACKEND_ENV_VAR, "gather")
    na2d_av(attn, value, 3)
    monkeypatch.setenv(BACKEND_ENV_VAR, "unfold")
    na2d_av(attn, value, 3)
    na2d_av(attn, value, 3, backend="fast")
    monkeypatch.delenv(BACKEND_ENV_VAR)
    na2d_av(attn, value, 3)  # auto on CPU -> fast
    assert called == ["gather", "unfold", "fast", "fast"]


def test_unknown_backend_lists_valid_names(monkeypatch):
    attn, value, _ = _inputs(6, 6, 3)
    monkeypatch.setenv(BACKEND_ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="unknown ContMix backend 'cudnn'") as err:
        na2d_av(attn, value, 3)
    assert BACKEND_ENV_VAR in str(err.value) and all(name in str(err.value) for name in BACKENDS)
    with pytest.raises(ValueError, match="valid backends: auto, fast, gather, unfold, natten"):
        na2d_av(attn, value, 3, backend="nope")


def test_forced_natten_without_natten_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(contmix, "_NATTEN", {"error": "natten is not installed"})
    attn, value, _ = _inputs(6, 6, 3)
    with pytest.raises(RuntimeError, match="'natten' is unavailable: natten is not installed"):
        na2d_av(attn, value, 3, backend="natten")
    assert contmix._resolve_backend("auto", value, (3, 3)) == "fast"


def test_auto_prefers_natten_only_on_cuda(monkeypatch):
    monkeypatch.setattr(contmix, "_NATTEN", {"error": None, "na2d_av": None})
    _, value, _ = _inputs(6, 6, 3)
    assert contmix._resolve_backend(None, value, (3, 3)) == "fast"

    class FakeCuda:
        is_cuda = True
    assert contmix._resolve_backend(None, FakeCuda(), (3, 3)) == "natten"
    assert contmix._resolve_backend(None, FakeCuda(), (1, 1)) == "fast"  # natten 0.17 needs kernel > 1


def test_argument_errors():
    attn, value, _ = _inputs(6, 6, 3)
    with pytest.raises(ValueError, match="odd"):
        na2d_av(attn, value, 4)
    with pytest.raises(ValueError, match="does not match"):
        na2d_av(attn, value, 5)
    with pytest.raises(ValueError, match="positive"):
        na2d_av(attn, value, 3, dilation=0)


@pytest.mark.parametrize("backend", ["fast", "gather"])
def test_bf16_autocast_forward_backward(backend):
    """Under CPU bf16 autocast (compute.precision=bf16) both operands run in bf16 and backward works."""
    attn = torch.randn(2, 4, 9, 11, 25).softmax(-1).requires_grad_()
    value = torch.randn(2, 4, 9, 11, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = na2d_av(attn, value, 5, backend=backend)
    out.float().sum().backward()
    ref = na2d_av(attn.detach().double(), value.detach().double(), 5, backend="gather")
    assert out.dtype == torch.bfloat16 and value.grad.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=0.1, rtol=0.05)
