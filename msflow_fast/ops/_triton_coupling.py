"""Triton backend of the flow-block ops: autograd functions over the launchers in
:mod:`msflow_fast.kernels.coupling`.

The functions here have the signatures and returns of :mod:`msflow_fast.ops.reference` and are
looked up by name by :mod:`msflow_fast.ops._backend`; inputs arrive validated from
:mod:`msflow_fast.ops.coupling`. Gradients flow to every floating input (``x``, ``a``,
``global_scale``, ``global_offset``); double backward is not supported. Kernels compute in float32
(float64 for float64 inputs), as the reference does: outputs come back in ``x.dtype``, log-dets in
the compute dtype (float32 for float16/bfloat16 inputs). The per-channel parameters are read in the
compute dtype (float32 parameters of half inputs unrounded) and their gradients are cast back to
the parameters' own dtype.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from msflow_fast.kernels import coupling as kernels


class AffineCouplingFunction(torch.autograd.Function):
    """Soft-clamped affine coupling (forward or reverse) with a recomputing backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, clamp: float, clamp_form: str, reverse: bool):
        launcher = kernels.affine_coupling_inv if reverse else kernels.affine_coupling_fwd
        y, logdet = launcher(x, a, clamp=clamp, clamp_form=clamp_form)
        ctx.save_for_backward(x, a)
        ctx.clamp, ctx.clamp_form, ctx.reverse = clamp, clamp_form, reverse
        return y, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor, grad_logdet: torch.Tensor):
        x, a = ctx.saved_tensors
        grad_x, grad_a = kernels.affine_coupling_bwd(
            grad_y,
            grad_logdet,
            x,
            a,
            clamp=ctx.clamp,
            clamp_form=ctx.clamp_form,
            reverse=ctx.reverse,
        )
        return grad_x, grad_a, None, None, None


class GlobalAffinePermuteFunction(torch.autograd.Function):
    """Per-channel global affine and channel permutation (forward gather or reverse scatter)."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        global_scale: torch.Tensor,
        global_offset: torch.Tensor,
        perm: torch.Tensor,
        affine_type: str,
        reverse: bool,
    ):
        launcher = kernels.global_affine_permute_inv if reverse else kernels.global_affine_permute_fwd
        y, logdet = launcher(x, global_scale, global_offset, perm, affine_type=affine_type)
        ctx.save_for_backward(x, global_scale, global_offset, perm)
        ctx.affine_type, ctx.reverse = affine_type, reverse
        return y, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor, grad_logdet: torch.Tensor):
        x, global_scale, global_offset, perm = ctx.saved_tensors
        grad_x, grad_scale, grad_offset = kernels.global_affine_permute_bwd(
            grad_y,
            grad_logdet,
            x,
            global_scale,
            global_offset,
            perm,
            affine_type=ctx.affine_type,
            reverse=ctx.reverse,
        )
        return (
            grad_x,
            grad_scale.reshape(global_scale.shape).to(global_scale.dtype),
            grad_offset.reshape(global_offset.shape).to(global_offset.dtype),
            None,
            None,
            None,
        )


class CouplingAffinePermuteFunction(torch.autograd.Function):
    """Fused forward tail of an AllInOneBlock: coupling, global affine and permutation."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        a: torch.Tensor,
        global_scale: torch.Tensor,
        global_offset: torch.Tensor,
        perm: torch.Tensor,
        clamp: float,
        clamp_form: str,
        affine_type: str,
    ):
        y, logdet = kernels.coupling_affine_permute_fwd(
            x,
            a,
            global_scale,
            global_offset,
            perm,
            clamp=clamp,
            clamp_form=clamp_form,
            affine_type=affine_type,
        )
        ctx.save_for_backward(x, a, global_scale, global_offset, perm)
        ctx.clamp, ctx.clamp_form, ctx.affine_type = clamp, clamp_form, affine_type
        return y, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor, grad_logdet: torch.Tensor):
        x, a, global_scale, global_offset, perm = ctx.saved_tensors
        grad_x, grad_a, grad_scale, grad_offset = kernels.coupling_affine_permute_bwd(
            grad_y,
            grad_logdet,
            x,
            a,
            global_scale,
            global_offset,
            perm,
            clamp=ctx.clamp,
            clamp_form=ctx.clamp_form,
            affine_type=ctx.affine_type,
        )
        return (
            grad_x,
            grad_a,
            grad_scale.reshape(global_scale.shape).to(global_scale.dtype),
            grad_offset.reshape(global_offset.shape).to(global_offset.dtype),
            None,
            None,
            None,
            None,
        )


def affine_coupling(
    x: torch.Tensor,
    a: torch.Tensor,
    *,
    clamp: float,
    clamp_form: str = "tanh",
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`msflow_fast.ops.reference.affine_coupling`: ``(y [B, C, H, W], logdet [B])``."""
    return AffineCouplingFunction.apply(x, a, float(clamp), clamp_form, bool(reverse))


def global_affine_permute(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    global_offset: torch.Tensor,
    perm: torch.Tensor,
    *,
    affine_type: str = "SOFTPLUS",
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`msflow_fast.ops.reference.global_affine_permute`: ``(y [B, C, H, W], logdet [B])``."""
    return GlobalAffinePermuteFunction.apply(x, global_scale, global_offset, perm, affine_type, bool(reverse))


def coupling_affine_permute(
    x: torch.Tensor,
    a: torch.Tensor,
    global_scale: torch.Tensor,
    global_offset: torch.Tensor,
    perm: torch.Tensor,
    *,
    clamp: float,
    clamp_form: str = "tanh",
    affine_type: str = "SOFTPLUS",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`msflow_fast.ops.reference.coupling_affine_permute`: ``(y [B, C, H, W], logdet [B])``."""
    return CouplingAffinePermuteFunction.apply(
        x, a, global_scale, global_offset, perm, float(clamp), clamp_form, affine_type
    )


__all__ = [
    "AffineCouplingFunction",
    "CouplingAffinePermuteFunction",
    "GlobalAffinePermuteFunction",
    "affine_coupling",
    "coupling_affine_permute",
    "global_affine_permute",
]
