"""Triton backend of the likelihood and anomaly-map ops (kernels in :mod:`msflow_fast.kernels.head`).

Functions carry the names and signatures of :mod:`msflow_fast.ops.reference`; the NLL and the
log-likelihood map are differentiable through :class:`GaussianNLLFunction` and
:class:`LogLikelihoodMapFunction`. The aggregation ops are inference only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from msflow_fast.kernels import head as kernels


class GaussianNLLFunction(torch.autograd.Function):
    """``nll[b] = 0.5 * sum z[b]^2 - logdet[b]``; grads ``g * z`` and ``-g``."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
        z2 = z.detach().reshape(z.shape[0], -1).contiguous()
        ctx.save_for_backward(z2)
        ctx.z_shape = z.shape
        ctx.logdet_dtype = logdet.dtype
        return kernels.gaussian_nll_fwd(z2, logdet.detach().contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        (z2,) = ctx.saved_tensors
        grad_z = grad_logdet = None
        if ctx.needs_input_grad[0]:
            grad_z = kernels.gaussian_nll_bwd(grad.contiguous(), z2).view(ctx.z_shape)
        if ctx.needs_input_grad[1]:
            grad_logdet = (-grad).to(ctx.logdet_dtype)
        return grad_z, grad_logdet


class LogLikelihoodMapFunction(torch.autograd.Function):
    """``out[b, h, w] = -0.5 * mean_c z[b, c, h, w]^2``; grad ``-g * z / C``."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        zc = z.detach().contiguous()
        ctx.save_for_backward(zc)
        return kernels.log_likelihood_map_fwd(zc)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (zc,) = ctx.saved_tensors
        return kernels.log_likelihood_map_bwd(grad.contiguous(), zc)


def gaussian_nll(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum z^2 - logdet`` per sample; see :func:`msflow_fast.ops.reference.gaussian_nll`."""
    return GaussianNLLFunction.apply(z, logdet)


def log_likelihood_map(z: torch.Tensor) -> torch.Tensor:
    """``-0.5 * mean_c z^2``; see :func:`msflow_fast.ops.reference.log_likelihood_map`."""
    return LogLikelihoodMapFunction.apply(z)


@torch.no_grad()
def aggregate_anomaly_maps(
    log_likelihood_maps: Sequence[torch.Tensor],
    output_size: tuple[int, int],
    *,
    top_k: float = 0.03,
    log_space_score: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Fused "add"/"mul" maps and top-k score(s); see :func:`msflow_fast.ops.reference.aggregate_anomaly_maps`."""
    return kernels.aggregate_anomaly_maps_fwd(
        list(log_likelihood_maps), tuple(output_size), float(top_k), log_space_score=bool(log_space_score)
    )


@torch.no_grad()
def log_space_score(
    log_likelihood_maps: Sequence[torch.Tensor],
    output_size: tuple[int, int],
    *,
    top_k: float = 0.03,
) -> torch.Tensor:
    """Top-k mean of ``max L - L`` (nats); see :func:`msflow_fast.ops.reference.log_space_score`."""
    return kernels.log_space_score_fwd(list(log_likelihood_maps), tuple(output_size), float(top_k))


@torch.no_grad()
def fastflow_anomaly_map(
    log_likelihood_maps: Sequence[torch.Tensor],
    output_size: tuple[int, int],
    *,
    log_space_score: bool = False,
    log_offset: float = 0.0,
) -> tuple[torch.Tensor, ...]:
    """FastFlow's map and max score(s) in one pass; see :func:`msflow_fast.ops.reference.fastflow_anomaly_map`."""
    return kernels.fastflow_anomaly_map_fwd(
        list(log_likelihood_maps), tuple(output_size), log_space_score=bool(log_space_score), log_offset=float(log_offset)
    )


__all__ = [
    "GaussianNLLFunction",
    "LogLikelihoodMapFunction",
    "aggregate_anomaly_maps",
    "fastflow_anomaly_map",
    "gaussian_nll",
    "log_likelihood_map",
    "log_space_score",
]
