"""Loading of the C++/CUDA extension ``msflow_fast._C`` (once), for the ``cpp`` backend modules."""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch

ENV_DISABLE_EXTENSION = "MSFLOW_FAST_DISABLE_EXT"
ABI_VERSION = 3
"""The op schemas this Python code calls (``abi_version()`` of csrc/extension.cpp): a build from
other sources is not used (the ``cpp`` backend is then unavailable and says to rebuild)."""


@functools.lru_cache(maxsize=None)
def extension_info() -> dict[str, Any]:
    """Load ``msflow_fast._C`` once; report whether it loaded and whether CUDA sources were compiled in.

    Returns:
        ``{"loaded": bool, "cuda": bool, "error": str | None}``.
    """
    if os.environ.get(ENV_DISABLE_EXTENSION, "0") == "1":
        return {"loaded": False, "cuda": False, "error": f"disabled by {ENV_DISABLE_EXTENSION}=1"}
    try:
        importlib.import_module("msflow_fast._C")
    except ImportError as exc:
        return {"loaded": False, "cuda": False, "error": f"{type(exc).__name__}: {exc}"}
    ops = torch.ops.msflow_fast
    built = int(ops.abi_version()) if hasattr(ops, "abi_version") else 1
    if built != ABI_VERSION:
        return {
            "loaded": False,
            "cuda": False,
            "error": f"msflow_fast._C was built from other sources (op ABI {built}, this code needs {ABI_VERSION}); "
            "rebuild it: pip install --no-build-isolation -e .",
        }
    return {"loaded": True, "cuda": bool(ops.compiled_with_cuda()), "error": None}


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


__all__ = ["ABI_VERSION", "ENV_DISABLE_EXTENSION", "extension_info", "extension_ops"]
