"""``msflow_aas``'s post-processing: per-level ``mean_c z^2`` maps, their sum or product at the input
size, and the image scores ``mean(z^2 / 2)`` (CS-Flow's) and top-k (MSFlow-style). These are choices
made for this interpretation (MODELS_SPEC.md Part A §4.3, item 6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ... import ops
from ..base import Prediction


def z2_maps(latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per level ``mean_c z_l^2`` -> ``[B, h_l, w_l]`` (accumulated in float32 or wider)."""
    return [z.to(torch.promote_types(z.dtype, torch.float32)).square().mean(dim=1) for z in latents]


def mean_z2_score(latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """``mean(z^2 / 2)`` over every dimension of every level -> ``[B]`` (CS-Flow's image score, nats per dimension
    less the constant ``0.5 log 2 pi``)."""
    acc = torch.promote_types(latents[0].dtype, torch.float32)
    squares = torch.cat([z.to(acc).square().flatten(1) for z in latents], dim=1)
    return 0.5 * squares.mean(dim=1)


def upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (``align_corners=False``) ``[B, h, w] -> [B, H, W]``."""
    return F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def predict_from_latents(
    latents: Sequence[torch.Tensor], size: tuple[int, int], *, anomaly_map: str = "sum", score: str = "mean_z2", top_k: float = 0.03,
) -> Prediction:
    """The :class:`~msflow_fast.models.base.Prediction` of latents ``[z_0, z_1, z_2]``.

    Maps (``[B, H, W]`` at the input size ``size``): ``anomaly_map_sum`` (``sum_l Up(mean_c z_l^2)``),
    ``anomaly_map_product`` (``prod_l Up(mean_c z_l^2)``) and the per-level ``z2_mean_{l}``
    ``[B, h_l, w_l]``; scores ``[B]``: ``score_mean_z2`` (:func:`mean_z2_score`) and ``score_top_k``
    (the mean of the ``top_k`` fraction of largest values of the ``anomaly_map`` map).
    ``anomaly_map`` and ``score`` pick ``Prediction.anomaly_map`` and ``Prediction.score``.
    """
    per_level = z2_maps(latents)
    ups = [upsample(m, size) for m in per_level]
    summed, product = ups[0], ups[0]
    for m in ups[1:]:
        summed, product = summed + m, product * m
    maps = {"anomaly_map_sum": summed, "anomaly_map_product": product}
    chosen = maps[f"anomaly_map_{anomaly_map}"]
    maps.update({f"z2_mean_{level}": m for level, m in enumerate(per_level)})
    maps["score_mean_z2"] = mean_z2_score(latents)
    maps["score_top_k"] = ops.reference.top_k_mean(chosen, top_k)
    return Prediction(chosen, maps[f"score_{score}"], maps)


__all__ = ["mean_z2_score", "predict_from_latents", "upsample", "z2_maps"]
