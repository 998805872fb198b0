"""pretrain.elastic_scaling: how the per-worker batch, global batch and LR follow the live worker count, and
the LR a resumed optimizer/scheduler continues with (no Ray: the multi-node run is in tests/test_pretrain.py)."""
import pytest
import torch

from overlock.params import ParamsError, parse_params
from overlock.training import elastic, recipe


def _p(**pretrain):
    return parse_params({"pretrain": {"workers": 4, "batch_size": 32, **pretrain}}).pretrain


def test_keep_global_batch_grows_the_per_worker_batch_and_keeps_the_lr():
    p = _p(min_workers=2, lr=None)
    assert elastic.worker_range(p) == (2, 4)
    assert [elastic.per_worker_batch(p, n) for n in (4, 3, 2)] == [32, 42, 64]
    assert [elastic.global_batch(p, n) for n in (4, 2)] == [128, 128]
    assert elastic.learning_rate(p, 2) == elastic.learning_rate(p, 4) == pytest.approx(1e-3 * 128 / 1024)


def test_scale_lr_keeps_the_per_worker_batch_and_scales_the_lr_linearly():
    for lr in (None, 4e-3):  # the official rule and an explicit LR follow the same linear rule
        p = _p(min_workers=1, elastic_scaling="scale_lr", lr=lr)
        assert [elastic.per_worker_batch(p, n) for n in (4, 1)] == [32, 32]
        assert elastic.global_batch(p, 2) == 64
        assert elastic.learning_rate(p, 2) == pytest.approx(recipe.learning_rate(p, 4) / 2)
    p = _p(elastic_scaling="scale_lr", lr=None)  # = the official rule on the live global batch
    assert elastic.learning_rate(p, 2) == pytest.approx(1e-3 * 64 / 1024)


def test_fixed_worker_count_and_a_bad_range():
    assert elastic.worker_range(_p()) == 4 and elastic.worker_range(_p(min_workers=4)) == 4
    with pytest.raises(ParamsError, match="min_workers=5 is above pretrain.workers=4"):
        _p(min_workers=5)


def test_a_resumed_schedule_continues_with_the_lr_of_the_new_worker_count():
    p = _p(min_workers=1, elastic_scaling="scale_lr", lr=4e-3, epochs=4, warmup_epochs=1, min_lr=0, warmup_lr=0)
    model = torch.nn.Linear(2, 2)

    def build(world):
        opt = recipe.build_optimizer(p, model, elastic.learning_rate(p, world))
        return opt, recipe.build_scheduler(p, opt, steps_per_epoch=10)
    opt4, sched4 = build(4)
    for step in range(1, 16):
        sched4.step_update(step)
    opt2, sched2 = build(2)  # a restart on 2 workers loads the 4-worker state ...
    opt2.load_state_dict(opt4.state_dict())
    sched2.load_state_dict(sched4.state_dict())
    elastic.rescale_schedule(opt2, sched2, elastic.learning_rate(p, 2) / elastic.learning_rate(p, 4))
    for step in (16, 30):  # ... and continues at half the LR of the 4-worker schedule
        sched2.step_update(step)
        sched4.step_update(step)
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt4.param_groups[0]["lr"] / 2)


def test_mlflow_records_the_rule_and_the_lr_and_batch_per_worker_count():
    from overlock.training.pretrain import _elastic_params
    recorded = _elastic_params(_p(min_workers=2, elastic_scaling="scale_lr", lr=4e-3))
    assert recorded == {"workers": "2..4", "scaling": "scale_lr",
                        "lr_per_workers": {2: pytest.approx(2e-3), 3: pytest.approx(3e-3), 4: pytest.approx(4e-3)},
                        "global_batch_per_workers": {2: 64, 3: 96, 4: 128}}
