#!/usr/bin/env bash
# Idempotent setup: .venv with pinned torch/torchvision, the locked dependencies, mmcv-full (and with
# WITH_NATTEN=1 natten) built once from source into the wheel cache, mmdet, mmsegmentation, and this package.
# A second run on a set-up machine only checks a stamp and takes seconds.
#   OVERLOCK_WHEEL_CACHE  where built wheels and their build logs are kept (default ~/.cache/overlock/wheels)
#   WITH_NATTEN=1         also build and install natten 0.17.5 (optional ContMix backend)
# Every pip call runs under the build-toolchain constraints (.ci/toolchain.txt): without them installing torch
# upgrades setuptools past 81, which drops the pkg_resources that mmcv-full's setup.py imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON_BOOTSTRAP:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version}"'
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_CONSTRAINT="$PWD/.ci/toolchain.txt"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=.venv/.overlock-setup
want=$(cat pyproject.toml .ci/constraints.txt .ci/toolchain.txt .ci/setup.sh .ci/build_wheel.sh .ci/check_toolchain.py \
  | sha256sum | cut -c1-16)-natten${WITH_NATTEN:-0}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && $VPY .ci/check_toolchain.py --quiet \
   && $VPY -c "import overlock, mmcv.ops, mmdet, mmseg" 2>/dev/null; then
  echo "[setup] up to date ($stamp)"; exit 0
fi
rm -f "$stamp"
cache="${OVERLOCK_WHEEL_CACHE:-$HOME/.cache/overlock/wheels}"
t0=$SECONDS; step_start=$SECONDS
step() { echo "[setup] $1: $((SECONDS - step_start)) s"; step_start=$SECONDS; }
quiet() { grep -v -e '^WARNING: Location' -e '^Requirement already satisfied' -e 'Setting PIP_CONSTRAINT will not affect build' || true; }
pip_install() { $VPY -m pip install -q "$@" 2>&1 | quiet; return "${PIPESTATUS[0]}"; }
pip_install -r .ci/toolchain.txt
step "build toolchain (pip, setuptools, wheel, ninja)"
pip_install torch==2.14.1 torchvision==0.29.1
step "torch + torchvision"
# everything else exactly as locked (the source builds and the packages installed --no-deps come below)
grep -v -E '^(mmcv-full|mmdet|mmsegmentation|natten|overlock)==' .ci/constraints.txt > .venv/constraints-nolocal.txt
pip_install -r .venv/constraints-nolocal.txt
step "locked dependencies"
$VPY .ci/check_toolchain.py
PYTHON=$VPY bash .ci/build_wheel.sh mmcv-full 1.7.2
pip_install --no-deps "$cache"/mmcv_full-1.7.2-*.whl
step "mmcv-full 1.7.2 (source build or wheel cache)"
pip_install --no-deps mmdet==2.28.2 mmsegmentation==0.30.0
if [ "${WITH_NATTEN:-0}" = 1 ]; then
  PYTHON=$VPY bash .ci/build_wheel.sh natten 0.17.5
  pip_install --no-deps "$cache"/natten-0.17.5-*.whl
  step "natten 0.17.5 (source build or wheel cache)"
fi
pip_install --no-deps --no-build-isolation -e .
$VPY .ci/check_toolchain.py
$VPY -c "import overlock, mmcv.ops, mmdet, mmseg, timm, mlflow, ray, dvc; print('[setup] ok: torch', __import__('torch').__version__, 'mmcv', mmcv.__version__, 'mmdet', mmdet.__version__, 'mmseg', mmseg.__version__)"
if [ "${WITH_NATTEN:-0}" = 1 ]; then  # natten 0.17 imports on current torch through overlock's shims
  $VPY -c "from overlock.models import contmix as c; e = c._natten_error(); assert e is None, e; print('[setup] ok: natten', c._NATTEN['version'])"
fi
echo "[setup] total: $((SECONDS - t0)) s"
echo "$want" > "$stamp"
