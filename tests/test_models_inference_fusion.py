"""The deploy form's inference fusion (``overlock.models.inference_fusion``) in the precisions it runs in.

``reparameterize`` turns the fusion on: in eval mode, without autograd, on the CPU in float32/bfloat16,
conv -> BN -> activation chains run as oneDNN convolutions with post-ops, GRN scales move into the next 1x1
conv, residual shortcuts are added inside the last convolution/GEMM, and folded kernels are cached. These
tests compare the fused model with the same model with fusion off, check that the fused kernels really ran,
that inputs are never overwritten, that autograd and autocast still work, and that the kernel cache follows
weight updates.
"""
from __future__ import annotations

import copy

import pytest
import torch

from overlock.models import create_overlock, inference_fusion
from overlock.models.blocks import FusibleSequential, enable_inference_fusion

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Stage maps at 64 px: 16x16 (GRN -> fc2 as a GEMM with per-sample weights: out channels <= pixels) down to
# 2x2 (the GRN scale applied to the activations instead).
TINY = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 32, 64, 96], sub_num_heads=[2, 2],
            num_classes=7)


@pytest.fixture()
def deploy_model(trained_bn_stats):
    """Builds a reparameterized tiny OverLoCK whose BNs, GRNs and LayerScales are far from their identity
    init."""
    def build(seed: int = 5):
        torch.manual_seed(seed)
        model = trained_bn_stats(create_overlock("xt", **TINY))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("gamma", "beta")) or ".ls" in name or "_scale" in name:
                    p.uniform_(-0.5, 0.5)
        return model.eval().reparameterize(remove_aux_head=True)
    return build


def _unfused(model):
    return enable_inference_fusion(copy.deepcopy(model), False)


def _chain_activations(model):
    """The activation modules that sit directly in a ``FusibleSequential`` (fused as oneDNN post-ops)."""
    return [child for seq in model.modules() if isinstance(seq, FusibleSequential)
            for child in seq.children() if isinstance(child, (torch.nn.GELU, torch.nn.SiLU))]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("fused_add_min", [inference_fusion.MIN_FUSED_ADD_NUMEL, 0],
                         ids=["separate-add", "add-post-op"])
def test_fused_fp32_inference_equals_the_unfused_model_and_leaves_the_input_alone(
        channels_last, fused_add_min, monkeypatch, deploy_model, forward_calls):
    monkeypatch.setattr(inference_fusion, "MIN_FUSED_ADD_NUMEL", fused_add_min)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = deploy_model().to(memory_format=fmt)
    reference = _unfused(model)
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=fmt)
    x_before = x.clone()
    with torch.inference_mode():
        fused, fused_calls = forward_calls(model, x, _chain_activations(model))
        plain, plain_calls = forward_calls(reference, x, _chain_activations(reference))
        again = model(x)  # second call: folded kernels from the cache
    assert plain_calls > 10 and fused_calls == 0  # every chain activation ran as a oneDNN post-op
    scale = plain.abs().max()
    torch.testing.assert_close(fused / scale, plain / scale, rtol=0, atol=2e-5)
    assert torch.equal(again, fused)
    assert torch.equal(x, x_before)


def test_with_autograd_the_fused_model_falls_back_and_gives_the_same_input_gradient(deploy_model):
    """Grad-CAM/ERF run the deploy model in eval mode with gradients: no oneDNN-only op may be on the tape."""
    model = deploy_model()
    reference = _unfused(model)
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for m in (model, reference):
        xi = x.clone().requires_grad_()
        m(xi)[:, 3].sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_runs_fused_and_stays_close_to_the_unfused_model(deploy_model, forward_calls):
    from overlock.models.inference_fusion import _onednn_bf16_supported
    if not _onednn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bf16 convolution (needs AVX512 bw/vl/dq or AVX-NE-CONVERT)")
    model = deploy_model().to(memory_format=torch.channels_last)
    reference = _unfused(model)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused, fused_calls = forward_calls(model, x, _chain_activations(model))
        plain = reference(x)
    assert fused_calls == 0
    assert fused.dtype == plain.dtype
    error = (fused.float() - plain.float()).abs().max() / plain.float().abs().max()
    assert error < 3e-2  # bf16 round-off of two differently ordered computations


def test_cached_folded_kernels_follow_weight_updates(deploy_model):
    """load_state_dict and in-place updates bump the tensors' versions; the cache must not serve old kernels."""
    model = deploy_model(seed=5)
    other = deploy_model(seed=6)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model(x)  # fills the cache
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), _unfused(other)(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model.patch_embed1[1].running_var.mul_(4.0)  # a folded BN of the stem
        model.head[0].weight.mul_(0.5)  # a conv folded with its BN
    with torch.inference_mode():
        torch.testing.assert_close(model(x), _unfused(model)(x), rtol=1e-4, atol=1e-5)


def test_under_torch_compile_the_deploy_model_is_one_graph_and_left_to_the_compiler(deploy_model):
    """The fusion steps aside while compiling (inductor folds and fuses the plain graph itself): no graph
    breaks from its cache bookkeeping, and the compiled output equals the eager fused one."""
    model = deploy_model().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        eager, out = model(x), compiled(x)
    scale = eager.abs().max()
    torch.testing.assert_close(out / scale, eager / scale, rtol=0, atol=2e-5)


def _packed_stores(model):
    return [m.__dict__["_packed_weights"] for m in model.modules() if "_packed_weights" in m.__dict__]


def test_channels_last_fp32_inference_runs_on_prepacked_kernels_per_input_shape(deploy_model, monkeypatch):
    """channels_last float32 inference convolves with kernels reordered once per layer and input shape
    (``torch.ops.mkldnn._reorder_convolution_weight``): the same outputs as without packing, the packed
    kernels reused on the next call, at most ``MAX_PACKED_SHAPES`` shapes kept per layer, and a copy or a
    pickle of the model carries none of them."""
    import io

    model = deploy_model().to(memory_format=torch.channels_last)
    reference = _unfused(model)
    batches = [torch.randn(b, 3, 64, 64).contiguous(memory_format=torch.channels_last) for b in (1, 2, 3)]
    with torch.inference_mode():
        monkeypatch.setattr(inference_fusion, "PACK_WEIGHTS", False)
        unpacked = [model(x) for x in batches]
        assert not _packed_stores(model)
        monkeypatch.setattr(inference_fusion, "PACK_WEIGHTS", True)
        packed = [model(x) for x in batches]
        stores = _packed_stores(model)
        # every chain conv, merged large kernel and standalone ResDWConv of the tiny model
        assert len(stores) >= 30 and all(len(store) == 3 for store in stores)
        kept = {id(entry[2]) for store in stores for entry in store.values()}
        again = model(batches[0])
        assert {id(entry[2]) for store in stores for entry in store.values()} == kept  # reused, not re-packed
        plain = [reference(x) for x in batches]
    for p, u, r in zip(packed, unpacked, plain):
        scale = r.abs().max()
        torch.testing.assert_close(p / scale, u / scale, rtol=0, atol=2e-5)
        torch.testing.assert_close(p / scale, r / scale, rtol=0, atol=2e-5)
    assert torch.equal(again, packed[0])
    monkeypatch.setattr(inference_fusion, "MAX_PACKED_SHAPES", 2)
    with torch.inference_mode():
        model(torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    assert all(len(store) == 2 for store in _packed_stores(model))
    twin = copy.deepcopy(model)
    assert all(len(store) == 0 for store in _packed_stores(twin))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.inference_mode():
        for m in (twin, loaded):
            torch.testing.assert_close(m(batches[1]), packed[1], rtol=0, atol=1e-6)


def test_prepacked_kernels_follow_weight_updates(deploy_model):
    """A packed kernel is reused only while its source tensor is unchanged (same tensor, same in-place
    version): load_state_dict, in-place updates of a chain conv, a standalone ResDWConv and a position-bias
    table all show up in the next call."""
    model = deploy_model(seed=5).to(memory_format=torch.channels_last)
    other = deploy_model(seed=6)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)  # packs
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), _unfused(other)(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model.head[0].weight.mul_(0.5)  # a conv folded with its BN
        model.blocks1[0].dwconv.weight.mul_(1.5)  # a standalone ResDWConv
        model.sub_blocks3[0].rpb2.add_(0.25)  # a relative position bias table (cached per map size)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), _unfused(model)(x), rtol=1e-4, atol=1e-5)
