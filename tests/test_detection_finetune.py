"""The finetune stage end to end on a tiny demo COCO set: init from the pretrain output, train on CPU,
SIGKILL + resume, pycocotools bbox/segm AP in the DVC metrics file and in MLflow, outputs, bad input."""
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

pytest.importorskip("mmdet")

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TINY = {"depth": [1, 1, 1, 1], "sub_depth": [1, 1], "embed_dim": [16, 32, 64, 96], "kernel_size": [7, 7, 7, 7]}
MAX_ITERS = 20
CKPT_EVERY = 5


def _params(store: str, **finetune) -> dict:
    return {"seed": 0, "model": {"arch": "overlock", "size": "xt", "overrides": TINY},
            "finetune": {"max_iters": MAX_ITERS, "checkpoint_interval": CKPT_EVERY, "img_scale": [96, 96],
                         "lr": 0.0005, **finetune},
            "tracking": {"uri": store, "experiment": "finetune-test"}, "compute": {"threads": 1}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_detection_layout, pretrain_output):
    """A repo root (params.yaml, dvc.yaml) with demo detection data and a pretrain output."""
    root = tmp_path_factory.mktemp("ftrepo")
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    demo_detection_layout(root / "data" / "datasets")
    weights = pretrain_output(root / "models" / "classifier", TINY)
    store = f"sqlite:///{root / 'mlflow.db'}"
    (root / "params.yaml").write_text(yaml.safe_dump(_params(store)))
    return {"root": root, "weights": weights, "store": store}


def _stage_cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "stages.finetune", "--params", str(root / "params.yaml"),
            "--data", str(root / "data/datasets"), "--classifier", str(root / "models/classifier"),
            "--out", str(root / "models/detector"), "--metrics", str(root / "metrics/finetune.json"),
            "--plots", str(root / "plots/finetune")]


def _env(root: Path) -> dict:
    return {**os.environ, "OVERLOCK_REPO": str(root), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def killed_and_resumed(workspace):
    """Run the real stage, SIGKILL it after the first checkpoint, then re-run it to the end."""
    root = workspace["root"]
    state = root / ".overlock" / "state" / "finetune"
    log1 = (root / "run1.log").open("w")
    proc = subprocess.Popen(_stage_cmd(root), cwd=REPO, env=_env(root), stdout=log1, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not list(state.glob(f"*/iter_{CKPT_EVERY}.pth")):
        time.sleep(0.2)
    assert proc.poll() is None, (root / "run1.log").read_text()[-3000:]
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = {"out_exists": (root / "models/detector").exists(),
              "metrics_exists": (root / "metrics/finetune.json").exists()}
    second = subprocess.run(_stage_cmd(root), cwd=REPO, env=_env(root), capture_output=True, text=True,
                            timeout=400)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    return {**workspace, "killed": killed, "log": second.stderr}


def _child_run(store: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("finetune-test")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`overlock.stage` = 'finetune'")
    return client, runs


@pytest.mark.slow
def test_killed_stage_resumes_from_last_checkpoint(killed_and_resumed):
    root = killed_and_resumed["root"]
    assert not killed_and_resumed["killed"]["out_exists"], "a killed run must not leave outputs"
    result = json.loads((root / "models/detector/metrics.json").read_text())
    assert CKPT_EVERY <= result["info"]["resumed_from_iter"] < MAX_ITERS
    # the loss curve has every iteration once, in order
    rows = (root / "plots/finetune/loss.csv").read_text().split()
    assert rows[0] == "iter,loss"
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, MAX_ITERS + 1))
    # the same MLflow run was resumed and no metric step is lost or duplicated
    client, runs = _child_run(killed_and_resumed["store"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, MAX_ITERS + 1))
    assert "resume" in killed_and_resumed["log"].lower()


@pytest.mark.slow
def test_coco_metrics_in_dvc_file_and_mlflow(killed_and_resumed):
    root = killed_and_resumed["root"]
    metrics = json.loads((root / "metrics/finetune.json").read_text())
    for kind in ("bbox", "segm"):
        for key in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"):
            value = metrics[f"{kind}_{key}"]
            assert -1.0 <= value <= 1.0  # pycocotools reports -1 for an empty size range
    assert metrics["bbox_mAP_50"] >= metrics["bbox_mAP"]
    client, runs = _child_run(killed_and_resumed["store"])
    logged = runs[0].data.metrics
    assert logged["bbox_mAP"] == pytest.approx(metrics["bbox_mAP"]) and "segm_mAP_50" in logged
    assert "train/lr" in logged and "train/loss_mask" in logged
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "detector")}
    assert {"detector/detector.pth", "detector/config.py"} <= artifacts
    # the detector is registered (as a pyfunc model, with its score calibration) by the calibrate stage
    assert not client.search_model_versions("name='overlock-detector'")


@pytest.mark.slow
def test_detector_outputs_are_loadable(killed_and_resumed):
    from mmcv import Config

    root = killed_and_resumed["root"]
    ckpt = torch.load(root / "models/detector/detector.pth", map_location="cpu", weights_only=True)
    assert ckpt["meta"]["CLASSES"] == ("circle", "rectangle", "triangle")
    assert any(k.startswith("backbone.") for k in ckpt["state_dict"])
    cfg = Config.fromfile(str(root / "models/detector/config.py"))
    assert cfg.model.roi_head.bbox_head.num_classes == 3 and cfg.model.neck.in_channels == [16, 32, 88, 120]
    assert all(h["type"] != "MlflowLossHook" for h in cfg.get("custom_hooks", []))


@pytest.mark.parametrize("init,entry", [("ema", "state_dict_ema"), ("raw", "state_dict")])
def test_backbone_starts_from_pretrain_output(workspace, init, entry):
    from mmdet.models import build_detector

    from overlock.detection.config import build_detection_config
    from overlock.detection.finetune import _register_backbones, init_backbone
    from overlock.params import parse_params

    root = workspace["root"]
    params = parse_params(_params(workspace["store"], init=init))
    _register_backbones(params)
    cfg = build_detection_config(params, root / "data/datasets", root / "wd", ["a", "b", "c"])
    model = build_detector(cfg.model)
    model.init_weights()
    info = init_backbone(model, params, root / "models/classifier")
    assert info["init_entry"] == entry
    expected = workspace["weights"][entry]
    backbone = model.backbone.state_dict()
    shared = [k for k in backbone if k in expected]
    assert len(shared) == info["init_loaded"] and len(shared) > 50
    for k in shared:
        torch.testing.assert_close(backbone[k], expected[k], msg=k)
    # classifier-only keys are not in the detector; dense-only layers keep their fresh init
    assert not any(k.startswith(("head.", "aux_head.")) for k in backbone)
    assert any(k.startswith("extra_norm.") for k in backbone) and not any(k.startswith("extra_norm.") for k in expected)


def test_missing_inputs_fail_clearly_without_outputs(workspace, tmp_path):
    from overlock.detection.finetune import run_finetune
    from overlock.params import parse_params

    from overlock.pipeline.context import open_stage

    root = workspace["root"]
    params = parse_params(_params(workspace["store"]))
    out = tmp_path / "detector"

    def run(params, data, classifier):
        with open_stage("finetune", params, track=False, data=data, classifier=classifier, out=out,
                        metrics=tmp_path / "m.json", plots=tmp_path / "plots") as ctx:
            run_finetune(ctx)

    with pytest.raises(FileNotFoundError, match="extract"):
        run(params, tmp_path / "nodata", root / "models/classifier")
    with pytest.raises(FileNotFoundError, match="pretrain"):
        run(params, root / "data/datasets", tmp_path / "noclassifier")
    bad = parse_params(_params(workspace["store"], init="checkpoint"))
    with pytest.raises(ValueError, match="finetune.checkpoint"):
        run(bad, root / "data/datasets", root / "models/classifier")
    assert not out.exists() and not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_evaluate_mode_reproduces_the_trained_metrics(killed_and_resumed, tmp_path, monkeypatch):
    """``finetune.mode: evaluate`` on our own detector.pth (a foreign file: loaded weights_only) gives its AP."""
    from overlock.detection.finetune import run_finetune
    from overlock.params import parse_params
    from overlock.pipeline.context import open_stage

    root = killed_and_resumed["root"]
    params = parse_params(_params(killed_and_resumed["store"], mode="evaluate",
                                  checkpoint=str(root / "models/detector/detector.pth")))
    params.tracking.register_models = False
    monkeypatch.setenv("OVERLOCK_REPO", str(root))
    with open_stage("finetune", params, data=root / "data/datasets", classifier=root / "models/classifier",
                    out=tmp_path / "detector", metrics=tmp_path / "metrics.json", plots=tmp_path / "plots") as ctx:
        metrics = run_finetune(ctx)
    trained = json.loads((root / "metrics/finetune.json").read_text())
    for key in ("bbox_mAP", "bbox_mAP_50", "segm_mAP"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-3)
    assert (tmp_path / "detector/detector.pth").exists()


def test_official_mask_rcnn_checkpoint_keys_load_into_the_detector(tmp_path):
    """Official release layout: ``backbone.`` + the dense backbone's keys (tests/fixtures), neck and heads."""
    from mmcv.runner import load_checkpoint
    from mmdet.models import build_detector

    from overlock.detection.config import config_file, load_config
    from overlock.detection.finetune import _register_backbones
    from overlock.params import parse_params

    fixture = REPO / "tests/fixtures/official_state_dicts.json"
    if not fixture.exists():
        pytest.skip("tests/fixtures/official_state_dicts.json not copied yet")
    official = json.loads(fixture.read_text())["overlock_t_dense"]
    _register_backbones(parse_params({"model": {"size": "t"}}))
    model = build_detector(load_config(config_file("mask_rcnn", "1x", "t")).model)
    ours = model.state_dict()
    backbone = {k[len("backbone."):]: tuple(v.shape) for k, v in ours.items() if k.startswith("backbone.")}
    assert backbone == {k: tuple(v) for k, v in official.items()}
    # an official-format file (plain tensors + primitive meta) loads through mmcv with weights_only kept on
    torch.manual_seed(0)
    state = {f"backbone.{k}": torch.randn(v) if len(v) else torch.tensor(3) for k, v in official.items()}
    state.update({k: torch.randn_like(v.float()).to(v.dtype) for k, v in ours.items() if not k.startswith("backbone.")})
    path = tmp_path / "maskrcnn1x_overlock_tiny_coco.pth"
    torch.save({"meta": {"CLASSES": tuple(f"c{i}" for i in range(80)), "mmcv_version": "1.7.2"},
                "state_dict": state}, path)
    load_checkpoint(model, str(path), map_location="cpu", strict=True)
    key = "backbone.patch_embed1.0.weight"
    torch.testing.assert_close(model.state_dict()[key], state[key])


@pytest.mark.slow
def test_torchrun_launcher_trains_with_two_processes(tmp_path, demo_detection_layout, pretrain_output):
    """``finetune.launcher: pytorch`` runs the training under torchrun with MMDistributedDataParallel
    (2 gloo CPU processes here, one per GPU on a GPU host): it trains, logs each iteration to MLflow exactly
    once, and the outputs are written; each rank predicts its shard of the val and calibration images and the
    merged predictions are those of one process predicting every image."""
    root = tmp_path / "repo"
    (root / "models").mkdir(parents=True)
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    demo_detection_layout(root / "data" / "datasets", n_train=8, n_val=4, calibration=3)
    pretrain_output(root / "models" / "classifier", TINY)
    store = f"sqlite:///{root / 'mlflow.db'}"
    iters = 4
    params = _params(store, max_iters=iters, checkpoint_interval=2, launcher="pytorch", nproc_per_node=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(_stage_cmd(root), cwd=REPO, env=_env(root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    metrics = json.loads((root / "metrics/finetune.json").read_text())
    assert "bbox_mAP" in metrics and 0.0 <= metrics["bbox_mAP"] <= 1.0
    client, runs = _child_run(store)
    assert len(runs) == 1 and runs[0].data.tags["finetune.processes"] == "2 (torchrun, cpu)"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == sorted(set(steps)) and max(steps) == iters
    det = torch.load(root / "models/detector/detector.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("backbone.") for k in det["state_dict"])
    _assert_one_process_predicts_the_same(root)


def _assert_one_process_predicts_the_same(root: Path) -> None:
    """The published (2-process, merged) predictions equal one process's on the same detector."""
    from overlock.detection.config import coco_files
    from overlock.data.coco_results import predictions_file
    from overlock.detection.predictions import predict_split
    from overlock.inference.detector import load_detector

    model = load_detector(root / "models/detector", "cpu")
    files = coco_files(root / "data" / "datasets")
    key = lambda d: (d["image_id"], d["category_id"], -d["score"])  # noqa: E731
    for split in ("val", "calibration"):
        merged = json.loads(predictions_file(root / "models/detector", split).read_text())
        single = predict_split(model, model.cfg.data.test, *files[split], samples_per_gpu=2, workers=0,
                               device="cpu")
        assert merged and len(merged) == len(single), split
        assert {d["image_id"] for d in merged} == {d["image_id"] for d in single}
        for a, b in zip(sorted(merged, key=key), sorted(single, key=key)):  # rank 1's shard too: same weights
            assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
            assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-2)
            assert ("segmentation" in a) == ("segmentation" in b)
