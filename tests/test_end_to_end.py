"""End to end as a user runs it: `dvc repro` and `dvc exp run -S ...` in a temporary git repository.

One tiny pipeline run per session backs several assertions (DESIGN.md §5): tiny demo data, a reduced
OverLoCK through `model.overrides`, one epoch, a few detector iterations.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
STAGES = ["download", "extract", "pretrain", "finetune", "calibrate", "evaluate"]
TINY_MODEL = {"depth": [1, 1, 1, 1], "sub_depth": [1, 1], "embed_dim": [16, 32, 48, 64],
              "sub_num_heads": [2, 2], "projection": 64}
pytestmark = pytest.mark.slow


def tiny_params(raw: dict) -> dict:
    """The shipped params.yaml shrunk so the whole pipeline runs in a few minutes on 2 cores."""
    raw["data"]["demo"].update(num_classes=4, train_per_class=24, val_per_class=8, image_size=32,
                               coco_train_images=12, coco_val_images=6, coco_image_size=96)
    raw["data"]["calibration_per_class"] = 4
    raw["model"]["overrides"] = dict(TINY_MODEL)
    raw["pretrain"].update(epochs=1, batch_size=16, input_size=32, workers=2, log_every_steps=1)
    raw["finetune"].update(max_iters=6, img_scale=[96, 96], checkpoint_interval=3)
    raw["evaluate"].update(throughput_batch=4, throughput_iters=1, erf_images=2, gradcam_images=1,
                           detection_images=1)
    raw["compute"]["threads"] = 1
    return raw


def run(cmd, cwd, check=True, timeout=900):
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    for var in ("OVERLOCK_REPO", "MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "RAY_ADDRESS"):
        env.pop(var, None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def copy_repo(dest: Path) -> Path:
    """Copy the tracked and untracked-but-not-ignored files (what a clone plus the change holds)."""
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], REPO).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """Copy the repo into a fresh git repo, shrink params, run `dvc repro` once."""
    root = copy_repo(tmp_path_factory.mktemp("e2e") / "repo")
    raw = tiny_params(yaml.safe_load((root / "params.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    first = run(["dvc", "repro"], root, timeout=1200)
    return root, first


def _mlflow_runs(root: Path):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("overlock-pipeline")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_repro_runs_all_stages_and_outputs_load(pipeline):
    root, first = pipeline
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout, first.stdout[-3000:]
    from overlock.models.checkpoint import load_official_checkpoint  # noqa: F401  (our loader)
    from overlock.registry import import_model_modules, resolve_model
    import timm
    meta = json.loads((root / "models/classifier/model.json").read_text())
    spec = resolve_model(meta["arch"], meta["size"])
    import_model_modules(spec)
    model = timm.create_model(spec.timm_name, num_classes=meta["num_classes"], **meta["model_kwargs"])
    ckpt = torch.load(root / "models/classifier/final.pth", weights_only=True)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=True), None
    assert meta["num_classes"] == 4 and len(meta["classes"]) == 4
    det = torch.load(root / "models/detector/detector.pth", weights_only=False, map_location="cpu")
    assert any(k.startswith("backbone.") for k in det["state_dict"])
    temp = json.loads((root / "models/calibration/temperature.json").read_text())
    assert temp["temperature"] > 0
    html = (root / "reports/report.html").read_text()
    for section in ("Classification", "Calibration", "Detection", "Complexity"):
        assert section in html


def test_dvc_metrics_show_has_every_stage(pipeline):
    root, _ = pipeline
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)
    files = {Path(f).name for rev in shown.values() for f in rev.get("data", {})}
    assert {"data.json", "pretrain.json", "finetune.json", "calibrate.json", "evaluate.json"} <= files
    text = run(["dvc", "metrics", "show"], root).stdout
    assert "val_top1" in text and "bbox_mAP" in text


def test_mlflow_has_one_parent_with_six_children(pipeline):
    root, _ = pipeline
    client, runs = _mlflow_runs(root)
    parents = [r for r in runs if r.data.tags.get("overlock.role") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["overlock.stage"] for r in children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    for child in children:
        assert child.data.params and child.data.metrics, child.data.tags["overlock.stage"]
        assert child.data.tags["git.commit"] != "nogit"
    by_stage = {r.data.tags["overlock.stage"]: r for r in children}
    assert any(k.startswith("input.") for k in by_stage["pretrain"].data.tags)
    assert client.list_artifacts(by_stage["evaluate"].info.run_id)
    assert any(k.startswith("evaluate.") for k in parents[0].data.metrics)
    assert client.get_model_version_by_alias("overlock-classifier", "latest-pipeline")


def test_second_repro_runs_no_stage(pipeline):
    root, _ = pipeline
    again = run(["dvc", "repro"], root)
    assert "Running stage" not in again.stdout
    _, runs = _mlflow_runs(root)
    assert len([r for r in runs if r.data.tags.get("overlock.role") == "pipeline"]) == 1


def test_bad_set_param_fails_before_any_stage_work(pipeline):
    root, _ = pipeline
    _, before = _mlflow_runs(root)
    bad = run(["dvc", "exp", "run", "-S", "model.size=q"], root, check=False)
    assert bad.returncode != 0
    assert "model.size" in bad.stderr + bad.stdout and "valid: xt, t, s, b" in bad.stderr + bad.stdout
    _, after = _mlflow_runs(root)
    assert len(after) == len(before)
    run(["git", "checkout", "--", "params.yaml"], root)


def test_exp_run_with_other_size_is_a_separate_tracked_run(pipeline):
    root, _ = pipeline
    run(["dvc", "exp", "run", "-n", "size-t", "-S", "model.size=t"], root, timeout=1200)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    text = json.dumps(shown)
    assert "size-t" in text
    _, runs = _mlflow_runs(root)
    parents = [r for r in runs if r.data.tags.get("overlock.role") == "pipeline"]
    assert len(parents) == 2
    exp_parent = next(p for p in parents if p.data.tags.get("dvc.experiment") == "size-t")
    assert exp_parent.data.params["model.size"] == "t"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == exp_parent.info.run_id]
    assert {"pretrain", "evaluate"} <= {r.data.tags["overlock.stage"] for r in children}
