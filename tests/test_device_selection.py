"""Which implementation runs where: the CPU-only pieces (oneDNN fusion, ``fast_conv``) step aside on CUDA.

The choices are small functions of (device type, flags); the tables below pin them. Then the deploy model
runs on CPU tensors once with the CPU choices and once with the choices a CUDA tensor gets (the selection
functions told "cuda"): the same function, and the CPU really takes its fast paths.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from overlock.models import create_overlock, fast_conv, inference_fusion
from overlock.models.fast_conv import depthwise_forward, depthwise_path
from overlock.models.inference_fusion import fused_conv_path, gemm_in_place

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 32, 64, 96], sub_num_heads=[2, 2],
            num_classes=7)
FLAGS = list(itertools.product([False, True], repeat=2))


@pytest.mark.parametrize("tracing,geometry", FLAGS)
@pytest.mark.parametrize("backend", ["fast", "torch"])
def test_depthwise_path_table(backend, tracing, geometry):
    assert depthwise_path("cuda", backend, tracing, geometry) == "torch"  # cuDNN on a GPU, always
    expected = "fast" if backend == "fast" and geometry and not tracing else "torch"
    assert depthwise_path("cpu", backend, tracing, geometry) == expected


def test_depthwise_path_rejects_unknown_backend():
    with pytest.raises(ValueError, match="OVERLOCK_DWCONV_BACKEND.*valid: fast, torch"):
        depthwise_path("cuda", "cudnn", False, True)


@pytest.mark.parametrize("grad,onednn", FLAGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fused_conv_path_table(grad, onednn, dtype):
    assert fused_conv_path("cuda", grad, onednn, dtype) == "torch"
    from overlock.models.inference_fusion import _onednn_bf16_supported
    cpu_fusible = not grad and onednn and (dtype == torch.float32
                                           or (dtype == torch.bfloat16 and _onednn_bf16_supported()))
    assert fused_conv_path("cpu", grad, onednn, dtype) == ("onednn" if cpu_fusible else "torch")


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_gemm_in_place_only_without_autograd_and_autocast(device_type):
    assert gemm_in_place(device_type, grad_enabled=False, autocast_enabled=False)
    assert not gemm_in_place(device_type, grad_enabled=True, autocast_enabled=False)
    assert not gemm_in_place(device_type, grad_enabled=False, autocast_enabled=True)


def test_cpu_depthwise_takes_the_fast_formulation():
    conv = torch.nn.Conv2d(8, 8, 7, padding=3, groups=8)
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    out = depthwise_forward(conv, x)
    assert type(out.grad_fn).__name__ == "_DepthwiseConv2dBackward"
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)


def _as_if_on_cuda(monkeypatch, chosen: list):
    """Make the selection functions answer for a CUDA tensor (recording what the CPU would have chosen)."""
    real_conv, real_dw, real_gemm = fused_conv_path, depthwise_path, gemm_in_place

    def conv_path(device_type, *args):
        chosen.append(real_conv(device_type, *args))
        return real_conv("cuda", *args)

    def dw_path(device_type, *args):
        chosen.append(real_dw(device_type, *args))
        return real_dw("cuda", *args)
    monkeypatch.setattr(inference_fusion, "fused_conv_path", conv_path)
    monkeypatch.setattr(fast_conv, "depthwise_path", dw_path)
    monkeypatch.setattr(inference_fusion, "gemm_in_place", lambda _device, *args: real_gemm("cuda", *args))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_deploy_model_with_the_cuda_choices_computes_the_same(monkeypatch, trained_bn_stats, autocast):
    from overlock.models.inference_fusion import _onednn_bf16_supported
    if autocast and not _onednn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bf16 convolution (needs AVX512 bw/vl/dq or AVX-NE-CONVERT)")
    torch.manual_seed(0)
    model = trained_bn_stats(create_overlock("xt", **TINY)).eval().reparameterize(remove_aux_head=True)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else torch.no_grad
    with torch.no_grad(), context():
        cpu_out = model(x)
        chosen: list[str] = []
        _as_if_on_cuda(monkeypatch, chosen)
        cuda_path_out = model(x)
    assert "onednn" in chosen and "fast" in chosen  # on CPU tensors the fast paths are the ones chosen
    tol = 3e-2 if autocast else 1e-4
    error = (cuda_path_out.float() - cpu_out.float()).abs().max() / cpu_out.float().abs().max()
    assert error < tol


def test_torch_compile_under_cpu_autocast_leaves_depthwise_to_pytorch():
    """The fast path's fp32 detour under CPU autocast broke Dynamo ("Global autocast(cpu)_enabled state
    changed while dynamo tracing"): while compiling under autocast the plain convolution is traced."""
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(8, 8, 7, padding=3, groups=8)
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    compiled = torch.compile(lambda t: depthwise_forward(conv, t), backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad is not None
    assert depthwise_path("cpu", "fast", False, True) == "fast"  # eager CPU keeps the fast formulation
