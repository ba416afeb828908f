"""Anomaly scoring head: per-scale log-likelihood maps, multi-scale aggregation and image scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .. import ops


class AnomalyPrediction(NamedTuple):
    """Output of :class:`AnomalyHead` (and ``MSFlow.predict``).

    Attributes:
        anomaly_map: "add" aggregation ``[B, H, W]`` (MSFlow's pixel-AUROC map; higher = more anomalous).
        anomaly_map_mul: "mul" aggregation ``[B, H, W]`` (MSFlow's AUPRO map), ``1 - P`` in ``[0, 1]``.
        score: official image score ``[B]``: mean of the top-k of ``anomaly_map_mul``.
        score_log_space: ``[B]`` top-k mean of ``max L - L`` in nats (same pixel ranking, never saturates).
        log_likelihood_maps: per-scale ``[B, h_k, w_k]`` maps ``-0.5 * mean_c z^2``.
    """

    anomaly_map: torch.Tensor
    anomaly_map_mul: torch.Tensor
    score: torch.Tensor
    score_log_space: torch.Tensor
    log_likelihood_maps: list[torch.Tensor]


class AnomalyHead(nn.Module):
    """Turns per-scale latents ``z_k [B, C_k, h_k, w_k]`` into anomaly maps and image scores.

    Wraps :func:`msflow_fast.ops.log_likelihood_map`, :func:`~msflow_fast.ops.aggregate_anomaly_maps`
    and :func:`~msflow_fast.ops.log_space_score` (MSFLOW_SPEC.md §1.10). No parameters.

    Args:
        top_k: fraction of pixels averaged for the image scores (MSFlow: 0.03).
    """

    def __init__(self, top_k: float = 0.03) -> None:
        super().__init__()
        if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or not 0.0 < float(top_k) <= 1.0:
            raise ValueError(f"top_k must be a float in (0, 1], got {top_k!r}")
        self.top_k = float(top_k)

    def forward(self, latents: Sequence[torch.Tensor], output_size: tuple[int, int]) -> AnomalyPrediction:
        """Anomaly maps at ``output_size = (H, W)`` and image scores from per-scale latents."""
        if isinstance(latents, torch.Tensor) or not isinstance(latents, Sequence) or not latents:
            raise TypeError("latents must be a non-empty list of [B, C_k, h_k, w_k] tensors, one per scale")
        maps = [ops.log_likelihood_map(z) for z in latents]
        add, mul, score = ops.aggregate_anomaly_maps(maps, output_size, top_k=self.top_k)
        log_score = ops.log_space_score(maps, output_size, top_k=self.top_k)
        return AnomalyPrediction(add, mul, score, log_score, maps)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}"


__all__ = ["AnomalyHead", "AnomalyPrediction"]
