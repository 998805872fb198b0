"""Model complexity: parameters, FLOPs (fvcore, multiply-adds) and throughput/latency.

fvcore counts one "flop" per multiply-add of the ops it knows (conv, matmul, linear, einsum, ...); ops it
has no handle for are skipped and listed in ``unsupported_ops``. OverLoCK's ContMix aggregation (the dynamic
neighbourhood weighted sum) is reported both ways: ``gflops`` leaves it out, as the official figures in
``published_results.json`` do, and ``gflops_with_contmix`` counts it (see :func:`count_flops`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time

import torch
from torch import nn

log = logging.getLogger(__name__)


def count_parameters(model: nn.Module, exclude_prefixes: tuple[str, ...] = ()) -> int:
    """Number of parameters (all of them, or without those under ``exclude_prefixes``, e.g. ``aux_head.``)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(exclude_prefixes))


@contextlib.contextmanager
def _traceable_contmix():
    """Run OverLoCK's ContMix with the ``gather`` reference backend (plain ops + einsum) so jit tracing works."""
    from overlock.backends import contmix_backend_override

    with contmix_backend_override("gather"):
        yield


def count_flops(model: nn.Module, input_size: int) -> dict:
    """fvcore multiply-adds (GFLOPs) of one ``input_size``² image, without and with the ContMix aggregation.

    ``gflops`` follows the official convention (ContMix aggregation not counted: the ``einsum`` share of
    the one trace is left out); ``gflops_with_contmix`` adds the aggregation's multiply-adds, counted as the
    einsum of the ``gather`` reference backend (``B*heads*H*W*K²*C``). For models without ContMix the two
    are equal.
    """
    from fvcore.nn import FlopCountAnalysis

    model = model.eval()
    x = torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device)
    analysis = FlopCountAnalysis(model, x)  # one trace serves both totals (tracing is most of the cost)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with torch.no_grad(), _traceable_contmix():
        by_op = analysis.by_operator()
        total = analysis.total()
    return {"gflops": (total - by_op.get("einsum", 0)) / 1e9, "gflops_with_contmix": total / 1e9,
            "unsupported_ops": dict(analysis.unsupported_ops())}


def reparameterized_copy(model: nn.Module) -> nn.Module | None:
    """An inference-form copy (OverLoCK: dilated branches merged, aux head removed); None for baselines."""
    if not callable(getattr(model, "reparameterize", None)):
        return None
    twin = copy.deepcopy(model).eval()
    try:
        twin.reparameterize(remove_aux_head=True)
    except TypeError:
        twin.reparameterize()
    return twin


@torch.no_grad()
def measure_speed(
    model: nn.Module,
    input_size: int,
    batch: int,
    iters: int,
    device: torch.device | str = "cpu",
    channels_last: bool = True,
    precision: str = "fp32",
) -> dict:
    """Throughput (img/s) at ``batch`` and latency (ms) at batch 1, median of ``iters`` timed runs each."""
    from overlock.compute import autocast, to_memory_format

    device = torch.device(device)
    model = model.eval().to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = to_memory_format(model, fmt)

    def timed(n: int) -> float:
        x = torch.randn(n, 3, input_size, input_size, device=device).to(memory_format=fmt)
        with autocast(precision, device):
            for _ in range(2):  # warm-up (allocator, oneDNN primitive cache)
                model(x)
            times = []
            for _ in range(iters):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    batch_time = timed(batch)
    return {
        "throughput": batch / batch_time,
        "latency_ms": 1000 * timed(1),
        "batch": batch,
        "input_size": input_size,
        "channels_last": channels_last,
        "iters": iters,
    }


def complexity_report(
    model: nn.Module,
    input_size: int,
    batch: int,
    iters: int,
    device="cpu",
    channels_last: bool = True,
    precision: str = "fp32",
) -> dict:
    """Params, FLOPs and speed of the train form and (when available) the re-parameterized form."""
    forms = {"train form": model.eval()}
    reparam = reparameterized_copy(model)
    if reparam is not None:
        forms["re-parameterized"] = reparam
    result = {
        "forms": {},
        "reparameterization": "available"
        if reparam is not None
        else "n/a (no re-parameterization for this architecture)",
    }
    for name, m in forms.items():
        flops = count_flops(m, input_size)
        result["forms"][name] = {
            "params": count_parameters(m),
            "params_no_aux": count_parameters(m, ("aux_head.",)),
            "gflops": flops["gflops"],
            "gflops_with_contmix": flops["gflops_with_contmix"],
            "unsupported_ops": flops["unsupported_ops"],
            "speed": measure_speed(m, input_size, batch, iters, device, channels_last, precision),
        }
        if channels_last:
            result["forms"][name]["speed_contiguous"] = measure_speed(
                m, input_size, batch, iters, device, False, precision
            )
    return result
