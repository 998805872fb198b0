"""OverLoCK training step on CPU: our straightforward baseline vs the optimised variants, side by side.

One step = forward (train mode: main + aux logits), loss ``CE(main) + 0.4 * CE(aux)``, backward, AdamW step.
Variants (each its own copy of the same initial model and optimizer, the same batch):

  baseline          fp32, contiguous (NCHW), ContMix ``gather``, PyTorch depth-wise convs
  +fast-contmix     ContMix ``fast`` (tiled dense matmul, hand-written backward)
  +channels-last    model and input in ``torch.channels_last``
  +fast-dwconv      every depth-wise kernel above 3x3 (the large ones and their dilated branches) through
                    ``overlock.models.fast_conv`` (exact re-formulation)
  +bf16-autocast    all of the above under ``torch.autocast("cpu", torch.bfloat16)`` (opt-in numerics)
  +compile          +fast-dwconv under ``torch.compile`` (inductor; ``compute.compile: true``). Not run
                    unless asked for (``--compile`` or ``--variants``): compiling takes minutes here; its
                    warm-up step (compile included) is printed, the timed rounds exclude it

Every variant, the baseline included, runs the model's fused small blocks (GRN, ResDWConv, LayerScale as
single passes; see ``overlock/models/blocks.py``): they are part of the model, not a switch.

Repetitions are interleaved (one step of every variant per round) so machine-load drift hits all of them
alike; the best (minimum) step time per variant is reported with img/s and the ratio to the baseline (the
machine is shared: interference only ever slows a step down, so the minimum is the least noisy statistic). The first step of
every variant starts from identical weights: its loss and gradients are compared with the baseline's
(fp32 variants must agree to ~1e-5 relative; the bf16 row reports its deviation).

    .venv/bin/python benchmarks/train_step.py              # XT, batch 8, 224 px, 2 threads
    .venv/bin/python benchmarks/train_step.py --quick      # brief smoke run (small images)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AUX_RATIO = 0.4
FP32_LOSS_RTOL = 1e-5
FP32_GRAD_RTOL = 1e-4  # relative L2 error of all gradients together


@dataclass(frozen=True)
class Variant:
    name: str
    contmix: str  # OVERLOCK_CONTMIX_BACKEND
    channels_last: bool
    precision: str  # fp32 | bf16
    dwconv: str  # OVERLOCK_DWCONV_BACKEND
    compile: bool = False  # torch.compile (inductor)


VARIANTS = (
    Variant("baseline", "gather", False, "fp32", "torch"),
    Variant("+fast-contmix", "fast", False, "fp32", "torch"),
    Variant("+channels-last", "fast", True, "fp32", "torch"),
    Variant("+fast-dwconv", "fast", True, "fp32", "fast"),
    Variant("+bf16-autocast", "fast", True, "bf16", "fast"),
)
COMPILE_VARIANT = Variant("+compile", "fast", True, "fp32", "fast", compile=True)


# --quick: same block types and kernel sizes as XT, far fewer and narrower blocks.
QUICK_ARCH = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 32, 64, 96], sub_num_heads=[2, 2])


def bf16_contmix_backend(preferred: str = "fast") -> tuple[str, str]:
    """The ContMix backend the bf16 row can use: ``preferred`` if its backward works under CPU autocast,
    else ``gather`` (plain autograd) with the reason."""
    from overlock.models.contmix import na2d_av

    attn = torch.randn(1, 1, 8, 8, 9, requires_grad=True)
    value = torch.randn(1, 1, 8, 8, 4, requires_grad=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = na2d_av(attn.softmax(-1), value * 1.0, 3, backend=preferred)
        out.float().sum().backward()
    except RuntimeError as exc:
        return "gather", f"ContMix '{preferred}' fails under bf16 autocast ({exc}); the bf16 row uses 'gather'"
    return preferred, ""


@contextlib.contextmanager
def backend_env(variant: Variant):
    """Set the ContMix and depth-wise conv backends (both read per call) for the duration of a step."""
    names = {"OVERLOCK_CONTMIX_BACKEND": variant.contmix, "OVERLOCK_DWCONV_BACKEND": variant.dwconv}
    old = {k: os.environ.get(k) for k in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="xt", help="OverLoCK size (xt, t, s, b); default xt")
    ap.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    ap.add_argument("--img", type=int, default=224, help="image side in pixels (default 224)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--reps", type=int, default=2, help="timed rounds after the warm-up round (default 2)")
    ap.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                    help="comma-separated subset of: "
                    + ", ".join(v.name for v in VARIANTS + (COMPILE_VARIANT,))
                    + " (default: all but +compile)")
    ap.add_argument("--compile", action="store_true",
                    help="also run the +compile variant (minutes of compiling)")
    ap.add_argument("--quick", action="store_true",
                    help="brief smoke run: a reduced architecture (one block per stage, narrow), 64 px, batch 2, "
                         "1 timed round; checks the script, not the speed")
    args = ap.parse_args(argv)
    args.overrides = {}
    if args.quick:
        args.img, args.batch, args.reps = 64, 2, 1
        args.overrides = QUICK_ARCH
    known = {v.name: v for v in VARIANTS + (COMPILE_VARIANT,)}
    wanted = [n.strip() for n in args.variants.split(",") if n.strip()]
    if args.compile and COMPILE_VARIANT.name not in wanted:
        wanted.append(COMPILE_VARIANT.name)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; valid: {', '.join(known)}")
    if "baseline" not in wanted:
        wanted.insert(0, "baseline")
    args.variants = [known[n] for n in wanted]
    return args


class Runner:
    """One variant: its own model copy, AdamW, input layout and numerics."""

    def __init__(self, variant: Variant, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor):
        fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
        self.variant = variant
        self.model = copy.deepcopy(model).to(memory_format=fmt).train()
        self.images = images.contiguous(memory_format=fmt)
        self.targets = targets
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05)
        self.forward = torch.compile(self.model, dynamic=False) if variant.compile else self.model
        self.first_step = 0.0
        self.times: list[float] = []

    def step(self, keep_grads: bool = False):
        """One timed training step; returns (loss, {name: grad}) when ``keep_grads``."""
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if self.variant.precision == "bf16"
                    else contextlib.nullcontext())
        with backend_env(self.variant):
            start = time.perf_counter()
            with autocast:
                out = self.forward(self.images)
            loss = F.cross_entropy(out["main"].float(), self.targets) \
                + AUX_RATIO * F.cross_entropy(out["aux"].float(), self.targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = ({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
                     if keep_grads else None)
            self.optimizer.step()
            elapsed = time.perf_counter() - start
        return loss.detach(), grads, elapsed


def compare(loss, grads, ref_loss, ref_grads) -> tuple[float, float, float]:
    """(relative loss error, relative L2 error of all gradients, largest |grad error| / largest |grad|)."""
    loss_err = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-12)
    diff2 = ref2 = 0.0
    max_diff = max_ref = 0.0
    for name, ref in ref_grads.items():
        g = grads[name].float().contiguous()
        d = (g - ref).double().norm().item()
        r = ref.double().norm().item()
        diff2 += d * d
        ref2 += r * r
        max_diff = max(max_diff, (g - ref).abs().max().item())
        max_ref = max(max_ref, ref.abs().max().item())
    return loss_err, (diff2 ** 0.5) / max(ref2 ** 0.5, 1e-12), max_diff / max(max_ref, 1e-30)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import timm

    import overlock.models  # noqa: F401  (registers overlock_* with timm)

    torch.manual_seed(0)
    model = timm.create_model(f"overlock_{args.size}", num_classes=1000, **args.overrides)
    variants, note = list(args.variants), ""
    for i, v in enumerate(variants):
        if v.precision == "bf16" and v.contmix != "gather":
            backend, note = bf16_contmix_backend(v.contmix)
            variants[i] = Variant(v.name, backend, v.channels_last, v.precision, v.dwconv)
    images = torch.randn(args.batch, 3, args.img, args.img)
    targets = torch.randint(0, 1000, (args.batch,))
    runners = [Runner(v, model, images, targets) for v in variants]
    print(f"OverLoCK-{args.size.upper()} training step: batch {args.batch}, {args.img}px, "
          f"{args.threads} threads, torch {torch.__version__}, {len(runners)} variants, "
          f"1 warm-up + {args.reps} interleaved rounds"
          f"{' (--quick: reduced architecture ' + str(QUICK_ARCH) + ')' if args.quick else ''}", flush=True)
    if note:
        print("NOTE: " + note, flush=True)

    ref_loss = ref_grads = None
    checks: dict[str, tuple[float, float, float]] = {}
    failures = []
    for rnd in range(1 + args.reps):
        for runner in runners:
            loss, grads, elapsed = runner.step(keep_grads=rnd == 0)
            if rnd == 0:
                runner.first_step = elapsed
                if runner.variant.name == "baseline":
                    ref_loss, ref_grads = loss, grads
                else:
                    checks[runner.variant.name] = compare(loss, grads, ref_loss, ref_grads)
            else:
                runner.times.append(elapsed)
            print(f"  round {rnd}{' (warm-up)' if rnd == 0 else ''} {runner.variant.name:16s} "
                  f"{elapsed:8.2f} s", flush=True)

    base = min(runners[0].times)
    print()
    print(f"| variant | precision | layout | ContMix | dw conv | step (s) | img/s | ratio vs baseline | "
          f"loss rel err | grad rel err (L2 / max-abs) |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|")
    for runner in runners:
        v = runner.variant
        t = min(runner.times)
        loss_err, grad_err, max_err = checks.get(v.name, (0.0, 0.0, 0.0))
        layout = "channels_last" if v.channels_last else "contiguous"
        print(f"| {v.name} | {v.precision} | {layout} | {v.contmix} | {v.dwconv} | {t:.2f} | "
              f"{args.batch / t:.2f} | {base / t:.2f}x | {loss_err:.1e} | {grad_err:.1e} / {max_err:.1e} |")
        if v.precision == "fp32" and (loss_err > FP32_LOSS_RTOL or grad_err > FP32_GRAD_RTOL):
            failures.append(f"{v.name}: loss rel err {loss_err:.2e} (max {FP32_LOSS_RTOL:g}), "
                            f"grad rel err {grad_err:.2e} (max {FP32_GRAD_RTOL:g})")
    print()
    for runner in runners[1:]:
        print(f"RATIO {runner.variant.name} vs baseline: {base / min(runner.times):.2f}x img/s")
    for runner in runners:
        if runner.variant.compile:
            compile_s = runner.first_step - min(runner.times)
            print(f"COMPILE {runner.variant.name}: first step {runner.first_step:.1f} s "
                  f"(compile time ~{compile_s:.0f} s), excluded from the timed rounds")
    if failures:
        print("FP32 EXACTNESS FAILED: " + "; ".join(failures))
        return 1
    print(f"fp32 exactness: every fp32 variant matches the baseline (loss <= {FP32_LOSS_RTOL:g}, "
          f"gradients <= {FP32_GRAD_RTOL:g} relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
