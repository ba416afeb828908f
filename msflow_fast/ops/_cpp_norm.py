"""C++/CUDA backend of the norm ops (``msflow_fast._C``, csrc/norm.cpp and csrc/cuda/norm.cu).

Registers the fake (meta) kernels and the autograd of ``channel_layer_norm_relu_fwd`` and
``sample_layer_norm_fwd``; the functions below carry the names and signatures of
:mod:`msflow_fast.ops.reference`. Importing this module raises ``ImportError`` when the extension
is not available (or was built without the per-sample norm).
"""

from __future__ import annotations

import torch

from ._extension import extension_ops
from .reference import compute_dtype

_ops = extension_ops("sample_layer_norm_fwd", "the norm ops (csrc/norm.cpp)")


@torch.library.register_fake("msflow_fast::channel_layer_norm_relu_fwd")
def _fwd_fake(x, weight, bias, addend, eps):
    b, _, h, w = x.shape
    stats = x.new_empty((b, h * w), dtype=compute_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.register_fake("msflow_fast::channel_layer_norm_relu_bwd")
def _bwd_fake(grad, x, weight, bias, addend, mean, rstd):
    channels = x.new_empty((x.shape[1],), dtype=compute_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), channels, torch.empty_like(channels)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, addend, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, addend, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, bias, addend, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _ops.channel_layer_norm_relu_bwd(
        grad_out.contiguous(), x.contiguous(), weight, bias, addend, mean, rstd
    )
    grad_addend = None
    if addend is not None and ctx.needs_input_grad[3]:
        grad_addend = grad_x.sum(0, keepdim=True) if addend.shape[0] == 1 and x.shape[0] != 1 else grad_x
    return grad_x, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype), grad_addend, None


torch.library.register_autograd("msflow_fast::channel_layer_norm_relu_fwd", _backward, setup_context=_setup_context)


def channel_layer_norm_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    addend: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``relu(LayerNorm_C(x + addend))``; see :func:`msflow_fast.ops.reference.channel_layer_norm_relu`."""
    if not (x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()  # the CPU forward also reads channels-last x directly
    addend = addend.contiguous() if addend is not None else None
    return _ops.channel_layer_norm_relu_fwd(x, weight, bias, addend, float(eps))[0]


@torch.library.register_fake("msflow_fast::sample_layer_norm_fwd")
def _sample_fwd_fake(x, weight, bias, eps):
    stats = x.new_empty((x.shape[0],), dtype=compute_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.register_fake("msflow_fast::sample_layer_norm_bwd")
def _sample_bwd_fake(grad, x, weight, mean, rstd):
    params = x.new_empty(tuple(x.shape[1:]) if weight is not None else (0,), dtype=compute_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), params, torch.empty_like(params)


def _sample_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.param_dtypes = (None, None) if weight is None else (weight.dtype, bias.dtype)
    ctx.mark_non_differentiable(mean, rstd)


def _sample_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _ops.sample_layer_norm_bwd(grad_out.contiguous(), x, weight, mean, rstd)
    if weight is None:
        return grad_x, None, None, None
    return grad_x, grad_weight.to(ctx.param_dtypes[0]), grad_bias.to(ctx.param_dtypes[1]), None


torch.library.register_autograd("msflow_fast::sample_layer_norm_fwd", _sample_backward, setup_context=_sample_setup_context)


def sample_layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """Per-sample LayerNorm over ``x.shape[1:]``; see :func:`msflow_fast.ops.reference.sample_layer_norm`."""
    return _ops.sample_layer_norm_fwd(x.contiguous(), weight, bias, float(eps))[0]


__all__ = ["channel_layer_norm_relu", "sample_layer_norm"]
