#!/usr/bin/env bash
# Idempotent setup: .venv with pinned torch/torchvision, the locked dependencies, mmcv-full built once into
# the wheel cache (~20 min the first time; reused afterwards), mmdet, and this package (editable).
# A second run on a set-up machine only checks a stamp and takes seconds.
#   OVERLOCK_WHEEL_CACHE  where built wheels are kept (default ~/.cache/overlock/wheels)
#   WITH_NATTEN=1         also build and install natten 0.17.5 (optional fast ContMix backend on GPUs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON_BOOTSTRAP:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version}"'
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=.venv/.overlock-setup
want=$(cat pyproject.toml .ci/constraints.txt .ci/setup.sh .ci/build_wheel.sh | sha256sum | cut -c1-16)-natten${WITH_NATTEN:-0}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && $VPY -c "import overlock, mmcv.ops, mmdet" 2>/dev/null; then
  echo "[setup] up to date ($stamp)"; exit 0
fi
quiet() { grep -v -e '^WARNING: Location' -e '^Requirement already satisfied' || true; }
$VPY -m pip install -q 'pip<26.2' 'setuptools<82' wheel ninja 2>&1 | quiet
$VPY -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | quiet
# everything else exactly as locked (mmcv-full, mmdet and natten are installed below without deps)
grep -v -E '^(mmcv-full|mmdet|natten|overlock)==' .ci/constraints.txt > .venv/constraints-nolocal.txt
$VPY -m pip install -q -r .venv/constraints-nolocal.txt 2>&1 | quiet
PYTHON=$VPY bash .ci/build_wheel.sh mmcv-full 1.7.2
cache="${OVERLOCK_WHEEL_CACHE:-$HOME/.cache/overlock/wheels}"
$VPY -m pip install -q --no-deps "$cache"/mmcv_full-1.7.2-*.whl 2>&1 | quiet
$VPY -m pip install -q --no-deps mmdet==2.28.2 2>&1 | quiet
if [ "${WITH_NATTEN:-0}" = 1 ]; then
  PYTHON=$VPY bash .ci/build_wheel.sh natten 0.17.5
  $VPY -m pip install -q --no-deps "$cache"/natten-0.17.5-*.whl 2>&1 | quiet
fi
$VPY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | quiet
$VPY -c "import overlock, mmcv.ops, mmdet, timm, mlflow, ray, dvc; print('[setup] ok: torch', __import__('torch').__version__, 'mmcv', mmcv.__version__, 'mmdet', mmdet.__version__)"
echo "$want" > "$stamp"
