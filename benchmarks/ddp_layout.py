"""2-worker DDP training step (gloo, CPU) with and without ``align_grad_strides``, side by side in one run.

Without it, PyTorch warns "Grad strides do not match bucket view strides" and copies every mismatched
gradient into DDP's bucket on each step; with it the gradients arrive in the buckets' strides (a zero-copy
view). Both variants train the same channels_last OverLoCK from the same weights; timed rounds alternate
between them in ABBA order (aligned, plain, plain, aligned, ...) so that machine load hits both alike::

    PYTHONPATH=. python benchmarks/ddp_layout.py [--size xt] [--image 96] [--batch 8] [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MESSAGE = "Grad strides do not match bucket view strides"
TINY = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 32, 64, 96], sub_num_heads=[2, 2])


def _setup(args, aligned: bool):
    from overlock.compute import to_memory_format
    from overlock.models import create_overlock
    from overlock.training.ddp import align_grad_strides
    torch.manual_seed(0)
    overrides = dict(TINY) if args.tiny else {}
    model = create_overlock(args.size, num_classes=100, **overrides).train()
    model = to_memory_format(model, torch.channels_last)
    hooked = align_grad_strides(model) if aligned else 0
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return ddp, optimizer, hooked


def _step(ddp, optimizer, x, y):
    out = ddp(x)
    ce = torch.nn.functional.cross_entropy
    loss = ce(out["main"], y) + 0.4 * ce(out["aux"], y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _worker(rank: int, port: int, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.randn(args.batch, 3, args.image, args.image).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (args.batch,))
    order = ("plain", "aligned") if args.build_plain_first else ("aligned", "plain")
    runs = {name: _setup(args, name == "aligned") for name in order}  # construction order: a control
    times = {name: [] for name in runs}
    caught_by, copies = {}, {}
    for name in ("aligned", "plain"):  # warm-up; aligned first (PyTorch warns once per process)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _step(*runs[name][:2], x, y)
        caught_by[name] = sum(MESSAGE in str(w.message) for w in caught)
        model = runs[name][0].module  # gradients DDP's reducer copies into its buckets on every step
        copied = [p for p in model.parameters() if p.grad is not None and p.grad.stride() != p.stride()]
        copies[name] = (len(copied), sum(p.numel() * p.element_size() for p in copied))
    for r in range(args.rounds):
        for name in (("aligned", "plain") if r % 2 == 0 else ("plain", "aligned")):  # ABBA: drift hits both
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                _step(*runs[name][:2], x, y)
            dist.barrier()
            times[name].append((time.perf_counter() - t0) / args.steps)
    dist.destroy_process_group()
    if rank == 0:
        result = {name: {"step_s_median": statistics.median(t), "step_s_all": t,
                         "stride_warnings": caught_by[name], "hooked_params": runs[name][2],
                         "copied_grads": copies[name][0], "copied_bytes": copies[name][1]}
                  for name, t in times.items()}
        with open(os.path.join(out_dir, "result.json"), "w") as fh:
            json.dump(result, fh)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="xt")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny model overrides")
    ap.add_argument("--image", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8, help="per worker")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--build-plain-first", action="store_true",
                    help="construct the plain DDP model before the aligned one (a control for order effects)")
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(port, args, tmp), nprocs=2, join=True)
        with open(os.path.join(tmp, "result.json")) as fh:
            result = json.load(fh)
    print(f"DDP 2 workers (gloo, CPU), OverLoCK-{args.size}{' tiny' if args.tiny else ''}, {args.image} px, "
          f"batch {args.batch}/worker, channels_last, {args.threads} thread(s)/worker, "
          f"{args.rounds} rounds x {args.steps} steps")
    print("| variant | median step s | per-round step s | stride warnings | hooked params "
          "| copied grads/step |")
    print("|---|---|---|---|---|---|")
    for name in ("aligned", "plain"):
        r = result[name]
        rounds = ", ".join(f"{t:.3f}" for t in r["step_s_all"])
        print(f"| {name} | {r['step_s_median']:.3f} | {rounds} | {r['stride_warnings']} | "
              f"{r['hooked_params']} | {r['copied_grads']} ({r['copied_bytes'] / 2**20:.2f} MiB) |")
    ratio = result["plain"]["step_s_median"] / result["aligned"]["step_s_median"]
    print(f"RATIO plain/aligned step time: {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
