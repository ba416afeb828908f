"""Public subnet op: the fused per-pixel channel LayerNorm + ReLU of MSFlow's coupling subnet.

The formula is :func:`msflow_fast.ops.reference.channel_layer_norm_relu`; this wrapper
validates and dispatches to a backend.
"""

from __future__ import annotations

import math

import torch

from . import _backend
from . import _validate as v

_HALF = (torch.float16, torch.bfloat16)


def _affine_parameter(value: object, name: str, x: torch.Tensor) -> torch.Tensor:
    v.channel_vector(value, name, x.shape[1], x)
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D [C] = ({x.shape[1]},), got shape {tuple(value.shape)}")
    if value.dtype != x.dtype and not (x.dtype in _HALF and value.dtype == torch.float32):
        raise TypeError(
            f"{name} has dtype {value.dtype} but x has {x.dtype}; pass x's dtype (or float32 for half/bfloat16 x)"
        )
    return value


def channel_layer_norm_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    addend: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """``relu(LayerNorm_C(x + addend))`` at every pixel of ``x [B, C, H, W]`` in one pass.

    Replaces ``relu(layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))`` (a layout copy,
    the norm, the ReLU and, with ``addend``, an add) by one read and one write of ``x``.

    Args:
        x: ``[B, C, H, W]`` (any strides; fused kernels read it as NCHW).
        weight, bias: LayerNorm affine ``[C]``, x's dtype (or float32 for half/bfloat16 x).
        addend: optional ``[1, C, H, W]`` (broadcast over the batch, e.g. a batch-constant
            condition's share of the previous conv) or ``[B, C, H, W]``, x's dtype.
        eps: variance epsilon (``nn.LayerNorm.eps``).
        backend: as in :func:`msflow_fast.ops.affine_coupling`.

    Returns:
        ``[B, C, H, W]`` in x's dtype (contiguous from the fused backends); differentiable
        with respect to ``x``, ``weight``, ``bias`` and ``addend``.
    """
    v.tensor(x, "x", ndim=4)
    if x.shape[1] < 1 or x.numel() == 0:
        raise ValueError(f"x must be non-empty [B, C, H, W], got shape {tuple(x.shape)}")
    _affine_parameter(weight, "weight", x)
    _affine_parameter(bias, "bias", x)
    if addend is not None:
        v.tensor(addend, "addend", ndim=4)
        v.same_device_dtype("x", x, addend=addend)
        if addend.shape[1:] != x.shape[1:] or addend.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"addend must have shape [1 or B, C, H, W] with x {tuple(x.shape)}, got {tuple(addend.shape)}"
            )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite float > 0 (the LayerNorm variance epsilon), got {eps!r}")
    _, impl = _backend.resolve("channel_layer_norm_relu", x.device, backend)
    return impl(x, weight, bias, addend, float(eps))


__all__ = ["channel_layer_norm_relu"]
