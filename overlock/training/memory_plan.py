"""Memory presets: the per-worker batch, gradient accumulation and activation checkpointing that fit a GPU
and keep the recipe's global batch (``pretrain.memory_preset``).

A :class:`MemoryProfile` says how a training step's peak memory grows with the per-worker batch:
``fixed + batch x per_sample`` (fixed: weights, gradients, AdamW state, EMA; per sample: activations kept
for the backward, with and without checkpointing). It comes from

* :func:`modelled_profile` (the presets 11gb/24gb/40gb/80gb): a batch-2 forward on the CPU whose saved
  tensors are counted by autograd's saved-tensor hooks, per block, which gives the activations with every
  block stored and with every block checkpointed (block inputs + one block recomputed), scaled for AMP and
  the backward's temporaries; or
* :func:`measure_profile` (``auto``): a few real training steps at two batch sizes on the GPU, peak memory
  from ``torch.cuda.max_memory_allocated``, fixed and per-sample cost from the two points.

:func:`plan_memory` then picks, among batch sizes that divide ``global_batch / workers``, the largest that
fits the budget without checkpointing; checkpointing is turned on only when it at least doubles a batch
smaller than :data:`EFFICIENT_BATCH` (recomputation costs about a third more compute per step).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["PRESET_GIB", "EFFICIENT_BATCH", "MemoryProfile", "MemoryPlan", "MemoryPlanError", "budget_bytes",
           "full_checkpointing", "modelled_profile", "measure_profile", "plan_memory"]

GIB = 1024 ** 3
PRESET_GIB = {"11gb": 11, "24gb": 24, "40gb": 40, "80gb": 80}
#: the share of a card's memory the plan may fill, and what it leaves for the CUDA context and cuDNN
#: workspaces that ``max_memory_allocated`` does not see
USABLE_FRACTION, RESERVED_GIB = 0.9, 1.0
#: per-worker batches at or above this run near full GPU efficiency: no checkpointing needed to grow them
EFFICIENT_BATCH = 64
#: modelled profile: 16-bit activations under AMP (norms and softmax stay fp32), backward temporaries
AMP_ACTIVATION_FACTOR, BACKWARD_TEMPORARIES = 0.6, 1.3
#: fixed bytes per parameter: fp32 weight, gradient, AdamW's two moments, EMA copy
BYTES_PER_PARAM = 4 + 4 + 8 + 4


class MemoryPlanError(ValueError):
    """No batch size fits the memory budget (the message names the fix)."""


def budget_bytes(total_bytes: float) -> float:
    """Bytes a plan may fill on a card of ``total_bytes``."""
    return total_bytes * USABLE_FRACTION - RESERVED_GIB * GIB


@dataclass(frozen=True)
class MemoryProfile:
    """Peak memory of a training step = ``fixed_bytes + batch x per_sample_bytes[mode]`` (mode off/on)."""
    fixed_bytes: float
    per_sample_bytes: dict
    source: str

    def peak(self, batch: int, checkpointing: bool) -> float:
        return self.fixed_bytes + batch * self.per_sample_bytes["on" if checkpointing else "off"]


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen per-worker batch, accumulation steps and checkpointing for ``preset``."""
    preset: str
    budget_gib: float
    workers: int
    global_batch: int
    batch_size: int
    accum_steps: int
    grad_checkpointing: list
    estimated_peak_gib: float
    profile: str
    batch_without_checkpointing: int | None = None  # the largest fitting batch without it (0: none fits)

    def describe(self) -> str:
        """The plan as the pipeline prints it."""
        ckpt = "off" if not any(self.grad_checkpointing) else (
            f"blocks per stage {self.grad_checkpointing} (without it: at most {self.batch_without_checkpointing} "
            "per worker)")
        return (f"memory plan ({self.preset}, budget {self.budget_gib:.1f} GiB per GPU): global batch "
                f"{self.global_batch} = {self.workers} workers x {self.batch_size} per worker x "
                f"{self.accum_steps} accumulation steps; activation checkpointing {ckpt}; estimated peak "
                f"{self.estimated_peak_gib:.1f} GiB per GPU ({self.profile})")

    def as_dict(self) -> dict:
        return {**asdict(self), "description": self.describe()}


def full_checkpointing(model: nn.Module) -> list[int]:
    """``grad_checkpointing`` counts that checkpoint every block of an OverLoCK model."""
    return [max(len(getattr(model, f"blocks{s + 1}", ())), len(getattr(model, f"sub_blocks{s + 1}", ())))
            for s in range(4)]


def _divisors_descending(n: int) -> list[int]:
    return sorted({d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}, reverse=True)


def plan_memory(profile: MemoryProfile, budget: float, workers: int, global_batch: int,
                checkpoint_all: list[int], preset: str = "custom") -> MemoryPlan:
    """The plan for ``workers`` GPUs of ``budget`` bytes each that keeps ``global_batch``."""
    if global_batch % workers:
        raise MemoryPlanError(f"pretrain.global_batch={global_batch} is not divisible by pretrain.workers="
                              f"{workers}: pick a worker count that divides it")
    per_worker = global_batch // workers

    def largest(checkpointing: bool) -> int | None:
        return next((b for b in _divisors_descending(per_worker) if profile.peak(b, checkpointing) <= budget),
                    None)

    off, on = largest(False), largest(True)
    if off is None and on is None:
        raise MemoryPlanError(
            f"even one image per worker needs {profile.peak(1, True) / GIB:.1f} GiB with activation "
            f"checkpointing, more than the {budget / GIB:.1f} GiB budget of memory_preset={preset}: use a larger "
            "GPU preset, a smaller model.size or pretrain.input_size")
    use_ckpt = off is None or (off < min(per_worker, EFFICIENT_BATCH) and on is not None and on >= 2 * off)
    batch = on if use_ckpt else off
    return MemoryPlan(preset=preset, budget_gib=budget / GIB, workers=workers, global_batch=global_batch,
                      batch_size=batch, accum_steps=per_worker // batch,
                      grad_checkpointing=list(checkpoint_all) if use_ckpt else [0, 0, 0, 0],
                      estimated_peak_gib=profile.peak(batch, use_ckpt) / GIB, profile=profile.source,
                      batch_without_checkpointing=off or 0)


# -- profiles ---------------------------------------------------------------------------------------
def _is_block(module: nn.Module) -> bool:
    return hasattr(module, "use_checkpoint")


def modelled_profile(model: nn.Module, input_size: int, precision: str) -> MemoryProfile:
    """A profile from one batch-2 CPU forward of ``model`` (train mode) at ``input_size``: the bytes
    autograd saves for the backward, attributed to the top-level blocks (modules with ``use_checkpoint``)."""
    saved = {"total": 0, "block": 0}
    seen: set[int] = set()
    per_block: list[tuple[int, int]] = []  # (bytes saved inside, bytes of the block's tensor inputs)

    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in seen:  # a storage saved twice (views) counts once
            seen.add(key)
            nbytes = t.untyped_storage().nbytes()
            saved["total"] += nbytes
            saved["block"] += nbytes
        return t

    def pre(module, args):
        saved["block"] = 0

    def post(module, args, output):
        inputs = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        per_block.append((saved["block"], inputs))

    # weights saved for the backward are parameters (in the fixed bytes), not activations
    seen.update(t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers()))
    blocks = [m for m in model.modules() if _is_block(m)]
    handles = [h for m in blocks for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    was_training, flags = model.training, [m.use_checkpoint for m in blocks]
    for m in blocks:
        m.use_checkpoint = False
    try:
        model.train()
        x = torch.randn(2, 3, input_size, input_size)  # 2: BatchNorm on a 1x1 map needs more than one value
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, flag in zip(blocks, flags):
            m.use_checkpoint = flag
        model.train(was_training)
    inside = sum(b for b, _ in per_block)
    outside = saved["total"] - inside
    off = saved["total"] / 2
    on = (outside + sum(i for _, i in per_block) + max((b for b, _ in per_block), default=0)) / 2
    scale = BACKWARD_TEMPORARIES * (AMP_ACTIVATION_FACTOR if precision in ("bf16", "fp16") else 1.0)
    params = sum(p.numel() for p in model.parameters())
    return MemoryProfile(fixed_bytes=params * BYTES_PER_PARAM, per_sample_bytes={"off": off * scale, "on": on * scale},
                         source=f"modelled from a CPU forward at {input_size} px, {precision}")


def measure_profile(run_steps: Callable[[int, bool], float], batches: tuple[int, int], source: str
                    ) -> MemoryProfile:
    """A profile from measured peaks: ``run_steps(batch, checkpointing)`` runs a few training steps and
    returns their peak bytes (on a GPU: ``torch.cuda.max_memory_allocated`` after a reset)."""
    small, large = batches
    per_sample, fixed = {}, []
    for mode, ckpt in (("off", False), ("on", True)):
        p_small, p_large = run_steps(small, ckpt), run_steps(large, ckpt)
        per_sample[mode] = max(p_large - p_small, 0.0) / (large - small)
        fixed.append(p_small - small * per_sample[mode])
    return MemoryProfile(fixed_bytes=max(fixed), per_sample_bytes=per_sample, source=source)


# -- the pipeline's use: params in, planned params out ---------------------------------------------------
def _cuda_peak_bytes(params, num_classes: int, batch: int, checkpointing: bool, steps: int = 2) -> float:
    """Peak ``torch.cuda.max_memory_allocated`` of ``steps`` training steps (synthetic images) of the
    recipe's model, optimizer and EMA at per-worker ``batch``."""
    from overlock.compute import autocast
    from overlock.training import recipe
    p, device = params.pretrain, torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model = recipe.build_model(params, num_classes).to(device)
    if checkpointing:
        recipe.apply_grad_checkpointing(model, full_checkpointing(model))
    optimizer = recipe.build_optimizer(p, model, 1e-4)
    ema = recipe.build_ema(p, model)
    criterion = nn.CrossEntropyLoss()
    try:
        for _ in range(steps):
            x = torch.randn(batch, 3, p.input_size, p.input_size, device=device)
            y = torch.randint(0, num_classes, (batch,), device=device)
            with autocast(params.compute.precision, device):
                out = model(x)
            recipe.recipe_loss(criterion, out, y, p.aux_loss_ratio).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device))
    finally:
        del model, optimizer, ema
        torch.cuda.empty_cache()


def measure_on_gpu(params, num_classes: int, batches: tuple[int, int] = (4, 8)) -> tuple[MemoryProfile, float]:
    """(measured profile, budget bytes) on this process's GPU (``memory_preset: auto``)."""
    props = torch.cuda.get_device_properties(0)
    profile = measure_profile(lambda b, c: _cuda_peak_bytes(params, num_classes, b, c), batches,
                              f"measured on {props.name} (torch.cuda.max_memory_allocated, batches {batches})")
    return profile, budget_bytes(props.total_memory)


def _auto_profile(params, num_classes: int) -> tuple[MemoryProfile, float]:
    if torch.cuda.is_available():
        return measure_on_gpu(params, num_classes)
    if params.pretrain.gpus_per_worker > 0:  # measure on a GPU of the Ray cluster
        import ray
        return ray.get(ray.remote(num_gpus=1)(measure_on_gpu).remote(params, num_classes))
    raise MemoryPlanError("pretrain.memory_preset=auto measures the peak memory on a GPU, but this run has "
                          "none (pretrain.gpus_per_worker=0): use memory_preset none, or a fixed preset "
                          "(11gb, 24gb, 40gb, 80gb) to plan for a card you will train on")


def plan_for_params(params, num_classes: int) -> MemoryPlan | None:
    """The plan of ``pretrain.memory_preset`` for these (effective) params; None for ``none``."""
    from overlock.training import recipe
    p = params.pretrain
    if p.memory_preset == "none":
        return None
    if p.memory_preset == "auto":
        profile, budget = _auto_profile(params, num_classes)
    else:
        profile = modelled_profile(recipe.build_model(params, num_classes), p.input_size, params.compute.precision)
        budget = budget_bytes(PRESET_GIB[p.memory_preset] * GIB)
    with torch.device("meta"):
        ckpt_all = full_checkpointing(recipe.build_model(params, num_classes))
    return plan_memory(profile, budget, p.workers, recipe.global_batch(p, p.workers), ckpt_all, p.memory_preset)


def apply_plan(params, plan: MemoryPlan | None):
    """``params`` with the plan's per-worker batch, global batch and checkpointing (unchanged for None)."""
    if plan is None:
        return params
    out = params.model_copy(deep=True)
    out.pretrain = params.pretrain.model_copy(update={
        "batch_size": plan.batch_size, "global_batch": plan.global_batch,
        "grad_checkpointing": list(plan.grad_checkpointing)})
    return out


def main(argv: list[str] | None = None) -> None:
    """Print the plan the pretrain stage would use: ``python -m overlock.training.memory_plan -S key=value``."""
    import argparse

    import yaml

    from overlock.params import load_params, parse_params
    from overlock.training import recipe
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, as dvc exp run -S does (repeatable)")
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    raw = load_params(args.params).model_dump(mode="json")
    for item in args.set:
        key, _, value = item.partition("=")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    params = recipe.effective_params(parse_params(raw, "params (with -S overrides)"))
    plan = plan_for_params(params, args.num_classes)
    if plan is None:
        print("pretrain.memory_preset=none: batch_size and grad_checkpointing are used as given")
        return
    planned = apply_plan(params, plan)
    print(plan.describe())
    print(f"learning rate {recipe.learning_rate(planned.pretrain, plan.workers):.3g} "
          f"(lr_base x global batch / 1024 = {planned.pretrain.lr_base} x {plan.global_batch} / 1024"
          f"{'' if planned.pretrain.lr is None else '; pretrain.lr is set and wins'})")


if __name__ == "__main__":
    main()
