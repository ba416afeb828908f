"""Parts FastFlow and DADF share: the subnet kernel rule of their flow steps (3x3, or 3x3 and 1x1
alternating) and FastFlow's anomaly map and image scores (MODELS_SPEC.md Part A §1.5, Part B §1.7),
from one pass of the fused aggregation op in its ``"fastflow"`` mode."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import ops
from .base import Prediction


def step_kernel(step: int, conv3x3_only: bool) -> int:
    """The subnet kernel of flow step ``step``: 3, or 1 on odd steps unless ``conv3x3_only``."""
    return 1 if step % 2 == 1 and not conv3x3_only else 3


class FastFlowHead(nn.Module):
    """Per-stage latents ``z_k [B, C_k, h_k, w_k]`` -> a :class:`~msflow_fast.models.base.Prediction`.

    ``anomaly_map`` = the stage mean of ``-Up(exp(-0.5 * mean_c z_k^2))`` (bilinear,
    ``align_corners=False``), in ``[-1, 0]``; ``maps`` holds ``score_max`` (its maximum, anomalib's
    score), ``score_log_space`` (the same maximum as ``-log(-map)`` in nats, computed exactly by a
    logsumexp over stages and interpolation taps: the same ranking, no underflow) and the
    per-stage ``log_likelihood_{k}`` ``[B, h_k, w_k]``. ``score`` is ``score_max`` or, with
    ``score="log_space"``, ``score_log_space``. No parameters.

    ``log_offset`` is added to every log-likelihood before ``exp``: 0 for FastFlow, 1 for DADF
    (whose map is ``-exp(1 - 0.5 * mean_c z^2)``, in ``[-e, 0]``).
    """

    def __init__(self, score: str = "max", log_offset: float = 0.0) -> None:
        super().__init__()
        if score not in ("max", "log_space"):
            raise ValueError(f"score must be 'max' or 'log_space', got {score!r}")
        self.score = score
        self.log_offset = float(log_offset)

    def forward(self, latents: Sequence[torch.Tensor], output_size: tuple[int, int]) -> Prediction:
        if isinstance(latents, torch.Tensor) or not isinstance(latents, Sequence) or not latents:
            raise TypeError("latents must be a non-empty list of [B, C_k, h_k, w_k] tensors, one per stage")
        maps = [ops.log_likelihood_map(z) for z in latents]
        anomaly_map, score_max, score_log = ops.aggregate_anomaly_maps(
            maps, output_size, mode="fastflow", log_space_score=True, log_offset=self.log_offset
        )
        named = {"score_max": score_max, "score_log_space": score_log}
        named.update({f"log_likelihood_{k}": m for k, m in enumerate(maps)})
        return Prediction(anomaly_map, score_log if self.score == "log_space" else score_max, named)

    def extra_repr(self) -> str:
        return f"score={self.score!r}" + (f", log_offset={self.log_offset:g}" if self.log_offset else "")


__all__ = ["FastFlowHead", "step_kernel"]
