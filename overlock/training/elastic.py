"""How the global batch and the learning rate follow the number of live Ray Train workers.

``pretrain.workers`` is the full worker count the recipe is written for (global batch ``batch_size x
workers``); with ``pretrain.min_workers`` Ray Train runs between ``min_workers`` and ``workers`` workers and
restarts the group from the last checkpoint on fewer when a node is lost. ``pretrain.elastic_scaling`` says what
happens then:

- ``keep_global_batch``: every worker takes ``batch_size x workers / live`` images per step; the global batch,
  the steps per epoch, the LR and its schedule stay those of the full run (more memory per worker).
- ``scale_lr``: the per-worker batch stays ``batch_size``; the global batch is ``batch_size x live`` and the LR
  follows it linearly (the official rule ``lr_base x global / 1024`` when ``pretrain.lr`` is null).
"""
from __future__ import annotations

from overlock.params import PretrainParams
from overlock.training import recipe


def worker_range(p: PretrainParams) -> int | tuple[int, int]:
    """``ScalingConfig.num_workers``: ``workers``, or ``(min_workers, workers)`` for an elastic run."""
    return p.workers if p.min_workers is None or p.min_workers == p.workers else (p.min_workers, p.workers)


def per_worker_batch(p: PretrainParams, live: int) -> int:
    """Images per step of one of ``live`` workers."""
    if p.elastic_scaling == "keep_global_batch":
        return max(1, (p.batch_size * p.workers) // live)
    return p.batch_size


def global_batch(p: PretrainParams, live: int) -> int:
    return per_worker_batch(p, live) * live


def learning_rate(p: PretrainParams, live: int) -> float:
    """The peak LR with ``live`` workers (that of the full run under ``keep_global_batch``)."""
    full = recipe.learning_rate(p, p.workers)
    return full if p.elastic_scaling == "keep_global_batch" else full * live / p.workers


def rescale_schedule(optimizer, scheduler, factor: float) -> None:
    """Multiply the peak LR of a resumed optimizer and timm scheduler by ``factor`` (their state holds the LR of
    the worker count they were saved with)."""
    if factor == 1.0:
        return
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    scheduler.base_values = [v * factor for v in scheduler.base_values]
    if hasattr(scheduler, "warmup_steps") and getattr(scheduler, "warmup_t", 0):
        init = getattr(scheduler, "warmup_lr_init", 0.0)
        scheduler.warmup_steps = [(v - init) / scheduler.warmup_t for v in scheduler.base_values]
