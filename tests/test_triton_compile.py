"""Every Triton kernel compiles for an H100 (sm_90), here too without a GPU.

The interpreter that runs the other Triton tests on CPU compiles nothing, so code the GPU compiler
rejects passes there (a constexpr reassigned in a ``static_range`` loop did). This runs
``scripts/compile_triton_kernels.py`` in a subprocess without ``TRITON_INTERPRET``: the public
ops launch every kernel variant, in four dtypes, as compile-only launches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_triton_kernels.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def _compile_env(tmp_path) -> dict[str, str]:
    """This environment without the interpreter, with a fresh Triton cache (compile for real)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return env


def _compile(tmp_path, *args):
    out = tmp_path / "compiled.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out), *args],
        env=_compile_env(tmp_path), capture_output=True, text=True, timeout=900,
    )
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the kernels themselves")
def test_every_kernel_compiles_for_sm90(tmp_path):
    proc, report = _compile(tmp_path, "--arch", "90")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["failures"] == []
    built = {(r["kernel"], r["dtype"]) for r in report["rows"]}
    kernels = {name for name, _ in built}
    # Each op's kernels, forward and backward; the head's selection and map kernels.
    for name in (
        "_affine_coupling_fwd_kernel", "_affine_coupling_inv_kernel", "_affine_coupling_bwd_kernel",
        "_global_affine_permute_fwd_kernel", "_global_affine_permute_inv_kernel", "_global_affine_permute_bwd_kernel",
        "_coupling_affine_permute_fwd_kernel", "_coupling_affine_permute_bwd_kernel",
        "_gaussian_nll_fwd_kernel", "_gaussian_nll_bwd_kernel", "_log_likelihood_map_fwd_kernel",
        "_log_likelihood_map_bwd_kernel", "_aggregate_anomaly_maps_fwd_kernel", "_anomaly_maps_finish_fwd_kernel",
        "_top_k_mean_fwd_kernel", "_channel_layer_norm_relu_fwd_kernel", "_channel_layer_norm_relu_bwd_kernel",
        "_sample_layer_norm_fwd_stats_kernel", "_sample_layer_norm_fwd_reduce_kernel", "_sample_layer_norm_fwd_kernel",
        "_sample_layer_norm_bwd_stats_kernel", "_sample_layer_norm_bwd_reduce_kernel", "_sample_layer_norm_bwd_kernel",
        "_fastflow_exp_fwd_kernel", "_fastflow_anomaly_map_fwd_kernel", "_fastflow_scores_fwd_kernel",
    ):
        assert name in kernels, f"{name} was never compiled"
    for dtype in ("float32", "float64", "bfloat16", "float16"):
        assert ("_affine_coupling_fwd_kernel", dtype) in built and ("_top_k_mean_fwd_kernel", dtype) in built
        assert ("_sample_layer_norm_bwd_kernel", dtype) in built and ("_fastflow_anomaly_map_fwd_kernel", dtype) in built
    assert all("registers" in r and "stack" in r and "local" in r for r in report["rows"]), "cuobjdump gave no resource usage"


def test_failures_are_reported(tmp_path):
    """The check can fail: a kernel that does not compile, one that spills registers, and a float64
    kernel with a runtime float argument."""
    (tmp_path / "bad_kernels.py").write_text(
        "import torch, triton, triton.language as tl\n"
        "@triton.jit\n"
        "def reassigns_constexpr(out_ptr, N: tl.constexpr):\n"
        "    for p in tl.static_range(2):\n"
        "        shift: tl.constexpr = N - p\n"
        "        tl.store(out_ptr + p, shift)\n"
        "@triton.jit\n"
        "def runtime_eps(x_ptr, eps):\n"
        "    tl.store(x_ptr, tl.load(x_ptr) + eps)\n"
        "@triton.jit\n"
        "def spills(x_ptr, BLOCK: tl.constexpr):\n"
        "    offs = tl.arange(0, BLOCK)\n"
        "    v = tl.load(x_ptr + offs)\n"
        "    tl.store(x_ptr + offs, v * tl.sum(v * v, axis=0) + tl.sum(tl.exp(v), axis=0))\n"
        "def does_not_compile(dtype):\n"
        "    reassigns_constexpr[(1,)](torch.empty(2, dtype=torch.int32), N=4)\n"
        "def spill(dtype):\n"
        "    spills[(1,)](torch.empty(1 << 13, dtype=torch.float32), BLOCK=1 << 13, num_warps=1)\n"
        "def rounds_eps(dtype):\n"
        "    runtime_eps[(1,)](torch.empty(1, dtype=dtype), 1e-5)\n"
    )
    (tmp_path / "drive.py").write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(tmp_path)!r}, {str(SCRIPT.parent)!r}]\n"
        "import compile_triton_kernels as c, bad_kernels\n"
        "c.CASES = {'broken': bad_kernels.does_not_compile, 'spill': bad_kernels.spill, 'eps': bad_kernels.rounds_eps}\n"
        "sys.exit(c.main(['--dtype', 'float64']))\n"
    )
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "drive.py")], env=_compile_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL broken/float64: CompilationError" in proc.stdout, proc.stdout
    assert "FAIL runtime_eps (float64) takes float32 scalar arguments ['eps']" in proc.stdout, proc.stdout
    assert "FAIL spills (float64) spills registers" in proc.stdout, proc.stdout
