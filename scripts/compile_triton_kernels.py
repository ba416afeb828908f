"""Compile every Triton kernel for an NVIDIA GPU on a machine without one (PTX and cubin, via ptxas).

The Triton interpreter that runs the kernel tests on CPU does not compile anything: it accepts
code the GPU compiler rejects, and it computes runtime float arguments in float64 where a GPU
build passes them as float32. This script runs the public ops with ``backend="triton"`` on CPU
tensors, with a stand-in driver that reports a CUDA target and a launch that compiles without
running, so every kernel is built exactly as the ops would launch it on that GPU: same launcher
block sizes, constexpr variants and dtypes (float32, float64, bfloat16, float16), forward and
backward. Output values are never computed.

Checks (exit status 1 if one fails): every kernel compiles; no kernel runs out of registers (the
255-register cap reached and values spilled to the stack: small stack frames below the cap are
the call frames of float64 division and the like, not spills); float64 kernels take no float32
scalar argument (it would be rounded). Reported per kernel: warps, shared memory, and from the
cubin (``cuobjdump -res-usage``, shipped with Triton) registers and the stack/local-memory bytes
per thread, which are nonzero when registers spill.

    python scripts/compile_triton_kernels.py [--arch 90] [--json out.json]

Needs ``TRITON_INTERPRET`` unset. Tested with Triton 3.x (uses ``JITFunction.run`` and
``triton.runtime.driver``); ``tests/test_triton_compile.py`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_triton_kernels: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from msflow_fast import ops  # noqa: E402
from msflow_fast.ops import _backend  # noqa: E402

MAX_REGISTERS = 255  # per thread on NVIDIA GPUs since sm_35
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _CompileOnlyCudaDriver:
    """Triton driver stand-in: a CUDA target of the given architecture, device 0, stream 0."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(arch: int, record: list):
    """Within: every Triton launch compiles for ``sm_<arch>`` and appends ``(name, kernel)`` to record."""
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        record.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_instead
    triton_interpreter_enabled = _backend.triton_interpreter_enabled
    _backend.triton_interpreter_enabled = lambda: True  # lets the ops accept CPU tensors for Triton
    active = driver._active  # None until something asks for a driver (there is none without a GPU)
    driver.set_active(_CompileOnlyCudaDriver(arch))
    try:
        yield
    finally:
        JITFunction.run = run
        _backend.triton_interpreter_enabled = triton_interpreter_enabled
        driver._active = active


def _randn(*shape, dtype, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _backward(outputs, inputs):
    outputs = [o for o in outputs if o.requires_grad]
    torch.autograd.grad(outputs, inputs, [torch.randn_like(o) for o in outputs], allow_unused=True)


def _coupling_cases(dtype):
    # MSFlow's middle scale (256 channels at 64x64, batch 8: half of them active) and an odd shape.
    params = torch.float64 if dtype == torch.float64 else torch.float32
    variants = [("tanh", "SOFTPLUS"), ("tanh_scaled", "SIGMOID"), ("atan", "EXP")]
    shapes = [(8, 128, 64, 64), (3, 7, 13, 17)] if dtype == torch.float32 else [(8, 128, 64, 64)]
    for b, c, h, w in shapes:
        for clamp_form, affine_type in variants:
            for reverse in (False, True):
                x, a = _randn(b, c, h, w, dtype=dtype), _randn(b, 2 * c, h, w, dtype=dtype)
                _backward(ops.affine_coupling(x, a, clamp=1.9, clamp_form=clamp_form, reverse=reverse, backend="triton"), [x, a])
                x, scale, offset = _randn(b, 2 * c, h, w, dtype=dtype), _randn(2 * c, dtype=params), _randn(2 * c, dtype=params)
                perm = torch.randperm(2 * c)
                y = ops.global_affine_permute(x, scale, offset, perm, affine_type=affine_type, reverse=reverse, backend="triton")
                _backward(y, [x, scale, offset])
            x, a = _randn(b, 2 * c, h, w, dtype=dtype), _randn(b, 2 * c, h, w, dtype=dtype)
            scale, offset, perm = _randn(2 * c, dtype=params), _randn(2 * c, dtype=params), torch.randperm(2 * c)
            y = ops.coupling_affine_permute(
                x, a, scale, offset, perm, clamp=1.9, clamp_form=clamp_form, affine_type=affine_type, backend="triton"
            )
            _backward(y, [x, a, scale, offset])


def _head_cases(dtype):
    shapes = [(8, 256, 32, 32), (3, 5, 7, 9)] if dtype == torch.float32 else [(8, 256, 32, 32)]
    for b, c, h, w in shapes:
        z, logdet = _randn(b, c, h, w, dtype=dtype), _randn(b, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        _backward([ops.gaussian_nll(z, logdet, backend="triton")], [z, logdet])
        _backward([ops.log_likelihood_map(z, backend="triton")], [z])
    with torch.no_grad():
        maps = [torch.randn(8, s, s, dtype=dtype) for s in (64, 32, 16)]
        ops.aggregate_anomaly_maps(maps, (256, 256), backend="triton")
        ops.log_space_score(maps, (256, 256), backend="triton")
        ops.aggregate_anomaly_maps([torch.randn(2, 5, 7, dtype=dtype)] * 5, (33, 29), backend="triton")
        # FastFlow's map: resnet18's three stages to a 256-px input, both scores; five odd scales.
        for log_space_score in (False, True):
            ops.aggregate_anomaly_maps(maps, (256, 256), mode="fastflow", log_space_score=log_space_score, backend="triton")
        ops.aggregate_anomaly_maps(
            [torch.randn(2, 5, 7, dtype=dtype)] * 5, (33, 29), mode="fastflow", log_space_score=True, log_offset=1.0, backend="triton"
        )


def _norm_cases(dtype):
    params = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [(8, 128, 64, 64), (3, 17, 5, 7)] if dtype == torch.float32 else [(8, 128, 64, 64)]
    for b, c, h, w in shapes:
        for addend_batch in (None, 1, b):
            x, weight, bias = _randn(b, c, h, w, dtype=dtype), _randn(c, dtype=params), _randn(c, dtype=params)
            addend = None if addend_batch is None else _randn(addend_batch, c, h, w, dtype=dtype)
            leaves = [t for t in (x, weight, bias, addend) if t is not None]
            _backward([ops.channel_layer_norm_relu(x, weight, bias, addend, backend="triton")], leaves)
    # FastFlow's per-sample LayerNorm: resnet18's first stage at batch 8 (N = 262144 per sample), an odd shape.
    for b, c, h, w in [(8, 64, 64, 64), (3, 7, 13, 17)] if dtype == torch.float32 else [(8, 64, 64, 64)]:
        for affine in (True, False):
            x = _randn(b, c, h, w, dtype=dtype)
            weight, bias = (_randn(c, h, w, dtype=params), _randn(c, h, w, dtype=params)) if affine else (None, None)
            leaves = [t for t in (x, weight, bias) if t is not None]
            _backward([ops.sample_layer_norm(x, weight, bias, backend="triton")], leaves)


CASES = {"coupling": _coupling_cases, "head": _head_cases, "norm": _norm_cases}


def _resources(kernel) -> dict:
    """Shared memory, and registers and stack/local bytes per thread from the kernel's cubin."""
    info = {"shared": int(kernel.metadata.shared)}
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        return info
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        text = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True).stdout
    for key, pattern in (("registers", r"REG:(\d+)"), ("stack", r"STACK:(\d+)"), ("local", r"LOCAL:(\d+)")):
        match = re.search(pattern, text)
        if match:
            info[key] = int(match.group(1))
    return info


def _float32_scalars(kernel) -> list[str]:
    """Names of the non-constexpr float32 scalar arguments of a compiled kernel."""
    return [name for name, kind in kernel.src.signature.items() if kind == "fp32"]


def compile_all(arch: int, dtypes: list[str], groups: list[str]) -> tuple[list[dict], list[str]]:
    """Compile every group's kernels for each dtype -> (one row per distinct kernel build, failures)."""
    rows, failures, seen = [], [], set()
    torch.manual_seed(0)
    for group in groups:
        for dtype_name in dtypes:
            record: list = []
            try:
                with compile_only(arch, record):
                    CASES[group](DTYPES[dtype_name])
            except Exception as error:  # one group's failure must not hide the others'
                failures.append(f"{group}/{dtype_name}: {type(error).__name__}: {error}".splitlines()[0][:400])
            for name, kernel in record:
                if kernel is None or kernel.hash in seen:
                    continue
                seen.add(kernel.hash)
                row = {"group": group, "dtype": dtype_name, "kernel": name, "warps": kernel.metadata.num_warps}
                row.update(_resources(kernel))
                rows.append(row)
                if row.get("registers", 0) >= MAX_REGISTERS and row.get("stack", 0) + row.get("local", 0) > 0:
                    failures.append(
                        f"{name} ({dtype_name}) spills registers: {row['registers']} registers, "
                        f"{row['stack']} B stack, {row['local']} B local per thread"
                    )
                bad = _float32_scalars(kernel)
                if dtype_name == "float64" and bad:
                    failures.append(f"{name} (float64) takes float32 scalar arguments {bad}: pass them as constexpr")
    return rows, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer (90 = H100)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="default: all four")
    parser.add_argument("--group", action="append", choices=sorted(CASES), help="default: all")
    parser.add_argument("--json", type=Path, help="also write the rows and failures here")
    args = parser.parse_args(argv)
    rows, failures = compile_all(args.arch, args.dtype or list(DTYPES), args.group or list(CASES))
    print(f"{'kernel':48} {'dtype':9} {'warps':>5} {'regs':>5} {'stack':>6} {'local':>6} {'shared':>7}")
    for r in rows:
        print(
            f"{r['kernel']:48} {r['dtype']:9} {r['warps']:5d} {r.get('registers', '-'):>5} "
            f"{r.get('stack', '-'):>6} {r.get('local', '-'):>6} {r['shared']:7d}"
        )
    print(f"{len(rows)} kernel builds for sm_{args.arch}, Triton {triton.__version__}, {len(failures)} failures")
    for failure in failures:
        print("FAIL", failure)
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "rows": rows, "failures": failures}, indent=1))
    return 1 if failures or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
