"""C++/CUDA backend of the likelihood and anomaly-map ops (``msflow_fast._C``).

Registers fake (meta) kernels for every ``msflow_fast::*`` head op and autograd for
``gaussian_nll_fwd`` and ``log_likelihood_map_fwd`` (the map-aggregation ops are forward only:
:func:`msflow_fast.ops.aggregate_anomaly_maps` takes their gradients from the reference); the
functions below carry the names and signatures of :mod:`msflow_fast.ops.reference`. Importing this module raises ``ImportError``
when the extension is not available.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._extension import extension_ops
from .reference import compute_dtype

_ops = extension_ops("fastflow_anomaly_map_fwd", "the head ops (csrc/head.cpp)")


@torch.library.register_fake("msflow_fast::gaussian_nll_fwd")
def _gaussian_nll_fwd_fake(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    return z.new_empty((z.shape[0],), dtype=compute_dtype(z.dtype))


@torch.library.register_fake("msflow_fast::gaussian_nll_bwd")
def _gaussian_nll_bwd_fake(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.register_fake("msflow_fast::log_likelihood_map_fwd")
def _log_likelihood_map_fwd_fake(z: torch.Tensor) -> torch.Tensor:
    b, _, h, w = z.shape
    return z.new_empty((b, h, w), dtype=compute_dtype(z.dtype))


@torch.library.register_fake("msflow_fast::log_likelihood_map_bwd")
def _log_likelihood_map_bwd_fake(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.register_fake("msflow_fast::aggregate_anomaly_maps_fwd")
def _aggregate_anomaly_maps_fwd_fake(
    log_likelihood_maps: list[torch.Tensor], output_size: list[int], top_k: float, log_space_score: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    first = log_likelihood_maps[0]
    b = first.shape[0]
    h, w = output_size
    return (
        first.new_empty((b, h, w)),
        first.new_empty((b, h, w)),
        first.new_empty((b,)),
        first.new_empty((b if log_space_score else 0,)),
    )


@torch.library.register_fake("msflow_fast::log_space_score_fwd")
def _log_space_score_fwd_fake(log_likelihood_maps: list[torch.Tensor], output_size: list[int], top_k: float) -> torch.Tensor:
    first = log_likelihood_maps[0]
    return first.new_empty((first.shape[0],))


@torch.library.register_fake("msflow_fast::fastflow_anomaly_map_fwd")
def _fastflow_anomaly_map_fwd_fake(
    log_likelihood_maps: list[torch.Tensor], output_size: list[int], log_space_score: bool = False, log_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    first = log_likelihood_maps[0]
    b = first.shape[0]
    h, w = output_size
    return first.new_empty((b, h, w)), first.new_empty((b,)), first.new_empty((b if log_space_score else 0,))


def _gaussian_nll_setup_context(ctx, inputs, output) -> None:
    z, logdet = inputs
    ctx.save_for_backward(z)
    ctx.logdet_dtype = logdet.dtype


def _gaussian_nll_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    (z,) = ctx.saved_tensors
    grad_z = _ops.gaussian_nll_bwd(grad, z) if ctx.needs_input_grad[0] else None
    grad_logdet = (-grad).to(ctx.logdet_dtype) if ctx.needs_input_grad[1] else None
    return grad_z, grad_logdet


def _log_likelihood_map_setup_context(ctx, inputs, output) -> None:
    (z,) = inputs
    ctx.save_for_backward(z)


def _log_likelihood_map_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    (z,) = ctx.saved_tensors
    return _ops.log_likelihood_map_bwd(grad, z)


torch.library.register_autograd(
    "msflow_fast::gaussian_nll_fwd", _gaussian_nll_backward, setup_context=_gaussian_nll_setup_context
)
torch.library.register_autograd(
    "msflow_fast::log_likelihood_map_fwd", _log_likelihood_map_backward, setup_context=_log_likelihood_map_setup_context
)


def gaussian_nll(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum z^2 - logdet`` per sample; see :func:`msflow_fast.ops.reference.gaussian_nll`."""
    return _ops.gaussian_nll_fwd(z, logdet)


def log_likelihood_map(z: torch.Tensor) -> torch.Tensor:
    """``-0.5 * mean_c z^2``; see :func:`msflow_fast.ops.reference.log_likelihood_map`."""
    return _ops.log_likelihood_map_fwd(z)


def aggregate_anomaly_maps(
    log_likelihood_maps: Sequence[torch.Tensor],
    output_size: tuple[int, int],
    *,
    top_k: float = 0.03,
    log_space_score: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Fused "add"/"mul" maps and top-k score(s); see :func:`msflow_fast.ops.reference.aggregate_anomaly_maps`."""
    out = _ops.aggregate_anomaly_maps_fwd(list(log_likelihood_maps), list(output_size), float(top_k), bool(log_space_score))
    return tuple(out) if log_space_score else tuple(out[:3])


def log_space_score(
    log_likelihood_maps: Sequence[torch.Tensor],
    output_size: tuple[int, int],
    *,
    top_k: float = 0.03,
) -> torch.Tensor:
    """Top-k mean of ``max L - L`` (nats); see :func:`msflow_fast.ops.reference.log_space_score`."""
    return _ops.log_space_score_fwd(list(log_likelihood_maps), list(output_size), float(top_k))


def fastflow_anomaly_map(
    log_likelihood_maps: Sequence[torch.Tensor],
    output_size: tuple[int, int],
    *,
    log_space_score: bool = False,
    log_offset: float = 0.0,
) -> tuple[torch.Tensor, ...]:
    """FastFlow's map and max score(s) in one pass; see :func:`msflow_fast.ops.reference.fastflow_anomaly_map`."""
    out = _ops.fastflow_anomaly_map_fwd(list(log_likelihood_maps), list(output_size), bool(log_space_score), float(log_offset))
    return tuple(out) if log_space_score else tuple(out[:2])


__all__ = ["aggregate_anomaly_maps", "fastflow_anomaly_map", "gaussian_nll", "log_likelihood_map", "log_space_score"]
