"""Activation checkpointing (``pretrain.grad_checkpointing``): peak memory of one training step, with and
without, on the CPU, next to the memory planner's modelled estimate.

Each mode runs in a fresh process: build the model, run one warm-up step, then record the resident set
before the measured step and its peak (``ru_maxrss``) after it; the step's memory is the difference.

    python benchmarks/grad_checkpointing_memory.py --size xt --input-size 224 --batch 4
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def child(size: str, input_size: int, batch: int, checkpointing: bool) -> dict:
    import torch

    from overlock.params import parse_params
    from overlock.training import recipe
    from overlock.training.memory_plan import full_checkpointing, modelled_profile
    params = parse_params({"model": {"size": size, "drop_path_rate": 0.0}})
    torch.manual_seed(0)
    model = recipe.build_model(params, 1000).train()
    modelled = modelled_profile(model, input_size, "fp32").per_sample_bytes["on" if checkpointing else "off"]
    blocks = recipe.apply_grad_checkpointing(model, full_checkpointing(model) if checkpointing else [0, 0, 0, 0])
    x, y = torch.randn(batch, 3, input_size, input_size), torch.randint(0, 1000, (batch,))

    def step() -> None:
        loss = recipe.recipe_loss(torch.nn.CrossEntropyLoss(), model(x), y, 0.4)
        loss.backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: only activations differ

    step()  # warm-up: gradient buffers and allocator pools exist before the measurement
    before = _rss_bytes()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"checkpointing": checkpointing, "blocks_checkpointed": blocks, "step_peak_mib": (peak - before) / 2**20,
            "step_seconds": seconds, "modelled_saved_activations_mib": modelled * batch / 2**20 / 1.3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="xt")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--child", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.size, args.input_size, args.batch, args.child == "on")))
        return
    rows = []
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--size", args.size, "--input-size", str(args.input_size),
                              "--batch", str(args.batch), "--child", mode], check=True, capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    off, on = rows
    print(json.dumps({"size": args.size, "input_size": args.input_size, "batch": args.batch, "off": off, "on": on,
                      "peak_ratio_on_over_off": on["step_peak_mib"] / off["step_peak_mib"],
                      "time_ratio_on_over_off": on["step_seconds"] / off["step_seconds"]}, indent=1))


if __name__ == "__main__":
    main()
