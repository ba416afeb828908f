"""What was built and what can run: the C++/CUDA extension, Triton, versions (above ``ops``: it reads them)."""

from __future__ import annotations

from typing import Any

import torch


def build_info() -> dict[str, Any]:
    """What this installation can run.

    Returns:
        A dict with ``version``, ``torch``, ``torch_cuda`` (the CUDA version torch was built
        with, or ``None``), ``extension`` (``msflow_fast._C`` loaded), ``extension_cuda`` (its CUDA
        sources were compiled), ``extension_error``, ``triton`` (version or ``None``),
        ``triton_interpret`` (``TRITON_INTERPRET=1``), ``cuda_available`` and ``backends``
        (per device, as :func:`msflow_fast.ops.available_backends`).
    """
    from ._version import __version__
    from .ops import available_backends
    from .ops._backend import triton_interpreter_enabled
    from .ops._extension import extension_info

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
