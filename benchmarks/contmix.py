"""ContMix aggregation benchmark: forward+backward time of every ``na2d_av`` backend at OverLoCK shapes.

Backends: ``fast`` (PyTorch tiled dense matmul, the CPU default), ``gather`` (plain gather + einsum, the
baseline), ``unfold`` (naive F.unfold formulation) and ``natten`` (natten 0.17's CPU kernel, when installed).
Repetitions are interleaved across backends (noisy shared machines); the best time of each is reported with
the ratios ``gather/fast``, ``unfold/fast`` and ``natten/fast`` (how many times faster ``fast`` is).

    python benchmarks/contmix.py            # full run (a few minutes; natten's CPU kernel is slow)
    python benchmarks/contmix.py --quick    # brief run: smaller batches, 1 repetition
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from overlock.models import contmix  # noqa: E402

# name, batch, heads, H, W, channels per head, kernel, dilation. OverLoCK-T: stage 3 has 8 heads per kernel
# (16 channels each) at 1/16, stage 4 has 16 heads (16 channels) at 1/32; detection at 800x1333 -> 50x84.
SHAPES = [
    ("stage3-224 K13", 16, 8, 14, 14, 16, 13, 1),
    ("stage3-224 K5", 16, 8, 14, 14, 16, 5, 1),
    ("stage4-224 K7", 16, 16, 7, 7, 16, 7, 1),
    ("stage3-384 K13", 16, 8, 24, 24, 16, 13, 1),
    ("detection 50x84 K13", 2, 8, 50, 84, 16, 13, 1),
    ("detection 50x84 K5", 2, 8, 50, 84, 16, 5, 1),
    ("generic 28x36 K7 d2", 4, 8, 28, 36, 16, 7, 2),
    ("generic 20x30 K9", 8, 4, 20, 30, 32, 9, 1),
]


def time_fwd_bwd(backend: str, attn: torch.Tensor, value: torch.Tensor, grad: torch.Tensor, kernel: int,
                 dilation: int) -> float:
    attn.grad = value.grad = None
    start = time.perf_counter()
    out = contmix.na2d_av(attn, value, kernel, dilation, backend=backend)
    out.backward(grad)
    return time.perf_counter() - start


def run(shapes, backends: list[str], reps: int, batch_div: int) -> list[dict]:
    rows = []
    for name, batch, heads, height, width, channels, kernel, dilation in shapes:
        batch = max(1, batch // batch_div)
        gen = torch.Generator().manual_seed(0)
        attn = torch.softmax(torch.randn(batch, heads, height, width, kernel * kernel, generator=gen), -1)
        attn.requires_grad_()
        value = torch.randn(batch, heads, height, width, channels, generator=gen, requires_grad=True)
        grad = torch.randn(batch, heads, height, width, channels, generator=gen)
        times = {b: [] for b in backends}
        for b in backends:  # warm-up: index caches, tile choice, natten import
            time_fwd_bwd(b, attn, value, grad, kernel, dilation)
        for _ in range(reps):
            for b in backends:
                times[b].append(time_fwd_bwd(b, attn, value, grad, kernel, dilation))
        row = {"shape": f"{name} (B{batch})", "tile": contmix._choose_tile_cached(
            height, width, (kernel, kernel), (dilation, dilation), channels)}
        row.update({b: min(t) for b, t in times.items()})
        row.update({f"{b}_median": statistics.median(t) for b, t in times.items()})
        rows.append(row)
        print_row(row, backends)
    return rows


def print_header(backends: list[str]) -> None:
    cols = "".join(f"{b + ' ms':>12}" for b in backends)
    ratios = "".join(f"{b + '/fast':>13}" for b in backends if b != "fast")
    print(f"{'shape':<30}{'tile':>10}{cols}{ratios}", flush=True)


def print_row(row: dict, backends: list[str]) -> None:
    cols = "".join(f"{row[b] * 1e3:>12.1f}" for b in backends)
    ratios = "".join(f"{row[b] / row['fast']:>12.1f}x" for b in backends if b != "fast")
    print(f"{row['shape']:<30}{str(row['tile']):>10}{cols}{ratios}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="brief run: batches / 8, 1 repetition")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per backend (default 5, quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated subset of fast,gather,unfold,natten (default: all available)")
    parser.add_argument("--shapes", default=None, help="only shapes whose name contains this text")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    available = ["fast", "gather", "unfold"] + (["natten"] if contmix._natten_error() is None else [])
    if args.quick and args.backends is None and "natten" in available:
        available.remove("natten")  # its CPU kernel is a slow reference; most of a quick run's time
        print("natten: left out of --quick (name it in --backends to time it)")
    backends = args.backends.split(",") if args.backends else available
    if "fast" not in backends:
        parser.error("--backends must include fast (ratios are relative to it)")
    shapes = [s for s in SHAPES if args.shapes is None or args.shapes in s[0]]
    reps = args.reps or (1 if args.quick else 5)
    print(f"ContMix na2d_av forward+backward, float32, {args.threads} threads, "
          f"best of {reps} interleaved reps; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    if contmix._natten_error() is not None:
        print(f"natten: skipped ({contmix._natten_error()})")
    print_header(backends)
    run(shapes, backends, reps, batch_div=8 if args.quick else 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
