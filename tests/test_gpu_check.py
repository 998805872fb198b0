"""``benchmarks/gpu_check.py --dry-run``: the one-GPU check, run at tiny sizes on the CPU so it never rots.

Asserts the JSON's structure, that the parity check compared real numbers (every backend that ran is below
the tolerance, and the deliberately wrong backend is far above it), that every measurement ran, and that
the script imported none of the heavy optional dependencies (a GPU machine may not have them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.bench
def test_gpu_check_dry_run(tmp_path):
    out_json = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("OVERLOCK_CONTMIX_BACKEND", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                           "--include-wrong-backend", "--json", str(out_json)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["dry_run"] is True and result["ok"] is True
    assert result["heavy_modules_imported"] == []
    assert {"torch", "timm", "torchvision", "device"} <= set(result["machine"])

    parity = result["parity"]
    rows = {r["backend"]: r for r in parity["results"]}
    assert {"fast", "gather", "natten", "triton", "fast (slots reversed)"} == set(rows)
    for name in ("fast", "gather"):  # always available: really compared, and within tolerance
        row = rows[name]
        assert row["skipped"] is None and row["ok"] is True
        assert set(row["max_rel_err"]) == {"eval_logits", "reparam_logits", "train_aux"}
        assert 0 <= max(row["max_rel_err"].values()) < parity["rtol"]
        assert set(row["op_max_rel_err"]) == {"out", "grad_attn", "grad_value"}
        assert 0 < max(row["op_max_rel_err"].values()) < parity["op_rtol"]  # fp32 vs float64: not exactly 0
    for name in ("natten", "triton"):  # optional: either checked and passing, or skipped with the reason
        row = rows[name]
        assert (row["ok"] is True) if row["skipped"] is None else isinstance(row["skipped"], str)
    wrong = rows["fast (slots reversed)"]
    assert wrong["deliberately_wrong"] and wrong["ok"] is False
    assert max(wrong["op_max_rel_err"].values()) > 100 * parity["op_rtol"]

    train = {(r["model"], r["mode"]): r for r in result["train"]}
    assert set(train) == {(m, mode) for m in ("overlock_xt", "overlock_t", "convnext_tiny")
                          for mode in ("eager", "compile")}
    for (model, mode), row in train.items():
        assert row["skipped"] is None, row
        assert row["images_per_s"] > 0 and row["peak_mem_gib"] is None  # no GPU memory on the CPU
        assert row["first_loss"] == row["first_loss"]  # finite, not NaN
        if mode == "compile":
            assert row["compile_backend"] == "eager"
    inference = {(r["model"], r["mode"]): r for r in result["inference"]}
    assert set(inference) == {(m, form) for m in ("overlock_xt", "overlock_t") for form in ("plain", "deploy")}
    for model in ("overlock_xt", "overlock_t"):
        assert inference[(model, "deploy")]["max_rel_diff_vs_plain"] < 5e-2  # bf16 round-off only
        assert all(inference[(model, form)]["images_per_s"] > 0 for form in ("plain", "deploy"))
    contmix_rows = {r["backend"]: r for r in result["contmix"]}
    assert contmix_rows["fast"]["fwd_bwd_ms"] > 0 and contmix_rows["gather"]["fwd_bwd_ms"] > 0
    assert "| fast (slots reversed) |" in proc.stdout and "(expected FAIL)" in proc.stdout
