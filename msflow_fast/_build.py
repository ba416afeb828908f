"""What was built and what can run: the C++/CUDA extension, Triton, versions."""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch


@functools.lru_cache(maxsize=None)
def extension_info() -> dict[str, Any]:
    """Load ``msflow_fast._C`` once; report whether it loaded and whether CUDA sources were compiled in."""
    if os.environ.get("MSFLOW_FAST_DISABLE_EXT", "0") == "1":
        return {"loaded": False, "cuda": False, "error": "disabled by MSFLOW_FAST_DISABLE_EXT=1"}
    try:
        importlib.import_module("msflow_fast._C")
    except ImportError as exc:
        return {"loaded": False, "cuda": False, "error": f"{type(exc).__name__}: {exc}"}
    cuda = bool(torch.ops.msflow_fast.compiled_with_cuda())
    return {"loaded": True, "cuda": cuda, "error": None}


def extension_ops(required_op: str, what: str):
    """``torch.ops.msflow_fast`` for a C++ backend module, or ``ImportError`` (which the backend
    registry records) when the extension is missing or was built without ``required_op``.

    Args:
        required_op: an op the caller needs, e.g. ``"affine_coupling_fwd"``.
        what: what it belongs to, for the message, e.g. ``"the coupling ops (csrc/coupling.cpp)"``.
    """
    info = extension_info()
    if not info["loaded"]:
        raise ImportError(f"msflow_fast._C is not available: {info['error']}")
    ops = torch.ops.msflow_fast
    if not hasattr(ops, required_op):
        raise ImportError(f"msflow_fast._C was built without {what}; rebuild the extension")
    return ops


def build_info() -> dict[str, Any]:
    """What this installation can run.

    Returns:
        A dict with ``version``, ``torch``, ``torch_cuda`` (the CUDA version torch was built
        with, or ``None``), ``extension`` (``msflow_fast._C`` loaded), ``extension_cuda`` (its CUDA
        sources were compiled), ``extension_error``, ``triton`` (version or ``None``),
        ``triton_interpret`` (``TRITON_INTERPRET=1``), ``cuda_available`` and ``backends``
        (per device, as :func:`msflow_fast.ops.available_backends`).
    """
    from . import __version__
    from .ops import available_backends
    from .ops._backend import triton_interpreter_enabled

    ext = extension_info()
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": ext["loaded"],
        "extension_cuda": ext["cuda"],
        "extension_error": ext["error"],
        "triton": triton_version,
        "triton_interpret": triton_interpreter_enabled(),
        "cuda_available": torch.cuda.is_available(),
        "backends": {d: available_backends(d) for d in devices},
    }
