"""``compute.compile``: the training model compiles as one graph (custom autograd Functions included).

Inductor takes minutes on this CPU (benchmarks/RESULTS.md); the tests use the light ``aot_eager`` backend,
which traces the same graphs (Dynamo + AOTAutograd) without generating code.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from overlock.params import ParamsError, parse_params

TINY = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 32, 64, 96], sub_num_heads=[2, 2],
            num_classes=5)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_compute_compile_param_defaults_off_and_takes_only_booleans():
    assert parse_params({}).compute.compile is False
    assert parse_params({"compute": {"compile": True}}).compute.compile is True
    with pytest.raises(ParamsError, match="compile"):
        parse_params({"compute": {"compile": "sometimes"}})


def test_training_step_compiles_without_graph_breaks_and_matches_eager(monkeypatch):
    """fullgraph=True fails on any graph break: the fast depth-wise conv, GRN and ContMix Functions trace."""
    from overlock.models import create_overlock

    monkeypatch.setenv("OVERLOCK_CONTMIX_BACKEND", "fast")
    monkeypatch.setenv("OVERLOCK_DWCONV_BACKEND", "fast")
    torch.manual_seed(0)
    model = create_overlock("xt", **TINY).to(memory_format=torch.channels_last).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([1, 3])

    def loss_of(m):
        out = m(x)
        return F.cross_entropy(out["main"], y) + 0.4 * F.cross_entropy(out["aux"], y)

    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    eager_loss, compiled_loss = loss_of(model), loss_of(compiled)
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    # all gradients together (some are zero up to round-off, e.g. a BN bias right before another BN)
    pairs = [(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters()) if p.grad is not None]
    diff = torch.stack([(a - b).norm() for a, b in pairs]).norm()
    assert len(pairs) > 100 and diff / torch.stack([a.norm() for a, _ in pairs]).norm() < 1e-4
