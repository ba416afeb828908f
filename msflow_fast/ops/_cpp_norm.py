"""C++/CUDA backend of the subnet norm op (``msflow_fast._C``, csrc/norm.cpp and csrc/cuda/norm.cu).

Registers the fake (meta) kernels and the autograd of ``channel_layer_norm_relu_fwd``; the
function below carries the name and signature of :mod:`msflow_fast.ops.reference`. Importing
this module raises ``ImportError`` when the extension is not available.
"""

from __future__ import annotations

import torch

from ._extension import extension_ops
from .reference import compute_dtype

_ops = extension_ops("channel_layer_norm_relu_fwd", "the subnet norm op (csrc/norm.cpp)")


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


__all__ = ["channel_layer_norm_relu"]
