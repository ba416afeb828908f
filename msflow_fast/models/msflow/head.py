"""MSFlow's scoring head (MSFLOW_SPEC.md §1.10): per-scale log-likelihood maps, the "add" and "mul"
aggregations and the image scores, from one pass of the fused aggregation op."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ... import ops
from ..base import Prediction


class MSFlowHead(nn.Module):
    """Per-scale latents ``z_k [B, C_k, h_k, w_k]`` -> a :class:`~msflow_fast.models.base.Prediction`.

    ``anomaly_map`` is the "add" map (MSFlow's pixel-AUROC map); ``maps`` holds
    ``anomaly_map_mul`` (the "mul" map, ``1 - P`` in ``[0, 1]``: MSFlow's AUPRO map),
    ``score_official`` (top-k mean of the "mul" map), ``score_log_space`` (top-k mean of
    ``max L - L``, nats: see :func:`msflow_fast.ops.reference.log_space_score`) and the per-scale
    maps ``log_likelihood_{k}`` ``[B, h_k, w_k]`` (``-0.5 * mean_c z^2``). ``score`` is
    ``score_official`` or, with ``score="log_space"``, ``score_log_space``. Both scores come from
    one call of :func:`msflow_fast.ops.aggregate_anomaly_maps`. No parameters.

    Args:
        top_k: fraction of pixels averaged for the image scores (MSFlow: 0.03).
        score: ``"official"`` or ``"log_space"``.
    """

    def __init__(self, top_k: float = 0.03, score: str = "official") -> None:
        super().__init__()
        if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or not 0.0 < float(top_k) <= 1.0:
            raise ValueError(f"top_k must be a float in (0, 1], got {top_k!r}")
        if score not in ("official", "log_space"):
            raise ValueError(f"score must be 'official' or 'log_space', got {score!r}")
        self.top_k = float(top_k)
        self.score = score

    def forward(self, latents: Sequence[torch.Tensor], output_size: tuple[int, int]) -> Prediction:
        """Maps at ``output_size = (H, W)`` and image scores from per-scale latents."""
        if isinstance(latents, torch.Tensor) or not isinstance(latents, Sequence) or not latents:
            raise TypeError("latents must be a non-empty list of [B, C_k, h_k, w_k] tensors, one per scale")
        maps = [ops.log_likelihood_map(z) for z in latents]
        add, mul, official, log_space = ops.aggregate_anomaly_maps(maps, output_size, top_k=self.top_k, log_space_score=True)
        named = {"anomaly_map_mul": mul, "score_official": official, "score_log_space": log_space}
        named.update({f"log_likelihood_{k}": m for k, m in enumerate(maps)})
        return Prediction(add, log_space if self.score == "log_space" else official, named)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, score={self.score!r}"


__all__ = ["MSFlowHead"]
