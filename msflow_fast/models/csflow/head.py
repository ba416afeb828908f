"""CS-Flow's post-processing: the image score ``mean(z^2 / 2)`` and its two localisation maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..base import Prediction


def z2_maps(latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per scale ``mean_c z_k^2`` -> ``[B, h_k, w_k]`` (accumulated in float32 or wider)."""
    return [z.to(torch.promote_types(z.dtype, torch.float32)).square().mean(dim=1) for z in latents]


def image_score(latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """``mean(z^2 / 2)`` over every dimension of every scale -> ``[B]`` (the official and anomalib score)."""
    acc = torch.promote_types(latents[0].dtype, torch.float32)
    squares = torch.cat([z.to(acc).square().flatten(1) for z in latents], dim=1)
    return 0.5 * squares.mean(dim=1)


def upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (``align_corners=False``) ``[B, h, w] -> [B, H, W]``."""
    return F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def predict_from_latents(latents: Sequence[torch.Tensor], size: tuple[int, int], anomaly_map: str) -> Prediction:
    """The :class:`~msflow_fast.models.base.Prediction` of CS-Flow latents ``[z_0, z_1, z_2]``.

    Maps (``[B, H, W]`` at the input size ``size``): ``anomaly_map_largest_scale`` (the official
    localisation, ``mean_c z_0^2`` upsampled), ``anomaly_map_product`` (anomalib's: the product of
    the three upsampled ``mean_c z_k^2``) and the per-scale ``z2_mean_{k}`` ``[B, h_k, w_k]``.
    ``anomaly_map`` is the one ``anomaly_map`` names; ``score`` is :func:`image_score`.
    """
    per_scale = z2_maps(latents)
    largest = upsample(per_scale[0], size)
    product = largest
    for m in per_scale[1:]:
        product = product * upsample(m, size)
    maps = {"anomaly_map_largest_scale": largest, "anomaly_map_product": product}
    maps.update({f"z2_mean_{k}": m for k, m in enumerate(per_scale)})
    return Prediction(maps[f"anomaly_map_{anomaly_map}"], image_score(latents), maps)


__all__ = ["image_score", "predict_from_latents", "upsample", "z2_maps"]
