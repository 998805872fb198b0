"""DDP over a channels_last OverLoCK without "Grad strides do not match bucket view strides" (two CPU
processes, gloo): ``overlock.training.ddp.align_grad_strides`` hooked, the warning is gone; the same run
without it (second, since PyTorch warns once per process) shows the warning, so the check can fail."""
from __future__ import annotations

import json
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from overlock.training.ddp import align_grad_strides, same_memory_layout

TINY = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 32, 64, 96], sub_num_heads=[2, 2],
            num_classes=5)
MESSAGE = "Grad strides do not match bucket view strides"


def _steps(aligned: bool) -> dict:
    from overlock.compute import to_memory_format
    from overlock.models import create_overlock
    torch.manual_seed(0)
    model = to_memory_format(create_overlock("xt", **TINY).train(), torch.channels_last)
    hooked = align_grad_strides(model) if aligned else 0
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([1, 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = ddp(x)
            ce = torch.nn.functional.cross_entropy
            loss = ce(out["main"], y) + ce(out["aux"], y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    mismatched = [n for n, p in model.named_parameters()
                  if p.grad is not None and p.grad.stride() != p.stride()]
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    return {"warnings": [str(w.message) for w in caught if MESSAGE in str(w.message)], "hooked": hooked,
            "mismatched": mismatched, "checksum": checksum}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = {"aligned": _steps(True), "plain": _steps(False)}  # aligned first: the warning fires once
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_same_memory_layout():
    assert same_memory_layout((420, 1008, 1, 1), (1008, 1, 1, 1), (1008, 1, 1008, 1008))
    assert same_memory_layout((96, 1, 3, 3), (9, 9, 3, 1), (9, 1, 3, 1))
    assert not same_memory_layout((8, 4, 3, 3), (36, 9, 3, 1), (36, 1, 12, 4))  # real NCHW vs NHWC


@pytest.mark.slow
def test_ddp_channels_last_without_grad_stride_copies(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        aligned, plain = result["aligned"], result["plain"]
        assert aligned["hooked"] > 0
        assert aligned["warnings"] == [] and aligned["mismatched"] == []
        assert plain["warnings"] and plain["mismatched"]  # the control: without the hooks PyTorch copies
        assert aligned["checksum"] == pytest.approx(plain["checksum"], rel=1e-6)  # the same training
