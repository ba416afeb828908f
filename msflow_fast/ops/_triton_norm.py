"""Triton backend of the subnet norm op (kernels in :mod:`msflow_fast.kernels.norm`).

The function carries the name and signature of :mod:`msflow_fast.ops.reference`; it is
differentiable through :class:`ChannelLayerNormReLUFunction`.
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


__all__ = ["ChannelLayerNormReLUFunction", "channel_layer_norm_relu"]
