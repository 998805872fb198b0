"""Gradient accumulation, activation checkpointing, memory presets and the FPN/CBAM variants (issue 23).

Cheap: tiny OverLoCK models on 32 px images (and a BN-free float64 conv net for the accumulation equivalence),
the real optimizer step (``OptimizerStep``) with the recipe's AdamW, cosine schedule, EMA and clipping; DDP is
a real single-process gloo group.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from overlock.params import ParamsError, parse_params
from overlock.training import recipe
from overlock.training.memory_plan import (GIB, MemoryPlanError, MemoryProfile, apply_plan, full_checkpointing,
                                           modelled_profile, plan_memory)
from overlock.training.step import OptimizerStep

TINY = {"depth": [1, 1, 1, 1], "sub_depth": [1, 1], "embed_dim": [8, 16, 32, 48], "sub_num_heads": [1, 2],
        "kernel_size": [5, 5, 5, 5], "projection": 32}
SIZE, CLASSES = 32, 4


def _params(**model):
    return parse_params({"model": {"overrides": TINY, "drop_path_rate": 0.0, **model},
                         "pretrain": {"epochs": 2, "warmup_epochs": 1, "clip_grad": 0.05, "ema_decay": 0.5}})


def _tiny(params, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return recipe.build_model(params, CLASSES)


def _stepper(params, model, accum: int, steps_per_epoch: int = 2):
    p = params.pretrain
    optimizer = recipe.build_optimizer(p, model, 1e-2)
    scheduler = recipe.build_scheduler(p, optimizer, steps_per_epoch)
    ema = recipe.build_ema(p, model)
    criterion = recipe.build_loss(p, None)

    def loss(m, x, y, step):  # recipe_loss without its float32 cast: float64 stays float64
        out = m(x)
        return criterion(out["main"], y) + p.aux_loss_ratio * criterion(out["aux"], y)
    return OptimizerStep(model, model, optimizer, scheduler, accum=accum, compute_loss=loss, ema=ema,
                         clip_grad=p.clip_grad), optimizer, ema


def _data(n: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=dtype), torch.randint(0, CLASSES, (n,), generator=g)


class _SmallNet(nn.Module):
    """A BN-free conv net with an aux output like OverLoCK's (float64 OverLoCK convolutions are slow on CPU)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.GELU(), nn.Conv2d(8, 16, 3, stride=2),
                                      nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head, self.aux_head = nn.Linear(16, CLASSES), nn.Linear(16, CLASSES)

    def forward(self, x):
        f = self.features(x)
        return {"main": self.head(f), "aux": self.aux_head(f)} if self.training else self.head(f)


def test_accumulated_micro_batches_give_the_update_of_one_large_batch():
    """3 micro-batches of 2 with accumulation == 1 batch of 6 through the recipe's AdamW, warmup + cosine
    schedule, clipping (active) and EMA: weights, EMA, LR, loss after 2 steps (float64, BN-free)."""
    params = _params()
    runs = {}
    for accum in (1, 3):
        torch.manual_seed(0)
        model = _SmallNet().double().train()
        step, optimizer, ema = _stepper(params, model, accum)
        losses = []
        for n in range(2):
            images, targets = _data(6, seed=n, dtype=torch.float64)
            micro = zip(images.split(6 // accum), targets.split(6 // accum))
            result = step(micro, n + 1)
            assert (result.micro_batches, result.images) == (accum, 6)
            losses.append(result.loss)
        runs[accum] = (model.state_dict(), ema.module.state_dict(), optimizer.param_groups[0]["lr"], losses)
    (w1, e1, lr1, l1), (w4, e4, lr4, l4) = runs[1], runs[3]
    assert lr1 == lr4 and l1 == pytest.approx(l4, rel=1e-12, abs=0)
    for key in w1:
        torch.testing.assert_close(w4[key], w1[key], rtol=1e-10, atol=1e-12, msg=key)
        torch.testing.assert_close(e4[key], e1[key], rtol=1e-10, atol=1e-12, msg=key)
    torch.manual_seed(0)
    start = _SmallNet().double().state_dict()
    assert any(not torch.equal(w1[k].double(), start[k].double()) for k in w1)  # the steps did update


def test_accumulating_micro_batches_do_not_all_reduce(tmp_path):
    """Under DDP only the last micro-batch of a step synchronizes gradients (real gloo group, world 1)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = nn.Linear(4, 2)
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = type("S", (), {"step_update": lambda self, step: None})()
        synced = []

        def loss(m, x, y, step):
            synced.append(m.require_backward_grad_sync)
            return nn.functional.cross_entropy(m(x), y)
        step = OptimizerStep(model, ddp, optimizer, sched, accum=3, compute_loss=loss)
        batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(6)]
        step(iter(batches[:3]), 1)
        step(iter(batches[3:]), 2)
        assert synced == [False, False, True] * 2
    finally:
        dist.destroy_process_group()


def test_too_few_micro_batches_fail_the_step():
    params = _params()
    step, _, _ = _stepper(params, _tiny(params), accum=3)
    with pytest.raises(RuntimeError, match="got 2 of its 3 micro-batches"):
        step(iter([_data(2, 0), _data(2, 1)]), 1)


def test_global_batch_accumulation_and_learning_rate_rule():
    demo = parse_params({})
    assert recipe.global_batch(demo.pretrain, 2) == 64 and recipe.accumulation_steps(demo.pretrain, 2) == 1
    official = recipe.effective_params(parse_params({"pretrain": {"recipe": "official"}})).pretrain
    assert (official.global_batch, official.batch_size, official.lr) == (2048, 256, None)
    assert recipe.accumulation_steps(official, 2) == 4
    assert recipe.learning_rate(official, 2) == pytest.approx(1e-3 * 2048 / 1024)  # official: 8 x 256, lr 2e-3
    odd = parse_params({"pretrain": {"global_batch": 100, "batch_size": 32}}).pretrain
    with pytest.raises(ValueError, match="not a multiple of workers x batch_size"):
        recipe.accumulation_steps(odd, 2)
    with pytest.raises(ParamsError, match="grad_checkpointing"):
        parse_params({"pretrain": {"grad_checkpointing": [1, 1]}})
    with pytest.raises(ParamsError, match="OverLoCK variants"):
        parse_params({"model": {"arch": "resnet50", "head": "fpn"}})


def test_grad_checkpointing_gives_identical_gradients():
    """Per-stage checkpointing (official --ckpt-stg) leaves every gradient unchanged, drop path included
    (float32: float64 OverLoCK convolutions are slow on CPU)."""
    params = parse_params({"model": {"overrides": TINY, "drop_path_rate": 0.2}})
    images, targets = _data(2, seed=5)
    grads = {}
    for counts in ([0, 0, 0, 0], [1, 0, 1, 1]):
        model = _tiny(params, seed=3).train()
        assert recipe.apply_grad_checkpointing(model, counts) == (0 if counts[0] == 0 else 1 + 2 + 2)
        torch.manual_seed(7)  # the same drop-path draws; checkpoint replays them in the recomputation
        out = model(images)
        recipe.recipe_loss(nn.CrossEntropyLoss(), out, targets, 0.4).backward()
        grads[tuple(counts)] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    plain, ckpt = grads[(0, 0, 0, 0)], grads[(1, 0, 1, 1)]
    assert plain.keys() == ckpt.keys() and len(plain) > 50
    for name in plain:  # the recomputation runs the same kernels on the same inputs
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-9, msg=name)
    with pytest.raises(ValueError, match="needs an OverLoCK model"):
        recipe.apply_grad_checkpointing(nn.Linear(2, 2), [1, 0, 0, 0])


def test_memory_planner_keeps_the_global_batch_and_fits_the_budget():
    gib = GIB
    profile = MemoryProfile(fixed_bytes=2 * gib, per_sample_bytes={"off": 0.5 * gib, "on": 0.1 * gib}, source="t")
    full = [2, 2, 3, 2]
    roomy = plan_memory(profile, 200 * gib, workers=2, global_batch=512, checkpoint_all=full)
    assert (roomy.batch_size, roomy.accum_steps, roomy.grad_checkpointing) == (256, 1, [0, 0, 0, 0])
    tight = plan_memory(profile, 10 * gib, workers=2, global_batch=512, checkpoint_all=full)  # off: 16, on: 64
    assert (tight.batch_size, tight.accum_steps, tight.grad_checkpointing) == (64, 4, full)
    assert tight.estimated_peak_gib <= 10 and "2 workers x 64 per worker x 4 accumulation steps" in tight.describe()
    mid = plan_memory(profile, 60 * gib, workers=2, global_batch=512, checkpoint_all=full)  # off: 64 is efficient
    assert (mid.batch_size, mid.accum_steps, mid.grad_checkpointing) == (64, 4, [0, 0, 0, 0])
    odd = plan_memory(profile, 10 * gib, workers=3, global_batch=96, checkpoint_all=full)  # divisors of 32 only
    assert 3 * odd.batch_size * odd.accum_steps == 96
    with pytest.raises(MemoryPlanError, match="larger GPU preset"):
        plan_memory(profile, 2 * gib, workers=2, global_batch=512, checkpoint_all=full)
    with pytest.raises(MemoryPlanError, match="not divisible"):
        plan_memory(profile, 10 * gib, workers=3, global_batch=512, checkpoint_all=full)


def test_modelled_profile_and_plan_for_a_real_model():
    """The CPU-modelled per-sample memory of a tiny OverLoCK: checkpointing keeps fewer activations, and the
    planned params reach the global batch with the plan's batch size."""
    params = parse_params({"model": {"overrides": TINY}, "pretrain": {"input_size": SIZE, "global_batch": 256}})
    model = recipe.build_model(params, CLASSES)
    profile = modelled_profile(model, SIZE, "fp32")
    off, on = profile.per_sample_bytes["off"], profile.per_sample_bytes["on"]
    assert 0 < on < off and profile.fixed_bytes == 20 * sum(p.numel() for p in model.parameters())
    assert not any(m.use_checkpoint for m in model.modules() if hasattr(m, "use_checkpoint"))  # restored
    budget = profile.fixed_bytes + 20 * on  # room for 20 checkpointed images per worker
    plan = plan_memory(profile, budget, 2, 256, full_checkpointing(model))
    planned = apply_plan(params, plan).pretrain
    assert plan.grad_checkpointing == [1, 1, 1, 1] and plan.batch_size == 16
    assert recipe.accumulation_steps(planned, 2) == plan.accum_steps == 8
    assert recipe.learning_rate(planned.model_copy(update={"lr": None}), 2) == pytest.approx(1e-3 * 256 / 1024)


def test_fpn_head_starts_as_the_plain_model():
    """The zero-initialised pyramid fusion: the plain model's function (its weights load by name)."""
    plain, fpn = _tiny(_params(), seed=2), _tiny(_params(head="fpn"), seed=2)
    assert set(plain.state_dict()) < set(fpn.state_dict())  # the plain names are all there, unchanged
    fpn.load_state_dict(plain.state_dict(), strict=False)
    x, _ = _data(2, seed=9)
    torch.testing.assert_close(fpn.eval()(x), plain.eval()(x))


def test_head_variants_train_through_the_real_step():
    """FPN-fused head + CBAM (model.head / model.attention) through OptimizerStep with accumulation."""
    params = _params(head="fpn", attention="cbam")
    model = _tiny(params, seed=2).train()
    x, y = _data(4, seed=9)
    before = copy.deepcopy(model.state_dict())
    step, _, _ = _stepper(params, model, accum=2)
    result = step(zip(x.split(2), y.split(2)), 1)
    assert torch.isfinite(torch.tensor(result.loss))
    new = [k for k in model.state_dict() if k.startswith(("pyramid_fusion.", "cbam.")) and "running" not in k
           and "num_batches" not in k]
    assert new and all(not torch.equal(model.state_dict()[k], before[k]) for k in new if k.endswith("weight"))


def test_variants_count_more_parameters():
    """A full-size OverLoCK builds with both variants (meta device) and gains only the new modules."""
    for size in ("t",):  # every size shares the code path; T is the README's example
        counts = {}
        for head, attention in (("plain", "none"), ("fpn", "cbam")):
            params = parse_params({"model": {"size": size, "head": head, "attention": attention}})
            with torch.device("meta"):
                model = recipe.build_model(params, 1000)
            counts[head] = sum(p.numel() for p in model.parameters())
            extra = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("pyramid_fusion", "cbam")))
        assert counts["fpn"] - counts["plain"] == extra > 0, size
