#!/usr/bin/env bash
# One command for a lent GPU machine (no network; its own python3 with torch and triton):
# build the extension against that torch, run the GPU and CUDA/Triton tests, run the kernel and
# end-to-end benchmarks, and write the tables. Sized to fit one 10-minute call.
#
# FrEIA (a test dependency) is not on those machines. Carry it as a wheel: here, in the repo root,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl FrEIA==0.2          # FrEIA 0.2 is a pure-Python wheel
# then pass `.whl` in the device call's carry list; this script installs whatever lies in .whl/.
#
# Usage (on the GPU machine, from the repo root):  bash benchmarks/gpu_suite.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
LOG="$OUT/gpu_suite.log"
: > "$LOG"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
start=$(date +%s)
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tee -a "$LOG" | tail -5
echo "build: $(( $(date +%s) - start )) s" | tee -a "$LOG"
$PY -c "import msflow_fast, pprint; pprint.pprint(msflow_fast.build_info())" 2>&1 | tee -a "$LOG"

# Tests on the GPU: everything (GPU-marked tests included); the Triton kernels now run compiled.
timeout 240 $PY -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15

DATE=$(date +%F)
timeout 200 $PY -m benchmarks.run --suite kernels --device cuda --name "kernels-cuda-$DATE" --out "$OUT" 2>&1 | tee -a "$LOG" | tail -40
timeout 120 $PY -m benchmarks.run --suite e2e --device cuda --name "e2e-cuda-$DATE" --out "$OUT" 2>&1 | tee -a "$LOG" | tail -30
