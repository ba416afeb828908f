"""Metrics against scikit-learn (AUROC) and an independent threshold-loop implementation (AUPRO)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from msflow_fast.engine import aupro, auroc, image_auroc, pixel_auroc


def slow_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """One threshold at a time over every unique score: pixels with score >= t are positive."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks) != 0
    regions = []
    for i in range(maps.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    background = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & background).sum() / background.sum())
        pros.append(np.mean([pred[i][region].sum() / region.sum() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    x, y = list(fprs[keep]), list(pros[keep])
    j = int(keep.sum())
    if j < len(fprs):
        y.append(pros[j - 1] + (pros[j] - pros[j - 1]) * (limit - fprs[j - 1]) / (fprs[j] - fprs[j - 1]))
        x.append(limit)
    x, y = np.array(x), np.array(y)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / limit)


def _random_case(rng: np.random.Generator, n: int, h: int, w: int, levels: int | None):
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 5)] = True
    masks[0, 0, 0] = True  # at least one region
    maps = rng.random((n, h, w)) + 0.7 * masks * rng.random((n, h, w))
    if levels is not None:  # heavy ties
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32), masks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 5, 20])
def test_auroc_matches_sklearn(seed, levels):
    rng = np.random.default_rng(seed)
    maps, masks = _random_case(rng, 3, 9, 11, levels)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    scores = maps.reshape(3, -1)[:, :20].ravel()
    labels = rng.integers(0, 2, scores.size)
    labels[:2] = [0, 1]
    assert image_auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_integer_and_float64_inputs():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([1, 2, 2, 3, 3, 5])
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert auroc(scores.astype(np.float64), labels) == pytest.approx(roc_auc_score(labels, scores))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("levels", [None, 4, 16])
def test_aupro_matches_slow_reference(seed, levels):
    rng = np.random.default_rng(100 + seed)
    maps, masks = _random_case(rng, 3, 10, 12, levels)
    assert aupro(maps, masks) == pytest.approx(slow_aupro(maps, masks), abs=1e-10)
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks), fpr_limit=0.5) == pytest.approx(slow_aupro(maps, masks, 0.5), abs=1e-10)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(slow_aupro(maps, masks, 1.0), abs=1e-10)


def test_aupro_perfect_and_region_pooling():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = True  # 4 px
    masks[0, 5:8, 5:8] = True  # 9 px, separate region
    masks[1, 0, 0] = True
    perfect = masks.astype(np.float32)
    assert aupro(perfect, masks) == pytest.approx(1.0)
    # diagonal neighbours form one region under 8-connectivity
    diag = np.zeros((1, 4, 4), dtype=bool)
    diag[0, 0, 0] = diag[0, 1, 1] = True
    scores = np.zeros((1, 4, 4), dtype=np.float32)
    scores[0, 0, 0] = 1.0  # half of the single region found at FPR 0
    assert aupro(scores, diag) == pytest.approx(slow_aupro(scores, diag))
    assert aupro(scores, diag) == pytest.approx(0.5, abs=0.2)


@pytest.mark.parametrize(
    "maps, masks, match",
    [
        (np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), "no anomalous region"),
        (np.zeros((1, 4, 4)), np.ones((1, 4, 4)), "no background"),
        (np.full((1, 4, 4), np.nan), np.eye(4)[None], "NaN"),
        (np.zeros((1, 4, 4)), np.zeros((1, 4, 5)), "one shape"),
    ],
)
def test_aupro_bad_inputs(maps, masks, match):
    with pytest.raises(ValueError, match=match):
        aupro(maps, masks)


def test_auroc_bad_inputs():
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        auroc([0.1, 0.2], [1, 0, 1])


def test_pixel_metrics_scale_to_a_large_case():
    # 20 images of 256 x 256 run quickly and give sane values.
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 256, 256), dtype=bool)
    masks[::2, 100:140, 60:90] = True
    maps = rng.random((20, 256, 256), dtype=np.float32) + masks
    assert pixel_auroc(maps, masks) > 0.99
    assert 0.9 < aupro(maps, masks) <= 1.0


def test_metrics_on_the_test_device(device):
    rng = np.random.default_rng(7)
    maps, masks = _random_case(rng, 2, 9, 9, 8)
    m, g = torch.from_numpy(maps).to(device), torch.from_numpy(masks).to(device)
    assert pixel_auroc(m, g) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert aupro(m, g) == pytest.approx(slow_aupro(maps, masks), abs=1e-10)
