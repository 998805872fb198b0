"""Size, FLOPs and CPU forward latency of the dynamic-convolution baselines, side by side in one process.

For every ``model.arch`` of ``overlock.models.baselines.BASELINE_ARCHS``: parameters (1000 classes), fvcore
FLOPs at 224x224 (multiply-adds per image; fvcore counts convolutions and matmuls, so KW's kernel assembly is
included while ODConv's element-wise kernel aggregation is not), and the
median forward latency of a batch on CPU in fp32 and bf16 (autocast). Markdown table on stdout.

    .venv/bin/python benchmarks/baselines_speed.py [--size 112] [--batch 2] [--iters 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from overlock.models.baselines import BASELINE_ARCHS


def flops_g(model: torch.nn.Module) -> float:
    from fvcore.nn import FlopCountAnalysis

    counter = FlopCountAnalysis(model.eval(), torch.randn(1, 3, 224, 224))
    counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return counter.total() / 1e9


def forward_ms(model: torch.nn.Module, x: torch.Tensor, iters: int, bf16: bool) -> float:
    times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(x)  # warm-up
        for _ in range(iters):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=112, help="input side for the latency runs")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--archs", nargs="*", default=list(BASELINE_ARCHS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    print(
        f"| arch | params (M) | GFLOPs @224 | fwd fp32 (ms) | fwd bf16 (ms) |  <- batch {args.batch}, "
        f"{args.size}px, {args.threads} thread(s), median of {args.iters}"
    )
    print("|---|---:|---:|---:|---:|")
    for arch in args.archs:
        model = timm.create_model(f"dc_{arch}").eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"| {arch} | {params:.2f} | {flops_g(model):.2f} | "
            f"{forward_ms(model, x, args.iters, False):.0f} | {forward_ms(model, x, args.iters, True):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
