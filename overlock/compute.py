"""Device, precision, threads and seeding from ``compute.*`` and ``seed`` — one place for all stages."""
from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from overlock.backends import set_contmix_backend
from overlock.params import ComputeParams

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def repo_root() -> Path:
    """The repository root: $OVERLOCK_REPO, else the nearest parent holding params.yaml, else the cwd."""
    env = os.environ.get("OVERLOCK_REPO")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "params.yaml").exists() and (p / "dvc.yaml").exists():
            return p
    return here


def select_device(compute: ComputeParams) -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is an error."""
    if compute.device == "cuda" or (compute.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("compute.device=cuda but no CUDA device is visible; set compute.device=auto or cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def configure(compute: ComputeParams, seed: int | None = None, default_threads: int | None = None) -> torch.device:
    """Apply threads, the ContMix backend choice and the seed; return the device to use.

    Called by the stage kernel in the driver and by every Ray Train / torchrun worker with the same
    ``compute`` params (a worker passes its CPU share as ``default_threads``); nothing goes through the
    environment, so a worker on another node applies exactly these settings.
    """
    threads = compute.threads or default_threads
    if threads:
        torch.set_num_threads(threads)
    set_contmix_backend(compute.contmix_backend)
    if seed is not None:
        seed_everything(seed)
    return select_device(compute)


def seed_everything(seed: int) -> None:
    """One seed drives Python, NumPy and torch (data order is seeded by the samplers from the same value)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def autocast(precision: str, device: torch.device):
    """Autocast context for ``compute.precision`` (fp32: a no-op, numerics stay exact)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = _DTYPES[precision]
    if device.type == "cpu" and dtype is torch.float16:
        raise ValueError("compute.precision=fp16 is not supported on CPU; use bf16 (or fp32)")
    return torch.autocast(device_type=device.type, dtype=dtype)


def needs_grad_scaler(precision: str, device: torch.device) -> bool:
    """fp16 on CUDA needs loss scaling; bf16 and fp32 do not."""
    return precision == "fp16" and device.type == "cuda"


def to_memory_format(module: torch.nn.Module, memory_format: torch.memory_format) -> torch.nn.Module:
    """``module.to(memory_format=...)`` that leaves non-4-D tensors alone.

    ``nn.Module.to`` refuses channels_last for any parameter that is not 4-D, and ODConv/KernelWarehouse keep
    5-D kernel banks; only the 4-D convolution weights need the layout.
    """
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=memory_format)
    return module


#: the arguments :func:`launch_torchrun`'s callers pass to their ``worker`` entry point
TORCHRUN_WORKER_ARGS = ("params-json", "data", "classifier", "work-dir", "run-uri", "run-id")


def start_torchrun_worker(module: str, argv: list[str]):
    """In a process started by :func:`launch_torchrun`: parse the worker arguments, apply the pipeline's compute
    params, initialise the process group (NCCL on this rank's GPU, else gloo on the CPU). Returns
    ``(args, params, device)``."""
    import argparse
    import json

    from mmcv.runner import init_dist

    from overlock.params import parse_params

    parser = argparse.ArgumentParser(prog=f"python -m {module} worker")
    for name in TORCHRUN_WORKER_ARGS:
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args(argv)
    params = parse_params(json.loads(Path(args.params_json).read_text()), args.params_json)
    configure(params.compute, params.seed)  # the pipeline's compute params, applied in this process too
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        init_dist("pytorch", backend="nccl")  # also pins this rank's GPU
    else:
        torch.distributed.init_process_group("gloo")
    return args, params, device


def launch_torchrun(section: str, nproc_per_node: int | None, module: str, worker_args: list[str]) -> None:
    """Run ``python -m <module> worker <worker_args>`` under ``torchrun`` in the repository root: one process
    per visible GPU (or ``<section>.nproc_per_node``, which also runs gloo CPU processes on a CPU-only host)."""
    import logging
    import subprocess
    import sys

    nproc = nproc_per_node or torch.cuda.device_count()
    if nproc < 1:
        raise RuntimeError(f"{section}.launcher=pytorch found no CUDA GPU: use {section}.launcher=none to train on "
                           f"the CPU, or set {section}.nproc_per_node to run that many CPU processes (gloo)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           module, "worker", *worker_args]
    logging.getLogger(f"overlock.{section}").info("launching %s", " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=repo_root())
