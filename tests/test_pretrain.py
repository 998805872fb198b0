"""Ray Train pretraining stage: real Ray (2 CPU workers, gloo), real MLflow sqlite store, a tiny OverLoCK,
32 px demo-like data. Fault tests SIGKILL the real Ray worker / stage process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from overlock.params import parse_params
from overlock.pipeline.context import open_stage

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = {"depth": [1, 1, 1, 1], "sub_depth": [1, 1], "embed_dim": [16, 32, 32, 48], "sub_num_heads": [1, 2],
        "projection": 64}
NUM_CLASSES = 4
HUES = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (220, 200, 40)]


def _image(cls: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A noisy background with a square of the class colour at a random place (learnable, not trivial)."""
    img = rng.integers(60, 140, (size, size, 3)).astype(np.int16)
    s = int(rng.integers(14, 22))
    x, y = rng.integers(0, size - s, 2)
    img[y:y + s, x:x + s] = np.array(HUES[cls]) + rng.integers(-30, 30, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A classification dataset in the on-disk contract layout (train/val/classes.json/splits.json)."""
    data = tmp_path_factory.mktemp("datasets")
    root = data / "classification"
    rng = np.random.default_rng(0)
    classes, calibration = [], []
    for c in range(NUM_CLASSES):
        cid = f"c{c}"
        classes.append({"id": cid, "name": f"colour {c}"})
        for split, n in (("train", 40), ("val", 12)):
            (root / split / cid).mkdir(parents=True)
            for i in range(n):
                _image(c, rng).save(root / split / cid / f"{i:03d}.png")
        calibration += [f"train/{cid}/{i:03d}.png" for i in range(2)]
    (root / "classes.json").write_text(json.dumps(classes))
    (root / "splits.json").write_text(json.dumps({"calibration": calibration, "excluded": []}))
    return data


def _raw_params(tmp: Path, **pretrain) -> dict:
    return {"seed": 0, "model": {"overrides": TINY},
            "pretrain": {"epochs": 2, "batch_size": 8, "lr": 1e-2, "min_lr": 1e-4, "warmup_epochs": 0, "input_size": 32,
                         "workers": 2, "cpus_per_worker": 1, "ema_decay": 0.7, "log_every_steps": 1,
                         "max_failures": 1, "storage_path": str(tmp / "ray"), **pretrain},
            "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "register_models": False}}


def _paths(tmp: Path, data: Path) -> dict:
    return {"data": data, "out": tmp / "models" / "classifier", "metrics": tmp / "metrics" / "pretrain.json",
            "plots": tmp / "plots" / "pretrain"}


def _run_stage(params, paths):
    from overlock.training.pretrain import run_pretrain
    with open_stage("pretrain", params, **paths) as ctx:
        summary = run_pretrain(ctx)
    return ctx.run, summary


def _hold(hooks: Path, hold_s: float) -> dict:
    """pretrain.callbacks entry of the kill tests (tests/fault_hooks.py, imported by every Ray worker)."""
    return {"target": "fault_hooks:HoldAfterFirstStep", "kwargs": {"pid_dir": str(hooks), "hold_s": hold_s}}


@pytest.fixture
def repo_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("OVERLOCK_REPO", str(tmp_path))
    torch.set_num_threads(1)
    return tmp_path


def _steps(run, key: str) -> list[int]:
    return sorted(s for s, _ in run.metric_history(key))


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.2)


def _wait_gone(pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def test_two_workers_learn_survive_a_killed_worker_and_write_outputs(ray_local, demo_data, repo_tmp):
    """2 CPU workers, 2 epochs; rank 1's Ray worker process is SIGKILLed mid-epoch 2 (max_failures=1)."""
    hooks = repo_tmp / "hooks"
    hooks.mkdir()
    killed = {}

    def killer():
        marker = hooks / "rank1_epoch1.pid"
        _wait_for(marker, timeout=900)  # Ray's start and epoch 1 (minutes on a loaded 2-core machine)
        killed["pid"] = int(marker.read_text())
        os.kill(killed["pid"], signal.SIGKILL)  # the real Ray worker process of rank 1, mid-epoch 2

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    params = parse_params(_raw_params(repo_tmp, callbacks=[_hold(hooks, 10)]))
    paths = _paths(repo_tmp, demo_data)
    run, summary = _run_stage(params, paths)
    thread.join(timeout=5)

    # the kill happened and the retry resumed from the epoch-1 checkpoint (first attempt started at 0)
    assert killed, "the worker was never killed"
    assert (hooks / "resumed_rank0.txt").read_text().split() == ["1"]
    # learned: well above chance (25 %) on the validation split, same epoch count as without the kill
    assert summary["best_val_top1"] >= 60.0, summary
    assert summary["epochs"] == 2
    # MLflow: params, per-epoch and per-step metrics (each step exactly once), checkpoint artifacts
    data = run.client.get_run(run.run_id).data
    assert data.params["pretrain.epochs"] == "2" and data.params["effective.global_batch"] == "16"
    for key in ("val_top1", "val_top1_ema", "train_loss", "img_per_sec", "epoch_time_s", "world_size"):
        assert _steps(run, key) == [1, 2], key
    # the elastic rule is recorded (a fixed worker count here: 2..2, the global batch of 2 workers each epoch)
    assert data.params["elastic.scaling"] == "keep_global_batch" and data.params["elastic.workers"] == "2..2"
    assert [v for _, v in sorted(run.metric_history("global_batch"))] == [16.0, 16.0]
    assert _steps(run, "train/loss") == list(range(1, 2 * 9 + 1))  # none lost, none duplicated
    artifacts = {a.path for a in run.client.list_artifacts(run.run_id, "checkpoints")}
    assert {"checkpoints/best.pth", "checkpoints/final.pth"} <= artifacts
    assert run.client.get_run(run.run_id).info.status == "FINISHED"

    # outputs in the contract format; final.pth loads into the model and reproduces its val accuracy
    out = paths["out"]
    final = torch.load(out / "final.pth", weights_only=True)
    best = torch.load(out / "best.pth", weights_only=True)
    assert final["epoch"] == 2 and final["num_classes"] == NUM_CLASSES and final["model_kwargs"] == TINY
    assert [c["id"] for c in final["classes"]] == [f"c{i}" for i in range(NUM_CLASSES)]
    assert "state_dict_ema" in final and best["epoch"] in (1, 2)
    info = json.loads((out / "model.json").read_text())
    assert info["timm_name"] == "overlock_xt" and info["input_size"] == [3, 32, 32]
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1, 2]
    import timm
    import overlock.models  # noqa: F401
    model = timm.create_model(info["timm_name"], num_classes=final["num_classes"], **final["model_kwargs"])
    model.load_state_dict(final["state_dict"])
    from overlock.training import recipe
    from overlock.training.loop import evaluate, load_datasets
    _, val_tf = recipe.build_transforms(params.pretrain, recipe.data_config(model, 32))
    _, val, _ = load_datasets(demo_data, None, val_tf)
    top1, _ = evaluate(model, torch.utils.data.DataLoader(val, batch_size=16), torch.device("cpu"), "fp32")
    assert top1 == pytest.approx(final["metrics"]["val_top1"], abs=1e-6)
    # DVC metrics and plots
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["final_val_top1"] == pytest.approx(final["metrics"]["val_top1"])
    header = (paths["plots"] / "epochs.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,val_top1,val_top1_ema,val_top5,lr"


@pytest.mark.slow
def test_killed_stage_rerun_resumes_same_ray_and_mlflow_run(ray_local, demo_data, repo_tmp):
    hooks = repo_tmp / "hooks"
    hooks.mkdir()
    params_file = repo_tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(_raw_params(repo_tmp, callbacks=[_hold(hooks, 20)])))
    paths = _paths(repo_tmp, demo_data)
    cmd = [PY, str(REPO / "pipelines" / "pretrain.py"), "--params", str(params_file),
           *[a for k, v in paths.items() for a in (f"--{k}", str(v))]]
    env = {**os.environ, "OVERLOCK_REPO": str(repo_tmp), "RAY_ADDRESS": ray_local, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    log1 = (repo_tmp / "first.log").open("w")
    first = subprocess.Popen(cmd, cwd=repo_tmp, env=env, stdout=log1, stderr=subprocess.STDOUT)
    try:
        _wait_for(hooks / "rank0_epoch1.pid", timeout=180)
        snapshots = list((repo_tmp / "ray").glob("pretrain-*/checkpoint_manager_snapshot.json"))
        assert snapshots, "the epoch-1 checkpoint is not registered yet"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    for marker in hooks.glob("rank*_epoch1.pid"):
        _wait_gone(int(marker.read_text()))
    assert not paths["out"].exists()  # nothing that looks like a finished output

    second = subprocess.run(cmd, cwd=repo_tmp, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert (hooks / "resumed_rank0.txt").read_text().split() == ["1"]  # epoch 1 not repeated

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{repo_tmp}/mlflow.db")
    exp = client.get_experiment_by_name("overlock-pipeline")
    runs = client.search_runs([exp.experiment_id], "tags.`overlock.stage` = 'pretrain'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same child run, continued
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_top1"))
    assert steps == [1, 2]
    loss_steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert loss_steps == list(range(1, 2 * 9 + 1))
    assert torch.load(paths["out"] / "final.pth", weights_only=True)["epoch"] == 2


def test_nan_loss_stops_with_error_naming_the_step(ray_local, demo_data, repo_tmp):
    """Also: the Ray worker applies the pipeline's compute params itself (ContMix backend, its CPU share as
    threads), nothing inherited through the environment."""
    from overlock.training.loop import NonFiniteLossError
    hooks = [{"target": "fault_hooks:PoisonLoss", "kwargs": {"step": 3}},
             {"target": "fault_hooks:RecordCompute", "kwargs": {"out_dir": str(repo_tmp)}}]
    raw = _raw_params(repo_tmp, workers=1, epochs=1, max_failures=2, callbacks=hooks)
    params = parse_params({**raw, "compute": {"contmix_backend": "gather"}})
    paths = _paths(repo_tmp, demo_data)
    with pytest.raises(NonFiniteLossError, match=r"global step 3 .*lower pretrain\.lr"):
        _run_stage(params, paths)
    worker = json.loads((repo_tmp / "compute_rank0.json").read_text())
    assert worker["pid"] != os.getpid()
    assert worker["contmix_backend"] == "gather" and worker["threads"] == 1
    assert not paths["out"].exists() and not paths["metrics"].exists()
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{repo_tmp}/mlflow.db")
    exp = client.get_experiment_by_name("overlock-pipeline")
    (child,) = client.search_runs([exp.experiment_id], "tags.`overlock.stage` = 'pretrain'")
    assert child.info.status == "FAILED" and "global step 3" in child.data.tags["overlock.error"]
    # terminal, not retried: steps 1-2 were logged once, and nothing after the poisoned step
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "train/loss")) == [1, 2]
