"""Brief runs of the benchmark scripts (``-m bench``): they run and report; no timing assertions."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.bench
def test_contmix_benchmark_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "contmix.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "gather/fast" in out and "unfold/fast" in out
    rows = [line for line in out.splitlines() if re.search(r"\d+\.\d+x", line)]
    assert len(rows) >= 6, out  # one line of ratios per shape
    assert any(line.startswith("stage3-224 K13") for line in rows)
    assert any(line.startswith("detection 50x84 K13") for line in rows)


def _run_quick(script: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.bench
def test_train_step_benchmark_quick_reports_ratios_and_fp32_exactness():
    out = _run_quick("train_step.py")
    for variant in ("+fast-contmix", "+channels-last", "+fast-dwconv", "+bf16-autocast"):
        assert re.search(rf"^RATIO {re.escape(variant)} vs baseline: \d+\.\d+x img/s$", out, re.M), out
    assert "| baseline | fp32 | contiguous | gather | torch |" in out
    assert "fp32 exactness: every fp32 variant matches the baseline" in out


@pytest.mark.bench
def test_inference_benchmark_quick_reports_ratios():
    out = _run_quick("inference.py")
    assert re.search(r"^RATIO reparam channels_last vs plain torch-dw: \d+\.\d+x img/s at batch 4$", out, re.M), out
    assert re.search(r"^RATIO reparam channels_last vs plain: \d+\.\d+x img/s at batch 4$", out, re.M), out
    assert re.search(r"^RATIO reparam channels_last bf16 vs plain torch-dw: \d+\.\d+x batch-1 latency$", out, re.M), out
    assert "fp32 rows agree with the plain model" in out
    # the exported deploy form in ONNX Runtime, same images (its logits are in the fp32 agreement above)
    assert re.search(r"^\| onnxruntime \| NCHW \| fp32 \|", out, re.M), out
    for unit in ("img/s at batch 4", "batch-1 latency"):
        assert re.search(rf"^RATIO reparam channels_last vs onnxruntime: \d+\.\d+x {unit}$", out, re.M), out


@pytest.mark.bench
def test_data_loading_benchmark_quick_runs_every_side():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_loading.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for w in (0, 1):
        for side in ("timm", "ours-pil", "ours"):
            row = re.search(rf"^\| {w} \| {side} \| (\d+\.\d) \| (\d+\.\d) \| (\d+\.\d) \|$", proc.stdout, re.M)
            assert row, proc.stdout
            assert float(row[3]) >= float(row[2])  # loading only leaves out the batch steps' CPU time
        assert re.search(rf"^RATIO workers={w}: ours/timm per core \d+\.\d\dx, loading only \d+\.\d\dx", proc.stdout,
                         re.M)
    steps = dict(re.findall(r"^\| ((?:timm|ours): [^|]+?) \| (\d+\.\d{3}) \|$", proc.stdout, re.M))
    assert len(steps) == 7 and all(float(ms) > 0 for ms in steps.values()), proc.stdout
    assert re.search(r"^STEPS total timm \d+\.\d{3} ms, ours \d+\.\d{3} ms per image: \d+\.\d\dx$", proc.stdout, re.M)


@pytest.mark.bench
def test_ray_data_loading_benchmark_quick_runs_both_sides():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ray_data_loading.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for side in ("ray_data", "dataloader"):
        assert re.search(rf"^\| 1 \| {side} \| \d+\.\d \| \d+\.\d\d \| \d+\.\d \| \d+\.\d \|$", proc.stdout, re.M), \
            proc.stdout
    assert re.search(r"^RATIO N=1: ray_data/dataloader \d+\.\d\dx wall img/s, \d+\.\d\dx after the first batch, "
                     r"\d+\.\d\dx per core$", proc.stdout, re.M), proc.stdout
