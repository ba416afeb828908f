"""Exact anomaly-detection metrics: image AUROC, pixel AUROC and AUPRO.

All functions return fractions in [0, 1] (multiply by 100 for the percentages papers print). They
accept numpy arrays or torch tensors (CPU or CUDA) and are exact over all thresholds:

- AUROC is the Mann-Whitney statistic: only the negatives are sorted, each positive is located by
  binary search, ties count one half. Memory beyond the inputs is one copy of the scores, so a full
  MVTec class at 512 px (about 100 x 262,144 pixels) is fine on CPU.
- AUPRO follows the sort-based definition: connected components of the ground truth (8-connectivity);
  for every distinct score threshold t (pixels with score >= t are positive, so tied scores enter
  together and only the last point of a tie is kept) FPR(t) = positive background pixels / all
  background pixels, PRO(t) = mean over all regions of all images of each region's TPR; (0, 0) is
  prepended, the curve is cut at FPR = 0.3 with linear interpolation of PRO, and the trapezoid area is
  divided by 0.3.

The saturated per-region overlap of MVTec LOCO AD (sPRO) is in :mod:`.metrics_spro`; it shares
:func:`overlap_curve_area` with AUPRO.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["auroc", "aupro", "image_auroc", "overlap_curve_area", "pixel_auroc"]


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as err:
        raise TypeError(f"{name}: expected an array or tensor, got {type(x).__name__}") from err


def _sorted(x: torch.Tensor) -> torch.Tensor:
    """Ascending sort of a 1-D tensor that the caller owns (sorted in place on CPU, no index array)."""
    if x.device.type == "cpu":
        arr = x.contiguous().numpy()
        arr.sort()
        return torch.from_numpy(arr)
    return torch.sort(x).values


def _scores_and_labels(scores: Any, labels: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = _as_tensor(scores, "scores")
    y = _as_tensor(labels, "labels")
    if s.shape != y.shape:
        raise ValueError(f"{what}: scores shape {tuple(s.shape)} != labels shape {tuple(y.shape)}")
    if not (s.is_floating_point() or s.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise TypeError(f"{what}: scores must be real numbers, got dtype {s.dtype}")
    if s.is_floating_point() and not torch.isfinite(s).all():
        raise ValueError(f"{what}: scores contain NaN or infinity")
    y = y.to(s.device)
    return s.reshape(-1), (y.reshape(-1) != 0)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve, exact (ties count one half).

    Args:
        scores: any shape; higher means more anomalous.
        labels: same shape; non-zero = positive (anomalous).

    Returns:
        AUROC as a fraction in [0, 1].

    Raises:
        ValueError: shapes differ, non-finite scores, or only one class present.
    """
    s, y = _scores_and_labels(scores, labels, "auroc")
    pos, neg = s[y], s[~y]
    n_pos, n_neg = pos.numel(), neg.numel()
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc: needs both classes, got {n_pos} positives and {n_neg} negatives")
    if not s.is_floating_point():
        pos, neg = pos.double(), neg.double()
    neg = _sorted(neg)
    del s, y
    total = 0
    chunk = 1 << 22
    for start in range(0, n_pos, chunk):
        p = pos[start : start + chunk].contiguous()
        below = torch.searchsorted(neg, p, right=False)
        below_or_tied = torch.searchsorted(neg, p, right=True)
        total += int((below + below_or_tied).sum().item())
    return total / (2.0 * n_pos * n_neg)


def image_auroc(scores: Any, labels: Any) -> float:
    """Image-level AUROC: ``scores`` ``[N]`` (image scores), ``labels`` ``[N]`` (0/1). Fraction in [0, 1]."""
    return auroc(scores, labels)


def pixel_auroc(maps: Any, masks: Any) -> float:
    """Pixel-level AUROC over all pixels of all images: ``maps`` ``[N, H, W]``, ``masks`` ``[N, H, W]``."""
    return auroc(maps, masks)


def _label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    try:
        from scipy import ndimage
    except ImportError as err:
        raise ImportError("aupro needs scipy for connected components: pip install scipy") from err
    return ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised by ``fpr_limit``.

    Args:
        maps: ``[N, H, W]`` anomaly maps (higher = more anomalous).
        masks: ``[N, H, W]`` ground truth, non-zero = anomalous.
        fpr_limit: FPR integration limit in (0, 1]; 0.3 is the standard.

    Returns:
        AUPRO as a fraction in [0, 1].

    Raises:
        ValueError: shapes differ or are not 3-D, non-finite maps, no anomalous region or no
            background pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit: expected a value in (0, 1], got {fpr_limit!r}")
    m = _as_tensor(maps, "maps")
    g = _as_tensor(masks, "masks")
    if m.dim() == 2:
        m, g = m.unsqueeze(0), g.unsqueeze(0)
    if m.dim() != 3 or m.shape != g.shape:
        raise ValueError(f"aupro: expected maps and masks of one shape [N, H, W], got {tuple(m.shape)} and {tuple(g.shape)}")
    if not m.is_floating_point():
        m = m.double()
    if not torch.isfinite(m).all():
        raise ValueError("aupro: maps contain NaN or infinity")
    device = m.device

    # Foreground pixels with their region weights; background scores (copied once).
    fg_scores, fg_weights = [], []
    bg_parts = []
    n_regions = 0
    for i in range(m.shape[0]):
        mask_np = (g[i] != 0).cpu().numpy()
        bg_parts.append(m[i][~torch.from_numpy(mask_np).to(device)])
        if not mask_np.any():
            continue
        regions, count = _label_regions(mask_np)
        areas = np.bincount(regions.ravel(), minlength=count + 1).astype(np.float64)
        ids = regions[mask_np]
        fg_scores.append(m[i][torch.from_numpy(mask_np).to(device)])
        fg_weights.append(torch.from_numpy(1.0 / areas[ids]).to(device))
        n_regions += count
    if n_regions == 0:
        raise ValueError("aupro: the ground truth has no anomalous region (all masks are empty)")
    bg = _sorted(torch.cat(bg_parts))
    del bg_parts
    n_bg = bg.numel()
    if n_bg == 0:
        raise ValueError("aupro: the ground truth has no background pixel (all masks are full)")
    fg = torch.cat(fg_scores)
    w = torch.cat(fg_weights) / n_regions
    return overlap_curve_area(bg, fg, w, fpr_limit)


def overlap_curve_area(bg: torch.Tensor, fg: torch.Tensor, w: torch.Tensor, fpr_limit: float) -> float:
    """Exact area under an overlap-vs-FPR curve up to ``fpr_limit``, divided by ``fpr_limit`` (AUPRO, sPRO).

    Pixels with score >= t are positive. FPR(t) = share of ``bg`` >= t; overlap(t) = sum of ``w``
    over the ``fg`` entries >= t. Every distinct score is a threshold (tied scores enter together);
    (0, 0) is prepended, the curve is cut at ``fpr_limit`` with linear interpolation, trapezoid area.

    Args:
        bg: 1-D background scores, sorted ascending (the negatives the FPR counts).
        fg: 1-D foreground scores, any order (one entry per region pixel; a pixel of two regions twice).
        w: float64 weights of ``fg`` (their sum is the overlap at the lowest threshold, at most 1).
        fpr_limit: in (0, 1].
    """
    n_bg = bg.numel()
    order = torch.argsort(fg, stable=True)
    fg, w = fg[order], w[order]
    # suffix[j] = total weight of foreground pixels fg[j:], so overlap(t) = suffix[#fg < t].
    suffix = torch.cat([torch.flip(torch.cumsum(torch.flip(w, [0]), 0), [0]), w.new_zeros(1)])

    # Thresholds t with FPR(t) <= limit are exactly those above v0 = the (k+1)-th largest background
    # value, k = floor(limit * n_bg); v0 itself gives the first point beyond the limit.
    k = int(np.floor(fpr_limit * n_bg + 1e-9))
    if k >= n_bg:
        v0 = None
        cand = torch.cat([bg, fg])
    else:
        v0 = bg[n_bg - k - 1]
        cand = torch.cat([bg[n_bg - k :], fg[fg > v0], v0.reshape(1)])
    thresholds = torch.flip(torch.unique(cand), [0])
    fpr = (n_bg - torch.searchsorted(bg, thresholds, right=False)).double() / n_bg
    pro = suffix[torch.searchsorted(fg, thresholds, right=False)].double()
    fpr = torch.cat([fpr.new_zeros(1), fpr]).cpu()
    pro = torch.cat([pro.new_zeros(1), pro]).cpu()

    keep = int((fpr <= fpr_limit).sum().item())
    x, y = fpr[:keep], pro[:keep]
    if keep < fpr.numel():
        x0, x1 = fpr[keep - 1], fpr[keep]
        y0, y1 = pro[keep - 1], pro[keep]
        y_cut = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = torch.cat([x, torch.tensor([fpr_limit], dtype=x.dtype)])
        y = torch.cat([y, y_cut.reshape(1)])
    area = torch.trapezoid(y, x).item()
    return float(area / fpr_limit)
