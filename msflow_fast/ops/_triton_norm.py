"""Triton backend of the norm ops (kernels in :mod:`msflow_fast.kernels.norm`).

The functions carry the names and signatures of :mod:`msflow_fast.ops.reference`; they are
differentiable through :class:`ChannelLayerNormReLUFunction` and :class:`SampleLayerNormFunction`.
"""

from __future__ import annotations

import torch

from msflow_fast.kernels import norm as kernels


class ChannelLayerNormReLUFunction(torch.autograd.Function):
    """``relu(LayerNorm_C(x + addend))``; saves the inputs and the per-pixel mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, addend, eps):
        xc = x.detach().contiguous()
        ac = addend.detach().contiguous() if addend is not None else None
        wc, bc = weight.detach().contiguous(), bias.detach().contiguous()
        out, mean, rstd = kernels.channel_layer_norm_relu_fwd(xc, wc, bc, ac, eps)
        ctx.save_for_backward(xc, wc, bc, ac, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        xc, wc, bc, ac, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = kernels.channel_layer_norm_relu_bwd(grad.contiguous(), xc, wc, bc, ac, mean, rstd)
        grad_addend = None
        if ac is not None and ctx.needs_input_grad[3]:
            grad_addend = grad_x.sum(0, keepdim=True) if ac.shape[0] == 1 and xc.shape[0] != 1 else grad_x
        return grad_x, grad_weight.to(wc.dtype), grad_bias.to(bc.dtype), grad_addend, None


def channel_layer_norm_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    addend: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``relu(LayerNorm_C(x + addend))``; see :func:`msflow_fast.ops.reference.channel_layer_norm_relu`."""
    return ChannelLayerNormReLUFunction.apply(x, weight, bias, addend, float(eps))


class SampleLayerNormFunction(torch.autograd.Function):
    """Per-sample LayerNorm over ``x.shape[1:]``; saves x (as ``[B, N]``), the weight and the per-sample mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        xc = x.detach().contiguous().view(x.shape[0], -1)
        wc = weight.detach().contiguous().view(-1) if weight is not None else None
        bc = bias.detach().contiguous().view(-1) if bias is not None else None
        out, mean, rstd = kernels.sample_layer_norm_fwd(xc, wc, bc, eps)
        ctx.save_for_backward(xc, wc, mean, rstd)
        ctx.x_shape = x.shape
        ctx.param_dtypes = (None, None) if weight is None else (weight.dtype, bias.dtype)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        xc, wc, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = kernels.sample_layer_norm_bwd(grad.contiguous().view(xc.shape), xc, wc, mean, rstd)
        grad_x = grad_x.view(ctx.x_shape)
        if wc is None:
            return grad_x, None, None, None
        shape = ctx.x_shape[1:]
        return grad_x, grad_weight.view(shape).to(ctx.param_dtypes[0]), grad_bias.view(shape).to(ctx.param_dtypes[1]), None


def sample_layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """Per-sample LayerNorm over ``x.shape[1:]``; see :func:`msflow_fast.ops.reference.sample_layer_norm`."""
    return SampleLayerNormFunction.apply(x, weight, bias, float(eps))


__all__ = ["ChannelLayerNormReLUFunction", "SampleLayerNormFunction", "channel_layer_norm_relu", "sample_layer_norm"]
