"""Public likelihood and anomaly-map ops: Gaussian NLL, log-likelihood maps, multi-scale aggregation.

Shapes, units and formulas are documented on the matching functions of
:mod:`msflow_fast.ops.reference`; these wrappers validate and dispatch to a backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _backend, reference
from . import _validate as v


def _top_k(top_k: object) -> float:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)):
        raise TypeError(f"top_k must be a float in (0, 1], got {type(top_k).__name__}")
    if not 0.0 < float(top_k) <= 1.0:
        raise ValueError(f"top_k must be in (0, 1] (the fraction of pixels in the image score), got {top_k}")
    return float(top_k)


def _output_size(output_size: object) -> tuple[int, int]:
    if (
        not isinstance(output_size, (tuple, list, torch.Size))
        or len(output_size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in output_size)
    ):
        raise TypeError(f"output_size must be a pair of ints (H, W), got {output_size!r}")
    if min(output_size) < 1:
        raise ValueError(f"output_size must be positive, got {tuple(output_size)}")
    return int(output_size[0]), int(output_size[1])


def _maps(log_likelihood_maps: object) -> list[torch.Tensor]:
    if isinstance(log_likelihood_maps, torch.Tensor) or not isinstance(log_likelihood_maps, Sequence):
        raise TypeError("log_likelihood_maps must be a list of [B, h, w] tensors, one per scale")
    maps = list(log_likelihood_maps)
    if not maps:
        raise ValueError("log_likelihood_maps is empty; pass at least one [B, h, w] map")
    first = v.tensor(maps[0], "log_likelihood_maps[0]", ndim=3)
    for i, m in enumerate(maps):
        v.tensor(m, f"log_likelihood_maps[{i}]", ndim=3)
        v.same_device_dtype("log_likelihood_maps[0]", first, **{f"log_likelihood_maps[{i}]": m})
        if m.shape[0] != first.shape[0]:
            raise ValueError(
                f"log_likelihood_maps[{i}] has batch {m.shape[0]} but log_likelihood_maps[0] has {first.shape[0]}"
            )
        if m.shape[0] == 0 or m.shape[1] == 0 or m.shape[2] == 0:
            raise ValueError(f"log_likelihood_maps[{i}] is empty, shape {tuple(m.shape)}")
    return maps


class _ReferenceBackward(torch.autograd.Function):
    """A fused map-aggregation forward whose backward recomputes the op with the reference maths.

    The fused kernels have no backward of their own; the gradients are those of the reference at
    the same inputs (one reference forward and backward, only when gradients are asked for).
    """

    @staticmethod
    def forward(ctx, op: str, impl, size: tuple[int, int], options: dict, *maps: torch.Tensor):
        ctx.op, ctx.size, ctx.options = op, size, options
        ctx.save_for_backward(*maps)
        return impl(list(maps), size, **options)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        maps = [m.detach().requires_grad_() for m in ctx.saved_tensors]
        with torch.enable_grad():
            out = getattr(reference, ctx.op)(maps, ctx.size, **ctx.options)
        outs = out if isinstance(out, tuple) else (out,)
        used = [(o, g) for o, g in zip(outs, grads) if g is not None]
        grad_maps = torch.autograd.grad([o for o, _ in used], maps, [g for _, g in used], allow_unused=True)
        return (None, None, None, None, *grad_maps)


def _aggregate(op: str, maps: list[torch.Tensor], size: tuple[int, int], options: dict, backend: str | None):
    """Run a map-aggregation op (backend resolved once); on a fused backend with autograd on,
    gradients come from the reference."""
    name, impl = _backend.resolve(op, maps[0].device, backend)
    if name == "reference" or not torch.is_grad_enabled() or not any(m.requires_grad for m in maps):
        return impl(maps, size, **options)
    return _ReferenceBackward.apply(op, impl, size, options, *maps)


def gaussian_nll(
    z: torch.Tensor,
    logdet: torch.Tensor,
    *,
    backend: str | None = None,
    check_finite: bool | None = None,
) -> torch.Tensor:
    """Per-sample ``0.5 * sum z^2 - logdet`` (MSFlow's training loss before the batch mean).

    Args:
        z: latent ``[B, ...]`` (at least 2-D).
        logdet: ``[B]`` in nats.

    Returns:
        ``[B]`` in nats; float32 for half inputs (float32 accumulation whatever the input dtype).
    """
    v.tensor(z, "z")
    v.tensor(logdet, "logdet", ndim=1)
    if z.dim() < 2:
        raise ValueError(f"z must be at least 2-D [B, ...], got shape {tuple(z.shape)}")
    if logdet.shape[0] != z.shape[0]:
        raise ValueError(f"logdet must have shape [B] = ({z.shape[0]},), got {tuple(logdet.shape)}")
    if logdet.device != z.device:
        raise TypeError(f"logdet is on {logdet.device} but z is on {z.device}")
    if v.check_finite_enabled(check_finite):
        v.finite(z, "z")
        v.finite(logdet, "logdet")
    _, impl = _backend.resolve("gaussian_nll", z.device, backend)
    return impl(z, logdet)


def log_likelihood_map(z: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Per-pixel ``-0.5 * mean_c z^2`` of ``z [B, C, H, W]`` -> ``[B, H, W]`` (float32 for half inputs)."""
    v.tensor(z, "z", ndim=4)
    _, impl = _backend.resolve("log_likelihood_map", z.device, backend)
    return impl(z)


MODES = ("msflow", "fastflow")


def aggregate_anomaly_maps(
    log_likelihood_maps: Sequence[torch.Tensor],
    output_size: tuple[int, int],
    *,
    top_k: float = 0.03,
    log_space_score: bool = False,
    mode: str = "msflow",
    log_offset: float = 0.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, ...]:
    """Multi-scale anomaly maps at ``output_size`` and the image score(s), in one pass.

    ``mode="msflow"`` (:func:`msflow_fast.ops.reference.aggregate_anomaly_maps`): MSFlow's "add"
    and "mul" maps (bilinear, ``align_corners=True``) and the top-k mean score; returns
    ``(anomaly_map_add [B, H, W], anomaly_map_mul [B, H, W], score [B])``.

    ``mode="fastflow"`` (:func:`msflow_fast.ops.reference.fastflow_anomaly_map`): the stage mean
    of ``-Up(exp(L_k + log_offset))`` (bilinear, ``align_corners=False``) and its maximum;
    returns ``(anomaly_map [B, H, W], score [B])``. ``top_k`` is not used.

    Args:
        log_likelihood_maps: per-scale ``[B, h_k, w_k]`` maps (same batch, dtype and device).
        output_size: ``(H, W)``.
        top_k: fraction of pixels averaged for the MSFlow score, in ``(0, 1]`` (MSFlow: 0.03).
        log_space_score: also return the log-space score (nats, never saturating or
            underflowing), computed in the same pass from the same upsampled values.
        mode: ``"msflow"`` or ``"fastflow"``.
        log_offset: FastFlow mode only: added to ``L_k`` before ``exp`` (DADF: 1).
        backend: as in :func:`msflow_fast.ops.affine_coupling`.

    Returns:
        The tuple of the mode, plus ``score_log_space [B]`` with ``log_space_score=True``. An
        image whose maps hold a NaN gets NaN scores on every backend. Differentiable on every
        backend: the fused ones compute the forward and take the reference's gradients.
    """
    maps = _maps(log_likelihood_maps)
    size = _output_size(output_size)
    if not isinstance(log_space_score, bool):
        raise TypeError(f"log_space_score must be a bool, got {type(log_space_score).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "fastflow":
        if isinstance(log_offset, bool) or not isinstance(log_offset, (int, float)) or not math.isfinite(log_offset):
            raise ValueError(f"log_offset must be a finite number, got {log_offset!r}")
        options: dict = {"log_offset": float(log_offset)}
        if log_space_score:
            options["log_space_score"] = True
        return _aggregate("fastflow_anomaly_map", maps, size, options, backend)
    options = {"top_k": _top_k(top_k)}
    if log_space_score:
        options["log_space_score"] = True
    return _aggregate("aggregate_anomaly_maps", maps, size, options, backend)


def log_space_score(
    log_likelihood_maps: Sequence[torch.Tensor],
    output_size: tuple[int, int],
    *,
    top_k: float = 0.03,
    backend: str | None = None,
) -> torch.Tensor:
    """Image score in nats: the top-k mean of ``max L - L`` (see :func:`msflow_fast.ops.reference.log_space_score`).

    Arguments as in :func:`aggregate_anomaly_maps`, with the same NaN and gradient rules. Returns
    ``[B]``. With the maps as well, ``aggregate_anomaly_maps(..., log_space_score=True)`` gives it
    in the same pass.
    """
    maps = _maps(log_likelihood_maps)
    size = _output_size(output_size)
    return _aggregate("log_space_score", maps, size, {"top_k": _top_k(top_k)}, backend)
