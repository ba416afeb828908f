"""Backend selection for the fused ops.

Precedence: a per-call ``backend=`` argument, then :func:`use_backend` (a context manager),
then the ``MSFLOW_FAST_BACKEND`` environment variable, then ``"auto"``.

Auto: CUDA tensors use ``triton``, else ``cpp``, else ``reference`` (in deterministic mode the
ops of :data:`CUDA_ATOMIC_OPS` skip ``cpp``); CPU tensors use ``cpp``, else ``reference``. The Triton interpreter is never picked automatically. Auto never raises;
an explicit request for a backend that cannot run raises ``RuntimeError`` saying how to get it.

While ``torch.onnx.export`` traces (``torch.onnx.is_in_onnx_export()``), every op runs its
``reference`` decomposition, whatever was requested: the fused ops have no ONNX translation, and
plain ATen ops export to standard ONNX operators (so ONNX Runtime and OpenVINO need nothing of
msflow_fast).

Each backend other than ``reference`` is a list of implementation modules that define
functions named like the public ops; an op that a backend does not define is not available
on it (auto skips it, an explicit request raises).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Callable, Iterator
from types import ModuleType

import torch
import torch._dynamo

from . import reference

BACKENDS = ("reference", "triton", "cpp")
CUDA_ATOMIC_OPS = frozenset({"affine_coupling", "global_affine_permute", "coupling_affine_permute"})
"""Ops whose C++ CUDA kernels sum with float atomics (not bit-reproducible): under
``torch.use_deterministic_algorithms(True)`` auto skips them for Triton, else the reference."""
ENV_BACKEND = "MSFLOW_FAST_BACKEND"

_IMPLEMENTATION_MODULES: dict[str, tuple[str, ...]] = {
    "triton": ("msflow_fast.ops._triton_coupling", "msflow_fast.ops._triton_head", "msflow_fast.ops._triton_norm"),
    "cpp": ("msflow_fast.ops._cpp_coupling", "msflow_fast.ops._cpp_head", "msflow_fast.ops._cpp_norm", "msflow_fast.ops._cpp_conv"),
}

_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("msflow_fast_backend", default=None)
_module_cache: dict[str, ModuleType | None] = {}
_import_errors: dict[str, str] = {}


def _validate_name(name: str, source: str) -> str:
    if name not in (*BACKENDS, "auto"):
        raise ValueError(f"{source} must be one of {('auto', *BACKENDS)}, got {name!r}")
    return name


def _load(module_name: str) -> ModuleType | None:
    if module_name not in _module_cache:
        try:
            _module_cache[module_name] = importlib.import_module(module_name)
        except ImportError as exc:  # missing triton, extension not built, module not written yet
            _module_cache[module_name] = None
            _import_errors[module_name] = f"{type(exc).__name__}: {exc}"
    return _module_cache[module_name]


def _find_impl(backend: str, op: str) -> Callable | None:
    if backend == "reference":
        return getattr(reference, op)
    for module_name in _IMPLEMENTATION_MODULES[backend]:
        module = _load(module_name)
        if module is not None and hasattr(module, op):
            return getattr(module, op)
    return None


def triton_interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set (Triton kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_runnable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _why_unavailable(backend: str, op: str, device: torch.device) -> str | None:
    """``None`` if ``backend`` can run ``op`` on ``device``, else a sentence saying how to fix it."""
    if backend == "reference":
        return None
    if backend == "triton":
        if not _triton_runnable():
            return "the 'triton' package is not installed: pip install triton (it ships with CUDA builds of torch)"
        if device.type == "cpu" and not triton_interpreter_enabled():
            return (
                "Triton kernels need a CUDA tensor; to run them on CPU tensors set TRITON_INTERPRET=1 "
                "in the environment before msflow_fast is imported (slow, for testing only)"
            )
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels support CUDA (or CPU under TRITON_INTERPRET=1) tensors, got device {device}"
    if backend == "cpp":
        from ._extension import extension_info

        info = extension_info()
        if not info["loaded"]:
            return (
                f"the C++ extension msflow_fast._C is not available ({info['error']}); reinstall with "
                "`pip install --no-build-isolation -e .` after torch, without MSFLOW_FAST_NO_EXT=1"
            )
        if device.type == "cuda" and not info["cuda"]:
            return (
                "msflow_fast._C was built without CUDA sources; rebuild on a machine with nvcc and a CUDA "
                "build of torch (set CUDA_HOME and TORCH_CUDA_ARCH_LIST if no GPU is visible)"
            )
        if device.type not in ("cpu", "cuda"):
            return f"the C++ extension supports CPU and CUDA tensors, got device {device}"
    if _find_impl(backend, op) is None:
        modules = ", ".join(_IMPLEMENTATION_MODULES[backend])
        errors = "; ".join(f"{m}: {_import_errors[m]}" for m in _IMPLEMENTATION_MODULES[backend] if m in _import_errors)
        return f"backend {backend!r} has no implementation of {op!r} (looked in {modules}{'; ' + errors if errors else ''})"
    return None


def requested_backend(backend: str | None = None) -> str:
    """The backend name in force for a call: argument, context, environment, then ``"auto"``."""
    if backend is not None:
        return _validate_name(backend, "backend")
    context = _context_backend.get()
    if context is not None:
        return context
    env = os.environ.get(ENV_BACKEND)
    if env:
        return _validate_name(env.strip().lower(), ENV_BACKEND)
    return "auto"


@torch._dynamo.assume_constant_result
def _resolve_name(op: str, device_type: str, backend: str | None) -> str:
    # A constant for torch.compile / torch.export: the backend is chosen once, at trace time.
    if torch.onnx.is_in_onnx_export():
        return "reference"  # see the module docstring: ONNX export traces the reference maths
    device = torch.device(device_type)
    name = requested_backend(backend)
    if name != "auto":
        why = _why_unavailable(name, op, device)
        if why is not None:
            raise RuntimeError(f"msflow_fast backend {name!r} is unavailable for {op} on {device.type}: {why}")
        return name
    order = ("triton", "cpp") if device.type == "cuda" else ("cpp",)
    if device.type == "cuda" and op in CUDA_ATOMIC_OPS and torch.are_deterministic_algorithms_enabled():
        order = ("triton",)  # the C++ CUDA kernels of these ops would raise in deterministic mode
    for candidate in order:
        if _why_unavailable(candidate, op, device) is None:
            return candidate
    return "reference"


def resolve(op: str, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """Pick the backend and implementation of ``op`` for tensors on ``device``.

    Under ``torch.compile``/``torch.export`` the choice is made once, when the graph is traced
    (changing the backend later does not retrace a compiled function).

    Raises:
        RuntimeError: an explicitly requested backend cannot run here; the message says how to fix it.
    """
    name = _resolve_name(op, device.type, backend)
    return name, _find_impl(name, op)


def available_backends(device: str | torch.device = "cpu", op: str | None = None) -> list[str]:
    """Backends that can run on ``device`` (and implement ``op``, if given), in the order listed in ``BACKENDS``."""
    device = torch.device(device)
    ops = [op] if op is not None else ["affine_coupling"]
    return [b for b in BACKENDS if all(_why_unavailable(b, o, device) is None for o in ops)]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects a backend (or ``"auto"``) for the ops called inside it.

    Example:
        >>> with msflow_fast.ops.use_backend("reference"):
        ...     y, logdet = msflow_fast.ops.affine_coupling(x, a, clamp=1.9)
    """
    token = _context_backend.set(_validate_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _context_backend.reset(token)
