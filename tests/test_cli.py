"""Entry points: `overlock --help`, `python -m stages.<name> --help`, and validation before any work."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["download", "extract", "finetune", "calibrate", "evaluate"]


def _run(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_overlock_help_lists_every_stage():
    out = _run("-m", "overlock", "--help")
    assert out.returncode == 0
    for stage in [*STAGES, "pretrain", "predict"]:
        assert stage in out.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help(stage):
    out = _run("-m", f"stages.{stage}", "--help")
    assert out.returncode == 0 and "--params" in out.stdout and "--out" in out.stdout


def test_pretrain_entry_point_help_runs_as_a_script():
    out = _run("pipelines/pretrain.py", "--help")
    assert out.returncode == 0 and "--data" in out.stdout


def test_bad_param_fails_before_any_work(tmp_path):
    params = (REPO / "params.yaml").read_text().replace("size: xt ", "size: q  ")
    (tmp_path / "params.yaml").write_text(params)
    out = _run("-m", "stages.download", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "a"))
    assert out.returncode == 2
    assert "model.size" in out.stderr and "valid: xt, t, s, b" in out.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "mlflow.db").exists()
