#!/usr/bin/env bash
# Build a wheel for a source-only dependency once into the wheel cache and reuse it afterwards.
#   .ci/build_wheel.sh mmcv-full 1.7.2      (ops on, C++20, CUDA ops when nvcc and a GPU are present)
#   .ci/build_wheel.sh natten 0.17.5        (CPU build unless a GPU is present, C++20 in its CMake)
# Env: PYTHON (the venv's python), OVERLOCK_WHEEL_CACHE (default ~/.cache/overlock/wheels).
# The full build output goes to $OVERLOCK_WHEEL_CACHE/logs/<name>-<version>.log; a failed build prints its tail.
set -euo pipefail
name="$1"; version="$2"
PYTHON="${PYTHON:-.venv/bin/python}"; PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
cache="${OVERLOCK_WHEEL_CACHE:-$HOME/.cache/overlock/wheels}"
mkdir -p "$cache"
dist="${name//-/_}"
if ls "$cache/${dist}-${version}-"*.whl >/dev/null 2>&1; then
  echo "[wheel-cache] reusing $(ls "$cache/${dist}-${version}-"*.whl)"; exit 0
fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$cache/logs"; log="$cache/logs/$name-$version.log"; : > "$log"
echo "[wheel-cache] building $name==$version from source (one time; cached in $cache; log: $log)"
build_failed() {
  echo "[wheel-cache] building $name==$version FAILED. Last lines of $log:" >&2
  tail -n 40 "$log" >&2
  echo "[wheel-cache] the whole log: $log. Common causes: no C++ compiler (install g++), a moved build toolchain" >&2
  echo "  (.venv/bin/python .ci/check_toolchain.py), too little memory for parallel compiles (retry with MAX_JOBS=1)." >&2
  exit 1
}
(cd "$work" && "$PYTHON" -m pip download --no-deps --no-binary :all: --no-build-isolation -d "$work" "$name==$version" >>"$log" 2>&1) || build_failed
tar -xzf "$work"/*.tar.gz -C "$work"
src=$(find "$work" -maxdepth 1 -mindepth 1 -type d | head -1)
gpu=0
if command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
case "$name" in
  mmcv-full)
    sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$src/setup.py"
    export MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}"
    if [ "$gpu" = 1 ]; then export FORCE_CUDA=1; else export FORCE_CUDA=0 CUDA_VISIBLE_DEVICES=""; fi
    ;;
  natten)
    # torch >= 2.10 headers need C++20. natten's csrc/CMakeLists.txt also sets the standard through a cache
    # variable (set(CXX_STD "17" CACHE ...) -> CMAKE_CXX_STANDARD, which appends -std=gnu++17 after the flags).
    find "$src" -name CMakeLists.txt -exec sed -i 's/CMAKE_CXX_STANDARD 17/CMAKE_CXX_STANDARD 20/g; s/-std=c++17/-std=c++20/g; s/set(CXX_STD "17"/set(CXX_STD "20"/g' {} +
    if grep -rqE 'CXX_STD "17"|std=c\+\+17' --include=CMakeLists.txt "$src"; then echo "[wheel-cache] natten: C++17 still set after patching" >&2; exit 1; fi
    # setup.py reads NATTEN_IS_BUILDING_DIST with bool(os.getenv(...)): any value, "0" too, means "dist", which
    # keeps CMake's build files out of the wheel but appends +torchXYZcpu to the version, so neither the cache
    # check above nor setup.sh's natten-0.17.5-*.whl would find the wheel. Keep dist mode, drop the local tag.
    sed -i 's/^    if not NATTEN_IS_BUILDING_DIST:$/    if True:  # overlock: plain version/' "$src/setup.py"
    grep -q "if True:  # overlock: plain version" "$src/setup.py" || { echo "[wheel-cache] natten: setup.py version patch did not apply" >&2; exit 1; }
    export NATTEN_IS_BUILDING_DIST=1
    if [ "$gpu" = 1 ]; then export NATTEN_CUDA_ARCH="${NATTEN_CUDA_ARCH:-8.0}" NATTEN_WITH_CUDA=1; else export CUDA_VISIBLE_DEVICES="" NATTEN_WITH_CUDA=0; fi
    export NATTEN_N_WORKERS="${MAX_JOBS:-2}"
    ;;
esac
start=$SECONDS
(cd "$src" && "$PYTHON" -m pip wheel -v --no-deps --no-build-isolation -w "$work/out" . >>"$log" 2>&1) || build_failed
cp "$work"/out/*.whl "$cache/.tmp.whl" && mv "$cache/.tmp.whl" "$cache/$(basename "$work"/out/*.whl)"
echo "[wheel-cache] built $(ls "$cache/${dist}-${version}-"*.whl) in $((SECONDS - start)) s"
