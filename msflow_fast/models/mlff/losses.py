"""The three loss terms of ``mlff`` (an INTERPRETATION; the paper names them, this package defines
them, MODELS_SPEC.md Part B §2.3) and the image score.

- feature constraint (DeSTSeg's student loss): ``sum_k mean_{b,h,w} (1 - cos(T_k(clean), S_k(corrupted)))``;
- consistency constraint: ``focal_gamma(Ŷ, M) + L1(Ŷ, M)``, the predicted map against the pseudo
  mask ``M`` (bilinearly resized to the map's grid, binarised at 0.5);
- score constraint: ``BCE(s, y) + lambda_m * (y * max(0, m - s) + (1 - y) * s)`` on the image score
  ``s`` (the mean of the top-k pixels of the map at the input size) and the label ``y``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["EPS", "consistency_loss", "feature_loss", "focal_loss", "mask_target", "score_loss", "top_k_score"]

EPS = 1e-6
"""Probabilities are clamped to ``[EPS, 1 - EPS]`` inside logarithms (computed in float32, also
under bf16/fp16 autocast, where ``1 - EPS`` would round to 1)."""


def feature_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_k mean(1 - cos_c(T_k, S_k))`` over levels ``[B, C_k, h_k, w_k]`` (the cosine over channels)."""
    return sum((1.0 - F.cosine_similarity(t, s, dim=1)).mean() for t, s in zip(teacher, student))


def mask_target(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``[B, H, W]`` mask (non-zero = anomalous) -> ``[B, h, w]`` in {0, 1}: bilinear to ``size``, then ``> 0.5``."""
    resized = F.interpolate((mask > 0).float()[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return (resized > 0.5).float()


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 4.0) -> torch.Tensor:
    """Binary focal loss ``mean(-(1 - p_t)^gamma log p_t)``, ``p_t = p`` where the target is 1, else ``1 - p``."""
    p = prob.float().clamp(EPS, 1.0 - EPS)
    p_t = torch.where(target > 0.5, p, 1.0 - p)
    return (-(1.0 - p_t).pow(gamma) * p_t.log()).mean()


def consistency_loss(prob: torch.Tensor, mask: torch.Tensor, gamma: float = 4.0) -> torch.Tensor:
    """``focal_gamma(Ŷ, M) + mean|Ŷ - M|`` for the map ``prob [B, h, w]`` and the mask ``[B, H, W]``."""
    target = mask_target(mask, prob.shape[-2:])
    return focal_loss(prob, target, gamma) + (prob.float() - target).abs().mean()


def score_loss(score: torch.Tensor, label: torch.Tensor, *, margin: float = 0.9, margin_weight: float = 0.5,
               with_margin: bool = True) -> torch.Tensor:
    """``mean_b BCE(s, y) [+ margin_weight * (y * max(0, margin - s) + (1 - y) * s)]`` for scores ``s`` in [0, 1]."""
    y, score = label.float(), score.float()
    s = score.clamp(EPS, 1.0 - EPS)
    loss = -(y * s.log() + (1.0 - y) * (1.0 - s).log())
    if with_margin:
        loss = loss + margin_weight * (y * (margin - score).clamp(min=0.0) + (1.0 - y) * score)
    return loss.mean()


def top_k_score(anomaly_map: torch.Tensor, k: int) -> torch.Tensor:
    """The mean of the ``min(k, H * W)`` largest values of each ``[B, H, W]`` map: ``[B]``."""
    flat = anomaly_map.flatten(1)
    return flat.topk(min(int(k), flat.shape[1]), dim=1).values.mean(1)
