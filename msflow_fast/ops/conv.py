"""Public convolution op of the coupling subnets: a 3x3 convolution that the C++ backend computes
by Winograd F(4x4, 3x3) on the CPU at inference.

The maths is :func:`msflow_fast.ops.reference.conv3x3` (``F.conv2d(x, w, b, padding=1)``); this
wrapper validates and dispatches to a backend.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from . import _backend
from . import _validate as v
from . import reference

ENV_WINOGRAD = "MSFLOW_FAST_WINOGRAD"
"""Set to ``0`` to compute every :func:`conv3x3` with ``F.conv2d`` (the Winograd path is on by default)."""


WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_MIN_TILES = 16
"""Below these (input channels; 4x4 output tiles over the batch, ``B * ceil(H/4) * ceil(W/4)``)
``F.conv2d`` is kept. Measured on a 2-core AVX-512 CPU: 16 channels ran at 0.8x of ``F.conv2d``,
24-32 at 1.3-1.9x; 4 or 8 tiles (batch 1-2 at 8x8) at 0.4x, 16 tiles at 1.5x."""


def winograd_enabled(x: torch.Tensor, *, backend: str | None = None) -> bool:
    """Whether :func:`conv3x3` of ``x`` would use Winograd weights if given them.

    True for float32/float64 CPU tensors ``[B, C, H, W]`` with at least :data:`WINOGRAD_MIN_CHANNELS`
    channels and :data:`WINOGRAD_MIN_TILES` tiles, with autograd and CPU autocast off, when the
    backend in force for ``conv3x3`` is ``cpp`` and ``MSFLOW_FAST_WINOGRAD`` is not ``0``, and not
    while torch.compile/torch.export trace (the graph keeps ``F.conv2d``: portable, and no guard on
    the batch size from the tile threshold). Callers use it to decide whether
    :func:`conv3x3_winograd_weight` is worth computing (and caching).
    """
    if not _winograd_applicable(x):
        return False
    name, _ = _backend.resolve("conv3x3", x.device, backend)
    return name == "cpp"


def _winograd_applicable(x: torch.Tensor) -> bool:
    """Every condition of :func:`winograd_enabled` but the backend's."""
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if torch.is_autocast_enabled("cpu"):  # F.conv2d computes in the autocast dtype there
        return False
    if x.dim() != 4 or x.shape[1] < WINOGRAD_MIN_CHANNELS:
        return False
    if x.shape[0] * -(-x.shape[2] // 4) * -(-x.shape[3] // 4) < WINOGRAD_MIN_TILES:
        return False
    return os.environ.get(ENV_WINOGRAD, "1").strip() != "0"


def conv3x3_winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """The Winograd F(4x4, 3x3) form ``[36, C_out, C_in]`` of a 3x3 weight ``[C_out, C_in, 3, 3]``.

    Four times the weight's memory; compute it once per weight (see
    :func:`msflow_fast.ops.reference.winograd_weight`).
    """
    v.tensor(weight, "weight", ndim=4)
    return reference.winograd_weight(weight)


def conv3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weight_winograd: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """3x3 convolution, stride 1, zero padding 1 (``F.conv2d(x, weight, bias, padding=1)``).

    With ``weight_winograd`` (from :func:`conv3x3_winograd_weight`) and :func:`winograd_enabled`,
    the ``cpp`` backend computes it by Winograd F(4x4, 3x3): a quarter of the multiplications,
    float32 results within about 1e-5 of the output's scale of ``F.conv2d``'s (float64: 1e-14).
    Otherwise, and always with autograd on, it is ``F.conv2d``.

    Args:
        x: ``[B, C_in, H, W]``.
        weight: ``[C_out, C_in, 3, 3]``, x's dtype and device.
        bias: optional ``[C_out]``.
        weight_winograd: optional ``[36, C_out, C_in]``, the Winograd form of ``weight``
            (trusted to match it), or a function returning it, called only when Winograd runs
            (e.g. a cache lookup: the backend is then resolved once for the decision and the call).
        backend: as in :func:`msflow_fast.ops.affine_coupling`.

    Returns:
        ``[B, C_out, H, W]``.
    """
    v.tensor(x, "x", ndim=4)
    v.tensor(weight, "weight", ndim=4)
    v.same_device_dtype("x", x, weight=weight)
    if tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"weight must have shape [C_out, {x.shape[1]}, 3, 3] for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None:
        v.tensor(bias, "bias", ndim=1)
        v.same_device_dtype("x", x, bias=bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}] (C_out), got {tuple(bias.shape)}")
    name, impl = _backend.resolve("conv3x3", x.device, backend)
    if callable(weight_winograd):
        weight_winograd = weight_winograd() if name == "cpp" and _winograd_applicable(x) else None
    if weight_winograd is not None:
        v.tensor(weight_winograd, "weight_winograd", ndim=3)
        v.same_device_dtype("weight", weight, weight_winograd=weight_winograd)
        if tuple(weight_winograd.shape) != (36, weight.shape[0], weight.shape[1]):
            raise ValueError(
                f"weight_winograd must have shape (36, {weight.shape[0]}, {weight.shape[1]}) for weight "
                f"{tuple(weight.shape)}, got {tuple(weight_winograd.shape)}"
            )
    return impl(x, weight, bias, weight_winograd)


__all__ = ["ENV_WINOGRAD", "WINOGRAD_MIN_CHANNELS", "WINOGRAD_MIN_TILES", "conv3x3", "conv3x3_winograd_weight", "winograd_enabled"]
