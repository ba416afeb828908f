"""Public norm ops: the per-pixel channel LayerNorm + ReLU of MSFlow's coupling subnet, and the
per-sample LayerNorm over [C, H, W] of FastFlow's features.

The formulas are :func:`msflow_fast.ops.reference.channel_layer_norm_relu` and
:func:`~msflow_fast.ops.reference.sample_layer_norm`; these wrappers validate and dispatch.
"""

from __future__ import annotations

import torch

from . import _backend
from . import _validate as v

def channel_layer_norm_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    addend: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    backend: str | None = None,
    check_finite: bool | None = None,
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
        backend, check_finite: as in :func:`msflow_fast.ops.affine_coupling`.

    Returns:
        ``[B, C, H, W]`` in x's dtype (contiguous from the fused backends); differentiable
        with respect to ``x``, ``weight``, ``bias`` and ``addend``.
    """
    v.tensor(x, "x", ndim=4)
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one channel [B, C, H, W], got shape {tuple(x.shape)}")
    for name, param in (("weight", weight), ("bias", bias)):
        v.channel_vector(param, name, x.shape[1], x)
        if param.dim() != 1:
            raise ValueError(f"{name} must be 1-D [C] = ({x.shape[1]},), got shape {tuple(param.shape)}")
        v.parameter_dtype(param, name, x)
    if addend is not None:
        v.tensor(addend, "addend", ndim=4)
        v.same_device_dtype("x", x, addend=addend)
        if addend.shape[1:] != x.shape[1:] or addend.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"addend must have shape [1 or B, C, H, W] with x {tuple(x.shape)}, got {tuple(addend.shape)}"
            )
        if addend.shape[0] > 1 and addend.stride(0) == 0:
            addend = addend[:1]  # an expanded addend is read once per pixel, not materialised per sample
    eps = v.positive_float(eps, "eps")
    if v.check_finite_enabled(check_finite):
        v.finite(x, "x")
        if addend is not None:
            v.finite(addend, "addend")
    _, impl = _backend.resolve("channel_layer_norm_relu", x.device, backend)
    return impl(x, weight, bias, addend, eps)


def sample_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    backend: str | None = None,
    check_finite: bool | None = None,
) -> torch.Tensor:
    """Per-sample LayerNorm over ``C * H * W``: ``F.layer_norm(x, x.shape[1:], weight, bias, eps)``.

    Args:
        x: ``[B, C, H, W]`` (or ``[B, ...]``, at least 2-D).
        weight, bias: the element-wise affine, ``x.shape[1:]`` (x's dtype, or float32 for half x),
            or both ``None``.
        eps: variance epsilon (``nn.LayerNorm.eps``).
        backend, check_finite: as in :func:`msflow_fast.ops.affine_coupling`.

    Returns:
        x's shape and dtype (contiguous from the fused backends); differentiable with respect to
        ``x``, ``weight`` and ``bias``.
    """
    v.tensor(x, "x")
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty [B, ...] tensor with at least 2 dims, got shape {tuple(x.shape)}")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias must be given together (or both None for no affine)")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        v.tensor(param, name)
        if tuple(param.shape) != tuple(x.shape[1:]):
            raise ValueError(f"{name} must have x's per-sample shape {tuple(x.shape[1:])}, got {tuple(param.shape)}")
        if param.device != x.device:
            raise TypeError(f"{name} is on {param.device} but x is on {x.device}")
        v.parameter_dtype(param, name, x)
    eps = v.positive_float(eps, "eps")
    if v.check_finite_enabled(check_finite):
        v.finite(x, "x")
    _, impl = _backend.resolve("sample_layer_norm", x.device, backend)
    return impl(x, weight, bias, eps)


__all__ = ["channel_layer_norm_relu", "sample_layer_norm"]
