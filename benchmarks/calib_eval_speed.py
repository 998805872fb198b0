"""Calibration/evaluation speed, measured side by side in one run (results: benchmarks/RESULTS.md).

1. Calibration metrics and the temperature fit on ImageNet-val-sized logits (50,000 x 1,000).
2. OverLoCK-XT at 224 px: params, fvcore GFLOPs (without / with ContMix) and throughput/latency of the
   training form vs. the re-parameterized form, channels_last vs. contiguous (the evaluate stage's table).

Usage: .venv/bin/python benchmarks/calib_eval_speed.py [--batch 4] [--iters 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch


def _lbfgs_small_step(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """The first version of fit_temperature (L-BFGS lr=0.1): the baseline of the temperature fit."""
    import torch.nn.functional as F

    z = logits.double()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")
    evals = [0]

    def closure():
        evals[0] += 1
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp()), evals[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=50_000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from overlock.calibration.temperature import fit_temperature
    from overlock.metrics.calibration import classification_calibration

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.samples, 1000, generator=g) * 3
    labels = torch.multinomial((logits / 3).softmax(1), 1, generator=g).squeeze(1)
    start = time.perf_counter()
    metrics = classification_calibration(logits, labels, 15)
    t_metrics = time.perf_counter() - start
    start = time.perf_counter()
    temperature = fit_temperature(logits, labels, split="calibration")
    t_fit = time.perf_counter() - start
    start = time.perf_counter()
    baseline_t, evals = _lbfgs_small_step(logits, labels)
    t_base = time.perf_counter() - start
    print(
        f"| calibration metrics (ECE, MCE, adaptive ECE, NLL, Brier, top-1), {args.samples}x1000 logits | "
        f"{t_metrics:.2f} s |"
    )
    print(
        f"| fit_temperature (L-BFGS lr=1, strong Wolfe, float64), {args.samples}x1000 logits -> "
        f"T={temperature:.3f} (true 3.0) | {t_fit:.2f} s |"
    )
    print(
        f"| baseline: same L-BFGS with lr=0.1 ({evals} loss evaluations) -> T={baseline_t:.3f} | {t_base:.2f} s |"
    )
    del metrics

    import timm

    import overlock.models  # noqa: F401
    from overlock.evaluation.complexity import complexity_report

    model = timm.create_model("overlock_xt").eval()
    report = complexity_report(model, 224, args.batch, args.iters, "cpu", channels_last=True)
    print(
        "\n| OverLoCK-XT 224 px | params (M) | GFLOPs | GFLOPs incl. ContMix | layout | img/s (batch "
        f"{args.batch}) | latency batch 1 (ms) |\n|---|---|---|---|---|---|---|"
    )
    for name, form in report["forms"].items():
        for layout, speed in (("channels_last", form["speed"]), ("contiguous", form["speed_contiguous"])):
            print(
                f"| {name} | {form['params'] / 1e6:.3f} | {form['gflops']:.3f} | "
                f"{form['gflops_with_contmix']:.3f} | {layout} | {speed['throughput']:.2f} | "
                f"{speed['latency_ms']:.1f} |"
            )


if __name__ == "__main__":
    main()
