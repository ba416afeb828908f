#!/usr/bin/env bash
# Install msflow_fast from a fresh machine (Python, gcc; nvcc optional) into ./.venv:
# torch, the package with its C++/CUDA extension and the test extras. Fails loudly if the
# extension (or, where nvcc exists, its CUDA sources) did not build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
"$PY" -m pip install -q setuptools wheel ninja
# torch 2.14.1 is a CUDA-13 build (matches nvcc 13.0) that lies on the local disk; torchvision
# must come from the same release line for timm to import. constraints.txt pins both for every
# install below, so the test extras (anomalib, ...) cannot replace them.
"$PY" -m pip install -q -c constraints.txt torch torchvision numpy

if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  EXPECT_CUDA=1
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
else
  EXPECT_CUDA=0
fi
export MAX_JOBS=${MAX_JOBS:-2}
start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation -c constraints.txt -e ".[test,timm]"
echo "extension build + install: $(( $(date +%s) - start )) s"

EXPECT_CUDA=$EXPECT_CUDA "$PY" - <<'PYEOF'
import os, pprint, sys
import msflow_fast
info = msflow_fast.build_info()
pprint.pprint(info)
if not info["extension"]:
    sys.exit(f"CI: the C++ extension msflow_fast._C did not build or load: {info['extension_error']}")
if os.environ["EXPECT_CUDA"] == "1" and not info["extension_cuda"]:
    sys.exit("CI: nvcc is present but the CUDA sources of msflow_fast._C were not compiled")
PYEOF

