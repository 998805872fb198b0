"""The pretraining recipe (timm parts, official switch) and the non-finite-loss guard, without Ray."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from overlock.params import parse_params
from overlock.training import recipe
from overlock.training.callbacks import TrainCallback
from overlock.training.loop import NonFiniteLossError, loss_with_fallback


def test_official_recipe_sets_paper_values_but_keeps_explicit_choices():
    ref = recipe.official_recipe_reference()
    params = parse_params({"pretrain": {"recipe": "official", "epochs": 30}})
    eff = recipe.effective_params(params).pretrain
    assert eff.epochs == 30  # changed by the user: kept
    for key in ("weight_decay", "warmup_epochs", "cooldown_epochs", "mixup", "cutmix", "reprob", "ema_decay",
                "randaugment", "smoothing", "aux_loss_ratio", "min_lr", "warmup_lr"):
        want = ref[key] if isinstance(ref[key], str) else pytest.approx(ref[key])
        assert getattr(eff, key) == want, key
    assert recipe.effective_params(params).compute.precision == "bf16"  # AMP as in the paper
    assert recipe.learning_rate(eff, world_size=8) == pytest.approx(1e-3 * 256 * 8 / 1024)
    demo = parse_params({})
    assert recipe.effective_params(demo) is demo  # the demo recipe is the params as given


def test_schedule_warms_up_decays_and_cools_down():
    p = parse_params({"pretrain": {"epochs": 10, "warmup_epochs": 2, "cooldown_epochs": 2, "lr": 1e-3,
                                   "min_lr": 1e-5, "warmup_lr": 1e-6}}).pretrain
    model = nn.Linear(4, 2)
    opt = recipe.build_optimizer(p, model, 1e-3)
    sched = recipe.build_scheduler(p, opt, steps_per_epoch=10)
    lrs = []
    for step in range(100):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6) and max(lrs) == pytest.approx(1e-3, rel=0.05)
    assert lrs[19] > lrs[20 + 30] > lrs[79]  # cosine decay after warmup
    assert lrs[85] == pytest.approx(1e-5) and lrs[99] == pytest.approx(1e-5)  # cooldown at min_lr
    # no weight decay on biases (AdamW groups from timm)
    decays = {tuple(t.shape): g["weight_decay"] for g in opt.param_groups for t in g["params"]}
    assert decays[(2,)] == 0.0 and decays[(2, 4)] == pytest.approx(p.weight_decay)


def test_mixup_loss_and_aux_weighting():
    p = parse_params({"pretrain": {"mixup": 0.8, "cutmix": 1.0}}).pretrain
    mixup = recipe.build_mixup(p, num_classes=3)
    assert type(recipe.build_loss(p, mixup)).__name__ == "SoftTargetCrossEntropy"
    assert recipe.build_mixup(parse_params({}).pretrain, 3) is None
    crit = nn.CrossEntropyLoss()
    main, aux, target = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    expected = crit(main, target) + 0.4 * crit(aux, target)
    assert recipe.recipe_loss(crit, {"main": main, "aux": aux}, target, 0.4) == pytest.approx(expected.item())
    assert recipe.recipe_loss(crit, (main, aux), target, 0.4) == pytest.approx(expected.item())
    assert recipe.recipe_loss(crit, main, target, 0.4) == pytest.approx(crit(main, target).item())


class _NanUnderBf16(nn.Module):
    """Finite in fp32, NaN when autocast runs it in bf16 (stands in for an AMP overflow)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return y * float("nan") if y.dtype == torch.bfloat16 else y


class _PoisonStep(TrainCallback):
    def __init__(self, step: int):
        self.step = step

    def transform_loss(self, loss, step):
        return loss * float("nan") if step == self.step else loss


def test_amp_non_finite_loss_retries_in_fp32_then_fails(caplog):
    model, x, y = _NanUnderBf16(), torch.randn(2, 4), torch.tensor([0, 1])
    crit, cpu = nn.CrossEntropyLoss(), torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="overlock.pretrain"):
        loss = loss_with_fallback(model, x, y, crit, 0.4, "bf16", cpu, step=7)
    assert torch.isfinite(loss) and "retrying the step in fp32" in caplog.text
    loss.backward()  # the fp32 retry is a normal differentiable loss
    with pytest.raises(NonFiniteLossError, match="global step 12 .*fp32 retry too"):
        loss_with_fallback(model, x, y, crit, 0.4, "bf16", cpu, step=12, callbacks=_PoisonStep(12))


def test_bad_inputs_fail_before_any_training(tmp_path, monkeypatch):
    from overlock.pipeline.context import open_stage
    from overlock.training.pretrain import run_pretrain
    monkeypatch.setenv("OVERLOCK_REPO", str(tmp_path))
    paths = {"data": tmp_path / "missing", "out": tmp_path / "out", "metrics": tmp_path / "m.json",
             "plots": tmp_path / "plots"}
    raw = {"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    with pytest.raises(FileNotFoundError, match="run the extract stage"):
        with open_stage("pretrain", parse_params(raw), **paths) as ctx:
            run_pretrain(ctx)
    fp16 = parse_params({**raw, "compute": {"precision": "fp16"}})
    with pytest.raises(ValueError, match="fp16 needs GPUs"):
        with open_stage("pretrain", fp16, **paths) as ctx:
            run_pretrain(ctx)
    assert not paths["out"].exists() and not paths["metrics"].exists()
