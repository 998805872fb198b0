"""The fast depth-wise convolution (overlock/models/fast_conv.py) equals F.conv2d: values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from overlock.models.blocks import DilatedReparamBlock
from overlock.models.fast_conv import DWCONV_ENV_VAR, depthwise_conv2d, depthwise_forward, use_fast_depthwise


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _reference(x, w, b, padding, dilation, grad):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    out = F.conv2d(x, w, b, padding=padding, dilation=dilation, groups=x.shape[1])
    grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], grad)
    return out, grads


def _fast(x, w, b, padding, dilation, grad):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    out = depthwise_conv2d(x, w, b, padding, dilation)
    grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], grad)
    return out, grads


# (kernel, dilation, map h, map w, bias): UniRepLKNet branches, non-square maps, maps smaller than the kernel
CASES = [(17, 1, 12, 10, False), (9, 2, 11, 13, True), (3, 7, 9, 9, False), (13, 1, 5, 6, True),
         (5, 1, 8, 7, True), (3, 5, 4, 4, False)]


@pytest.mark.parametrize("kernel,dilation,height,width,bias", CASES)
def test_float64_values_and_gradients_equal_conv2d(kernel, dilation, height, width, bias):
    gen = torch.Generator().manual_seed(kernel * 100 + dilation)
    channels, pad = 5, dilation * (kernel - 1) // 2
    x = torch.randn(3, channels, height, width, dtype=torch.float64, generator=gen)
    w = torch.randn(channels, 1, kernel, kernel, dtype=torch.float64, generator=gen)
    b = torch.randn(channels, dtype=torch.float64, generator=gen) if bias else None
    grad = torch.randn(3, channels, height, width, dtype=torch.float64, generator=gen)
    ref_out, ref_grads = _reference(x, w, b, pad, dilation, grad)
    out, grads = _fast(x, w, b, pad, dilation, grad)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_matches_to_1e5_relative_and_keeps_the_memory_format(channels_last):
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 20, 20, generator=gen).contiguous(memory_format=fmt)
    w = torch.randn(8, 1, 17, 17, generator=gen)
    grad = torch.randn(2, 8, 20, 20, generator=gen).contiguous(memory_format=fmt)
    ref_out, ref_grads = _reference(x, w, None, 8, 1, grad)
    out, grads = _fast(x, w, None, 8, 1, grad)
    assert out.is_contiguous(memory_format=fmt)
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_bf16_autocast_runs_and_returns_float32_gradients():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=gen, requires_grad=True)
    w = torch.randn(4, 1, 9, 9, generator=gen, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv2d(x, w, b, 8, 2)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    ref = F.conv2d(x.detach(), w.detach(), padding=8, dilation=2, groups=4)
    ref_w = torch.autograd.grad(F.conv2d(x.detach(), w, padding=8, dilation=2, groups=4).square().sum(), w)[0]
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 3e-2
    assert ((w.grad - ref_w).abs().max() / ref_w.abs().max()).item() < 5e-2


def test_only_stride1_same_padding_depthwise_large_kernels_qualify():
    x = torch.zeros(1, 4, 8, 8)
    w = torch.zeros(4, 1, 7, 7)
    assert use_fast_depthwise(x, w, (1, 1), (3, 3), (1, 1), 4)
    assert not use_fast_depthwise(x, w, (2, 2), (3, 3), (1, 1), 4)  # strided
    assert not use_fast_depthwise(x, w, (1, 1), (2, 2), (1, 1), 4)  # not 'same'
    assert not use_fast_depthwise(x, torch.zeros(4, 2, 7, 7), (1, 1), (3, 3), (1, 1), 2)  # not depth-wise
    assert not use_fast_depthwise(x, torch.zeros(4, 1, 3, 3), (1, 1), (1, 1), (1, 1), 4)  # 3x3 stays with torch


def test_dilated_reparam_block_same_with_either_backend(monkeypatch):
    torch.manual_seed(0)
    block = DilatedReparamBlock(6, 13).double().train()
    x = torch.randn(2, 6, 14, 14, dtype=torch.float64)

    def run(backend):
        monkeypatch.setenv(DWCONV_ENV_VAR, backend)
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out = block(xi)
        out.square().sum().backward()
        return out.detach(), xi.grad, [p.grad.clone() for p in block.parameters()]

    out_t, gx_t, gp_t = run("torch")
    out_f, gx_f, gp_f = run("fast")
    torch.testing.assert_close(out_f, out_t, rtol=0, atol=1e-9)
    torch.testing.assert_close(gx_f, gx_t, rtol=0, atol=1e-9)
    for a, b in zip(gp_f, gp_t):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_unknown_backend_is_rejected_with_the_valid_names(monkeypatch):
    monkeypatch.setenv(DWCONV_ENV_VAR, "winograd")
    conv = nn.Conv2d(4, 4, 7, padding=3, groups=4)
    with pytest.raises(ValueError, match="fast, torch"):
        depthwise_forward(conv, torch.zeros(1, 4, 8, 8))


def test_under_cpu_autocast_large_depthwise_convs_run_in_float32(monkeypatch):
    monkeypatch.setenv(DWCONV_ENV_VAR, "fast")
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 17, padding=8, groups=4)
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_forward(conv, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert x.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32


def test_every_depthwise_kernel_but_3x3_takes_the_fast_path_in_either_layout():
    for fmt in (torch.channels_last, torch.contiguous_format):
        x = torch.zeros(1, 4, 8, 8).contiguous(memory_format=fmt)
        assert use_fast_depthwise(x, torch.zeros(4, 1, 13, 13), (1, 1), (6, 6), (1, 1), 4)
        assert use_fast_depthwise(x, torch.zeros(4, 1, 9, 9), (1, 1), (8, 8), (2, 2), 4)
        assert use_fast_depthwise(x, torch.zeros(4, 1, 5, 5), (1, 1), (2, 2), (1, 1), 4)
        assert use_fast_depthwise(x, torch.zeros(4, 1, 3, 3), (1, 1), (2, 2), (2, 2), 4)  # dilated 3x3
        assert not use_fast_depthwise(x, torch.zeros(4, 1, 3, 3), (1, 1), (1, 1), (1, 1), 4)


@pytest.mark.parametrize("kernel,dilation", [(9, 2), (3, 7), (7, 1)])
def test_float32_channels_last_branches_match_including_explicitly_padded_ones(kernel, dilation):
    """Dilated kernels with padding >= 7 are padded before oneDNN runs them (forward and input grad)."""
    gen = torch.Generator().manual_seed(kernel + dilation)
    pad = dilation * (kernel - 1) // 2
    x = torch.randn(2, 6, 18, 16, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 1, kernel, kernel, generator=gen)
    b = torch.randn(6, generator=gen)
    grad = torch.randn(2, 6, 18, 16, generator=gen).contiguous(memory_format=torch.channels_last)
    ref_out, ref_grads = _reference(x.double(), w.double(), b.double(), pad, dilation, grad.double())
    out, grads = _fast(x, w, b, pad, dilation, grad)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5
