"""Fused forms of small OverLoCK blocks (GRN, ResDWConv, LayerScale) equal their plain expressions.

The fused forms only change how the same function is computed (fewer passes over the tensors); these
tests compare values and gradients with the written-out expressions in float64, in both memory formats,
and check that jit tracing (what fvcore sees) still records the official structure.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from overlock.models.blocks import GRN, LayerScale, ResDWConv, _GRNFunction


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _plain_grn(x, gamma, beta):
    norm = torch.linalg.vector_norm(x, ord=2, dim=(-2, -1), keepdim=True)
    relative = norm / (norm.mean(dim=1, keepdim=True) + 1e-6)
    out = (gamma * relative + 1) * x
    return out + beta if beta is not None else out


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out.detach(), torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("use_bias", [True, False])
def test_grn_function_equals_the_plain_expression_with_a_zero_channel(channels_last, use_bias):
    gen = torch.Generator().manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64, generator=gen)
    x[1, 2] = 0  # a channel with zero norm: its gradient through the norm is taken as 0, like autograd's
    x = x.contiguous(memory_format=fmt)
    gamma = torch.randn(1, 6, 1, 1, dtype=torch.float64, generator=gen)
    beta = torch.randn(1, 6, 1, 1, dtype=torch.float64, generator=gen) if use_bias else None
    grad_out = torch.randn(3, 6, 5, 7, dtype=torch.float64, generator=gen).contiguous(memory_format=fmt)
    inputs = [x, gamma] + ([beta] if use_bias else [])

    def fused(x, gamma, beta=None):
        return _GRNFunction.apply(x, gamma, beta)

    def plain(x, gamma, beta=None):
        return _plain_grn(x, gamma, beta)

    out, grads = _grads(fused, inputs, grad_out)
    ref_out, ref_grads = _grads(plain, inputs, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_grn_function_passes_gradcheck():
    gen = torch.Generator().manual_seed(4)
    inputs = [torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=gen).requires_grad_(),
              torch.randn(1, 4, 1, 1, dtype=torch.float64, generator=gen).requires_grad_(),
              torch.randn(1, 4, 1, 1, dtype=torch.float64, generator=gen).requires_grad_()]
    assert torch.autograd.gradcheck(_GRNFunction.apply, inputs)


def test_res_dwconv_is_x_plus_conv_in_values_and_gradients():
    torch.manual_seed(0)
    layer = ResDWConv(5, 3).double()
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 5, 6, 7, dtype=torch.float64)

    def fused(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    def plain(x, weight, bias):
        return x + F.conv2d(x, weight, bias, padding=1, groups=5)

    out, grads = _grads(fused, [x, layer.weight, layer.bias], grad_out)
    ref_out, ref_grads = _grads(plain, [x, layer.weight, layer.bias], grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    before = layer.weight.detach().clone()
    layer(x)
    assert torch.equal(layer.weight, before)  # the identity is added to a copy, never to the parameter


def test_layer_scale_equals_its_grouped_convolution():
    torch.manual_seed(1)
    layer = LayerScale(6, init_value=0.5).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    conv = F.conv2d(x, layer.weight, layer.bias, groups=6)
    torch.testing.assert_close(layer(x), conv, rtol=0, atol=1e-12)


def test_jit_trace_records_the_official_structure():
    """fvcore counts what jit tracing records: the plain convolutions and expressions, not the fused forms."""
    torch.manual_seed(2)
    module = torch.nn.Sequential(ResDWConv(4, 3), GRN(4), LayerScale(4, 1.0)).eval()
    x = torch.randn(1, 4, 6, 6)
    traced = torch.jit.trace(module, (x,), check_trace=False)
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    assert kinds.count("aten::_convolution") == 2  # ResDWConv's conv and LayerScale's grouped 1x1 conv
    assert "aten::linalg_vector_norm" in kinds and "aten::addcmul" not in kinds
    torch.testing.assert_close(traced(x), module(x), rtol=1e-5, atol=1e-6)


TINY = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 32, 64, 96], sub_num_heads=[2, 2],
            num_classes=7)


def _tiny_with_trained_bn_stats(trained_bn_stats):
    from overlock.models import create_overlock

    torch.manual_seed(5)
    return trained_bn_stats(create_overlock("xt", **TINY).double()).eval()


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_reparameterize_folds_the_remaining_batchnorms_in_eval_with_the_same_outputs_and_state_dict(
        trained_bn_stats, forward_calls):
    from overlock.models.blocks import enable_inference_fusion

    model = _tiny_with_trained_bn_stats(trained_bn_stats)
    x = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    model.reparameterize(remove_aux_head=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded, folded_calls = forward_calls(model, x, _batchnorms(model))
    enable_inference_fusion(model, False)
    plain, plain_calls = forward_calls(model, x, _batchnorms(model))
    torch.testing.assert_close(folded, plain, rtol=0, atol=1e-12)
    assert plain_calls > 20 and folded_calls == 0  # every BN of the deploy model sits next to a conv
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_folding_is_off_in_training_mode_where_batchnorm_uses_batch_statistics(
        trained_bn_stats, forward_calls):
    model = _tiny_with_trained_bn_stats(trained_bn_stats).reparameterize()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model.train()
    out, calls = forward_calls(model, x, _batchnorms(model))
    assert calls > 20
    from overlock.models.blocks import enable_inference_fusion

    enable_inference_fusion(model, False)
    ref = model(x)
    torch.testing.assert_close(out["main"], ref["main"], rtol=0, atol=1e-12)
