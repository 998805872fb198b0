"""The segment stage end to end on a tiny generated ADE20K-format set: init from the pretrain output, UperNet
training on CPU, SIGKILL + resume, mIoU/mAcc/aAcc and the pixel calibration in the DVC metrics file and in
MLflow, ``segment.mode: evaluate`` on the trained checkpoint, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("mmseg")

REPO = Path(__file__).resolve().parents[1]
TINY = {"depth": [1, 1, 1, 1], "sub_depth": [1, 1], "embed_dim": [16, 32, 64, 96], "kernel_size": [7, 7, 7, 7]}
MAX_ITERS = 12
CKPT_EVERY = 4


def write_demo_segmentation_layout(data_dir: Path, n_train: int = 16, n_val: int = 4, size: int = 64) -> list[str]:
    """The extract stage's segmentation layout, built from the demo archive by the extract code itself."""
    from types import SimpleNamespace

    from overlock.data.demo import write_demo_ade
    from overlock.data.seg_layouts import build_ade, segmentation_splits

    demo = SimpleNamespace(seg_train_images=n_train, seg_val_images=n_val, seg_image_size=size)
    archive = write_demo_ade(demo, 0, data_dir / "archives")[0]
    build_ade(archive, data_dir / "segmentation")
    report = segmentation_splits(data_dir / "segmentation", 0, 4, "full")
    return report["class_names"]


def _params(store: str, **segment) -> dict:
    return {"seed": 0, "model": {"arch": "overlock", "size": "xt", "overrides": TINY},
            "data": {"segmentation_dataset": "demo_ade"},
            "segment": {"max_iters": MAX_ITERS, "checkpoint_interval": CKPT_EVERY, "crop_size": [64, 64],
                        "head_channels": 16, "samples_per_gpu": 2, "figure_images": 2, **segment},
            "tracking": {"uri": store, "experiment": "segment-test"}, "compute": {"threads": 1}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, pretrain_output):
    root = tmp_path_factory.mktemp("segrepo")
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    classes = write_demo_segmentation_layout(root / "data" / "datasets")
    pretrain_output(root / "models" / "classifier", TINY)
    store = f"sqlite:///{root / 'mlflow.db'}"
    (root / "params.yaml").write_text(yaml.safe_dump(_params(store)))
    return {"root": root, "store": store, "classes": classes}


def _stage_cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "stages.segment", "--params", str(root / "params.yaml"),
            "--data", str(root / "data/datasets"), "--classifier", str(root / "models/classifier"),
            "--out", str(root / "models/segmenter"), "--metrics", str(root / "metrics/segment.json"),
            "--plots", str(root / "plots/segment")]


def _env(root: Path) -> dict:
    return {**os.environ, "OVERLOCK_REPO": str(root), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def killed_and_resumed(workspace):
    """Run the real stage, SIGKILL it after the first checkpoint, then re-run it to the end."""
    root = workspace["root"]
    state = root / ".overlock" / "state" / "segment"
    with (root / "run1.log").open("w") as log1:
        proc = subprocess.Popen(_stage_cmd(root), cwd=REPO, env=_env(root), stdout=log1, stderr=subprocess.STDOUT)
        deadline = time.time() + 600  # generous: a loaded 2-core machine
        while time.time() < deadline and proc.poll() is None and not list(state.glob(f"*/iter_{CKPT_EVERY}.pth")):
            time.sleep(0.2)
        assert proc.poll() is None, (root / "run1.log").read_text()[-3000:]
        assert list(state.glob(f"*/iter_{CKPT_EVERY}.pth")), "no checkpoint before the deadline"
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = {"out_exists": (root / "models/segmenter").exists(),
              "metrics_exists": (root / "metrics/segment.json").exists()}
    second = subprocess.run(_stage_cmd(root), cwd=REPO, env=_env(root), capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    return {**workspace, "killed": killed, "log": second.stderr}


def _child_run(store: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("segment-test")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`overlock.stage` = 'segment'")
    return client, runs


@pytest.mark.slow
def test_killed_stage_resumes_from_last_checkpoint(killed_and_resumed):
    root = killed_and_resumed["root"]
    assert not killed_and_resumed["killed"]["out_exists"], "a killed run must not leave outputs"
    assert not killed_and_resumed["killed"]["metrics_exists"]
    result = json.loads((root / "models/segmenter/metrics.json").read_text())
    assert CKPT_EVERY <= result["info"]["resumed_from_iter"] < MAX_ITERS
    assert result["info"]["init"] == "raw" and result["info"]["init_loaded"] > 50
    rows = (root / "plots/segment/loss.csv").read_text().split()
    assert rows[0] == "iter,loss"
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, MAX_ITERS + 1))
    client, runs = _child_run(killed_and_resumed["store"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, MAX_ITERS + 1))
    assert "resum" in killed_and_resumed["log"].lower()


@pytest.mark.slow
def test_metrics_reach_dvc_and_mlflow(killed_and_resumed):
    root = killed_and_resumed["root"]
    metrics = json.loads((root / "metrics/segment.json").read_text())
    for key in ("mIoU", "mAcc", "aAcc"):
        assert 0.0 <= metrics[key] <= 1.0, metrics
    assert metrics["aAcc"] >= metrics["mIoU"]
    assert metrics["temperature"] > 0 and metrics["nll_after"] <= metrics["nll_before"] + 1e-6
    assert {"ece_before", "ece_after"} <= set(metrics)
    client, runs = _child_run(killed_and_resumed["store"])
    logged = runs[0].data.metrics
    assert logged["mIoU"] == pytest.approx(metrics["mIoU"]) and "train/decode.loss_ce" in logged
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "segmenter")}
    assert {"segmenter/segmenter.pth", "segmenter/config.py", "segmenter/masks.png",
            "segmenter/reliability.png", "segmenter/per_class_iou.json"} <= artifacts
    assert not client.search_model_versions("name='overlock-segmenter'")  # logged, not registered (no pyfunc)
    per_class = json.loads((root / "models/segmenter/per_class_iou.json").read_text())
    assert [r["class"] for r in per_class] == killed_and_resumed["classes"]
    cal = json.loads((root / "models/segmenter/temperature.json").read_text())
    assert cal["fitted_on"] == "calibration" and cal["pixels"]["val"] > 1000


@pytest.mark.slow
def test_outputs_load_and_evaluate_mode_reproduces_the_metrics(killed_and_resumed, tmp_path, monkeypatch):
    """The trained ``segmenter.pth`` (mmseg names) and ``config.py`` rebuild the model, and ``segment.mode:
    evaluate`` on that file (loaded weights_only, every name and shape checked) gives the same mIoU."""
    from mmcv import Config

    from overlock.params import parse_params
    from overlock.pipeline.context import open_stage
    from overlock.segmentation.stage import run_segment

    root = killed_and_resumed["root"]
    cfg = Config.fromfile(str(root / "models/segmenter/config.py"))
    assert cfg.model.decode_head.num_classes == len(killed_and_resumed["classes"])
    assert all(h["type"] != "MlflowLossHook" for h in cfg.get("custom_hooks", []))
    params = parse_params(_params(killed_and_resumed["store"], mode="evaluate",
                                  checkpoint=str(root / "models/segmenter/segmenter.pth")))
    params.tracking.register_models = False
    monkeypatch.setenv("OVERLOCK_REPO", str(root))
    with open_stage("segment", params, track=False, data=root / "data/datasets",
                    classifier=root / "models/classifier", out=tmp_path / "seg", metrics=tmp_path / "m.json",
                    plots=tmp_path / "plots") as ctx:
        metrics = run_segment(ctx)
    trained = json.loads((root / "metrics/segment.json").read_text())
    for key in ("mIoU", "mAcc", "aAcc"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-6)


def test_missing_inputs_fail_clearly_without_outputs(workspace, tmp_path):
    from overlock.params import parse_params
    from overlock.pipeline.context import open_stage
    from overlock.segmentation.stage import run_segment

    root = workspace["root"]
    out = tmp_path / "segmenter"

    def run(params, data, classifier):
        with open_stage("segment", params, track=False, data=data, classifier=classifier, out=out,
                        metrics=tmp_path / "m.json", plots=tmp_path / "plots") as ctx:
            run_segment(ctx)

    params = parse_params(_params(workspace["store"]))
    with pytest.raises(FileNotFoundError, match="extract"):
        run(params, tmp_path / "nodata", root / "models/classifier")
    with pytest.raises(FileNotFoundError, match="pretrain"):
        run(params, root / "data/datasets", tmp_path / "noclassifier")
    with pytest.raises(ValueError, match="segment.checkpoint"):
        run(parse_params(_params(workspace["store"], mode="evaluate")), root / "data/datasets",
            root / "models/classifier")
    assert not out.exists() and not (tmp_path / "m.json").exists()
    # a baseline architecture has no segmentation backbone: the outputs say the stage was skipped, and why
    run(parse_params({**_params(workspace["store"]), "model": {"arch": "resnet50"}}), root / "data/datasets",
        root / "models/classifier")
    assert json.loads((out / "metrics.json").read_text())["status"] == "skipped"
    assert "model.arch=resnet50" in json.loads((tmp_path / "m.json").read_text())["reason"]
    assert not (out / "segmenter.pth").exists()


def test_demo_layout_splits_are_disjoint_and_labels_valid(workspace):
    import numpy as np
    from PIL import Image

    from overlock.data.datasets import segmentation_classes, segmentation_split_files

    root = workspace["root"] / "data/datasets"
    files = segmentation_split_files(root)
    names = {k: Path(v["split"]).read_text().split() for k, v in files.items()}
    assert len(names["train"]) == 12 and len(names["calibration"]) == 4 and len(names["val"]) == 4
    assert not set(names["train"]) & set(names["calibration"])
    assert segmentation_classes(root) == ["wall", "floor", "disc", "box", "triangle", "ring"]
    labels = np.concatenate([np.asarray(Image.open(Path(files["train"]["ann_dir"]) / f"{n}.png")).ravel()
                             for n in names["train"]])
    counts = np.bincount(labels, minlength=7)
    assert labels.max() <= 6 and (counts > 0).all()  # every class and some unlabelled seams


def test_segment_params_are_validated():
    from overlock.params import ParamsError, parse_params
    from overlock.pipeline.spec import STAGES, result_keys

    with pytest.raises(ParamsError, match="segment.schedule"):
        parse_params({"segment": {"schedule": "80k"}})
    with pytest.raises(ParamsError, match="data.segmentation_dataset"):
        parse_params({"data": {"segmentation_dataset": "cityscapes"}})
    keys = result_keys(STAGES["segment"], parse_params({}).model_dump(mode="json"))
    assert "segment.checkpoint_interval" not in keys and "segment.lr" in keys  # operational vs result


@pytest.mark.slow
def test_torchrun_launcher_trains_with_two_processes(tmp_path, pretrain_output):
    """``segment.launcher: pytorch`` trains under torchrun (2 gloo CPU processes here, one per GPU on a GPU
    host): it trains, logs each iteration to MLflow exactly once and writes the outputs and metrics."""
    root = tmp_path / "repo"
    (root / "models").mkdir(parents=True)
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    write_demo_segmentation_layout(root / "data" / "datasets", n_train=8, n_val=4)
    pretrain_output(root / "models" / "classifier", TINY)
    store = f"sqlite:///{root / 'mlflow.db'}"
    iters = 4
    params = _params(store, max_iters=iters, checkpoint_interval=2, launcher="pytorch", nproc_per_node=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(_stage_cmd(root), cwd=REPO, env=_env(root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    metrics = json.loads((root / "metrics/segment.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and metrics["temperature"] > 0
    client, runs = _child_run(store)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["segment.processes"] == "2 (torchrun, cpu)"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, iters + 1))
    seg = torch.load(root / "models/segmenter/segmenter.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("backbone.") for k in seg["state_dict"])
