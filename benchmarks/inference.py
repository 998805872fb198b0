"""OverLoCK inference on CPU: re-parameterized + channels_last vs the plain model, side by side.

Rows (eval mode, ``torch.inference_mode()``, same weights, same images, interleaved repetitions):

  plain torch-dw        as trained (dilated branches + BNs), contiguous, fp32, PyTorch's own depth-wise
                        convs (``OVERLOCK_DWCONV_BACKEND=torch``): the model as stock PyTorch runs it
  plain                 the same with our default depth-wise path (``fast``: large kernels run in oneDNN's
                        channels_last kernels even for contiguous tensors)
  plain channels_last   the same in channels_last
  reparam               ``model.reparameterize()``: one large kernel per DilatedReparamBlock plus the
                        inference fusion (BNs folded, activations as oneDNN post-ops, GRN scales in the next
                        1x1 conv, shortcuts added inside the last conv; ``overlock.models.inference_fusion``),
                        contiguous
  reparam channels_last goal row: re-parameterized, channels_last, fp32
  reparam cl torch-dw   the goal row with PyTorch's own depth-wise convs (stock kernels on both sides when
                        compared with ``plain torch-dw``)
  reparam cl merge-only the goal row without the inference fusion (only the dilated branches merged, as the
                        official re-parameterization does): what the fusion adds
  reparam cl bf16       the goal row under ``torch.autocast("cpu", torch.bfloat16)``
  reparam cl compiled   (``--compile`` only) the goal row under ``torch.compile`` (inductor, weights frozen);
                        its warm-up pass, compile included, is printed and excluded from the timed rounds
  onnxruntime           the deploy form exported to ONNX (``overlock.onnx_export``: dynamic batch, ContMix
                        traced through ``--onnx-contmix``) run by ONNX Runtime's CPU provider, intra-op
                        threads = ``--threads``, NCHW input (``--no-onnx``: left out); export time printed.
                        Issue 20's goal: ``reparam channels_last`` at least as fast at batch 1 and ``--batch``

Best (minimum) time of the interleaved rounds per row (the machine is shared; interference only slows a
pass down). Throughput at ``--batch`` (default 64) and latency at batch 1 (plain vs reparam channels_last,
fp32/bf16, ONNX Runtime). ContMix is the default (``auto`` -> ``fast`` on CPU) everywhere (the ONNX graph:
``--onnx-contmix``). Ratios are printed against both plain rows: ``plain torch-dw`` (stock kernels) and
``plain`` (our default kernels, the stricter one), and the goal row against ONNX Runtime (> 1: ours faster).
The script also prints the largest logit difference of every row against the plain fp32 model.

    .venv/bin/python benchmarks/inference.py             # XT, 224 px, batch 64, 2 threads
    .venv/bin/python benchmarks/inference.py --quick     # brief smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time

import torch

# --quick: same block types and kernel sizes as XT, far fewer and narrower blocks.
DWCONV_ENV = "OVERLOCK_DWCONV_BACKEND"
QUICK_ARCH = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 32, 64, 96], sub_num_heads=[2, 2])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="xt", help="OverLoCK size (xt, t, s, b); default xt")
    ap.add_argument("--batch", type=int, default=64, help="throughput batch size (default 64)")
    ap.add_argument("--img", type=int, default=224, help="image side in pixels (default 224)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--reps", type=int, default=2, help="timed rounds after the warm-up round (default 2)")
    ap.add_argument("--latency-reps", type=int, default=5, help="timed batch-1 passes per row (default 5)")
    ap.add_argument("--compile", action="store_true",
                    help="add the reparam channels_last row under torch.compile "
                         "(inductor; ~1-2 min of compiling)")
    ap.add_argument("--quick", action="store_true",
                    help="brief smoke run: reduced architecture, 32 px, batch 4, 1 round; checks the script only")
    ap.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                    help="add the ONNX Runtime row (exports the deploy form first; default: on)")
    ap.add_argument("--goal-rows", action="store_true",
                    help="only plain torch-dw, plain, reparam channels_last (and onnxruntime): a shorter run")
    ap.add_argument("--onnx-contmix", default="fast", choices=["fast", "gather", "unfold"],
                    help="ContMix backend traced into the ONNX graph (default: fast)")
    args = ap.parse_args(argv)
    args.overrides = {}
    if args.quick:
        args.img, args.batch, args.reps, args.latency_reps = 32, 4, 1, 1
        args.overrides = QUICK_ARCH
    return args


class OrtRow:
    """ONNX Runtime (CPU provider) on the exported deploy form; same interface as ``Row``."""

    layout, precision, compiled = "NCHW", "fp32", False

    def __init__(self, name: str, path: str, threads: int):
        from overlock.onnx_export import ort_session

        self.name, self.session = name, ort_session(path, threads)
        self.times: list[float] = []
        self.latency: list[float] = []
        self.first_pass = 0.0

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, float]:
        x = images.contiguous().numpy()
        start = time.perf_counter()
        out = self.session.run(["logits"], {"images": x})[0]
        return torch.from_numpy(out), time.perf_counter() - start


def export_onnx_row(reparam: torch.nn.Module, args, directory: str) -> OrtRow:
    """Export ``reparam`` (a copy) as ``overlock export`` does and open an ONNX Runtime session on it."""
    from overlock.onnx_export import export_onnx

    path = os.path.join(directory, "deploy.onnx")
    start = time.perf_counter()
    export_onnx(copy.deepcopy(reparam), path, (3, args.img, args.img), contmix=args.onnx_contmix)
    print(f"ONNX export (dynamo, ContMix {args.onnx_contmix}): {time.perf_counter() - start:.1f} s, "
          f"{os.path.getsize(path) / 1e6:.1f} MB", flush=True)
    return OrtRow("onnxruntime", path, args.threads)


class Row:
    def __init__(self, name: str, model: torch.nn.Module, channels_last: bool, precision: str,
                 dwconv: str = "fast", compile: bool = False):
        self.name, self.precision, self.dwconv = name, precision, dwconv
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.layout = "channels_last" if channels_last else "contiguous"
        self.model = model.to(memory_format=self.fmt).eval()
        self.compiled = compile
        if compile:
            import torch._inductor.config as inductor_config

            # weights are constants: inductor folds and pre-packs them (inference only)
            inductor_config.freezing = True
            self.model = torch.compile(self.model, dynamic=False)
        self.times: list[float] = []
        self.latency: list[float] = []
        self.first_pass = 0.0

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, float]:
        x = images.contiguous(memory_format=self.fmt)
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16"
                    else contextlib.nullcontext())
        old = os.environ.get(DWCONV_ENV)
        os.environ[DWCONV_ENV] = self.dwconv
        try:
            return self._run(x, autocast)
        finally:
            if old is None:
                os.environ.pop(DWCONV_ENV, None)
            else:
                os.environ[DWCONV_ENV] = old

    def _run(self, x, autocast):
        with torch.inference_mode(), autocast:
            start = time.perf_counter()
            out = self.model(x)
            return out.float(), time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import timm

    import overlock.models  # noqa: F401  (registers overlock_* with timm)
    from overlock.models.blocks import enable_inference_fusion

    torch.manual_seed(0)
    plain = timm.create_model(f"overlock_{args.size}", num_classes=1000, **args.overrides)
    # trained-looking BN statistics, so the folded kernels are not trivially the identity
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    plain.eval()
    reparam = copy.deepcopy(plain).reparameterize(remove_aux_head=True)
    rows = [
        Row("plain torch-dw", copy.deepcopy(plain), False, "fp32", dwconv="torch"),
        Row("plain", plain, False, "fp32"),
        Row("plain channels_last", copy.deepcopy(plain), True, "fp32"),
        Row("reparam", copy.deepcopy(reparam), False, "fp32"),
        Row("reparam channels_last", reparam, True, "fp32"),
        Row("reparam channels_last torch-dw", copy.deepcopy(reparam), True, "fp32", dwconv="torch"),
        Row("reparam channels_last merge-only", enable_inference_fusion(copy.deepcopy(reparam), False), True,
            "fp32"),
        Row("reparam channels_last bf16", copy.deepcopy(reparam), True, "bf16"),
    ]
    if args.goal_rows:
        rows = [r for r in rows if r.name in ("plain torch-dw", "plain", "reparam channels_last")]
    if args.compile:
        rows.append(Row("reparam channels_last compiled", copy.deepcopy(reparam), True, "fp32", compile=True))
    onnx_dir = tempfile.TemporaryDirectory(prefix="overlock-bench-onnx-")
    if args.onnx:
        rows.append(export_onnx_row(reparam, args, onnx_dir.name))
    n_plain = sum(p.numel() for p in plain.parameters()) / 1e6
    n_rep = sum(p.numel() for p in reparam.parameters()) / 1e6
    print(f"OverLoCK-{args.size.upper()} inference: batch {args.batch}, {args.img}px, {args.threads} threads, "
          f"torch {torch.__version__}, params {n_plain:.2f}M plain / {n_rep:.2f}M reparam, "
          f"1 warm-up + {args.reps} interleaved rounds"
          f"{' (--quick: reduced architecture ' + str(QUICK_ARCH) + ')' if args.quick else ''}", flush=True)

    images = torch.randn(args.batch, 3, args.img, args.img)
    errors: dict[str, float] = {}
    ref = None
    for rnd in range(1 + args.reps):
        for row in rows:
            out, elapsed = row.run(images)
            if rnd == 0:
                row.first_pass = elapsed
                ref = out if ref is None else ref
                errors[row.name] = (out - ref).abs().max().item() / ref.abs().max().item()
            else:
                row.times.append(elapsed)
            print(f"  round {rnd}{' (warm-up)' if rnd == 0 else ''} {row.name:28s} {elapsed:8.2f} s", flush=True)

    single = images[:1]
    latency_rows = [r for r in rows if r.name in ("plain torch-dw", "plain", "reparam channels_last",
                                                           "reparam channels_last bf16", "onnxruntime")]
    for row in latency_rows:
        row.run(single)  # warm-up at this shape
    for _ in range(args.latency_reps):
        for row in latency_rows:
            row.latency.append(row.run(single)[1])

    base, plain_time = min(rows[0].times), min(rows[1].times)
    base_lat = min(rows[0].latency)
    print()
    print(f"| model | layout | precision | batch {args.batch} (s) | img/s | ratio vs plain torch-dw | "
          f"ratio vs plain | latency b1 (ms) | latency ratio | max logit diff vs baseline (rel) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        t = min(row.times)
        lat = f"{1000 * min(row.latency):.0f}" if row.latency else "-"
        lat_ratio = f"{base_lat / min(row.latency):.2f}x" if row.latency else "-"
        print(f"| {row.name} | {row.layout} | {row.precision} | {t:.2f} | {args.batch / t:.2f} | {base / t:.2f}x | "
              f"{plain_time / t:.2f}x | {lat} | {lat_ratio} | {errors[row.name]:.1e} |")
    print()
    for row in rows[1:]:
        print(f"RATIO {row.name} vs plain torch-dw: {base / min(row.times):.2f}x img/s at batch {args.batch}")
    for row in rows[2:]:
        print(f"RATIO {row.name} vs plain: {plain_time / min(row.times):.2f}x img/s at batch {args.batch}")
    for row in latency_rows[1:]:
        print(f"RATIO {row.name} vs plain torch-dw: {base_lat / min(row.latency):.2f}x batch-1 latency")
    goal = next(r for r in rows if r.name == "reparam channels_last")
    ort_rows = [r for r in rows if isinstance(r, OrtRow)]
    for row in ort_rows:
        print(f"RATIO {goal.name} vs {row.name}: {min(row.times) / min(goal.times):.2f}x img/s at batch "
              f"{args.batch}")
        print(f"RATIO {goal.name} vs {row.name}: {min(row.latency) / min(goal.latency):.2f}x batch-1 latency")
    onnx_dir.cleanup()
    for row in rows:
        if row.compiled:
            print(f"COMPILE {row.name}: first pass {row.first_pass:.1f} s (compile time "
                  f"~{row.first_pass - min(row.times):.0f} s), excluded from the timed rounds")
    fp32_err = max(errors[r.name] for r in rows if r.precision == "fp32")
    print(f"fp32 rows agree with the plain model to {fp32_err:.1e} (relative max logit difference)")
    return 0 if fp32_err < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
