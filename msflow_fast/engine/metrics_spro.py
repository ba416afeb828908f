"""The saturated per-region overlap (sPRO) of MVTec LOCO AD, exact over all thresholds.

Definition (Bergmann et al., "Beyond Dents and Scratches", IJCV 2022). The ground truth is a set of
defect regions A_1 .. A_R over all anomalous test images (one region per mask file, regions may
overlap), each with a saturation area s_i > 0 in pixels. For a threshold t, P_t is the set of
pixels with score >= t, and:

    sPRO(t)  = (1 / R) * sum_i min(|A_i ∩ P_t| / s_i, 1)
    FPR(t)   = |P_t ∩ N| / |N|,   N = every pixel of the anomaly-free test images
    AU-sPRO  = (1 / L) * integral_0^L sPRO d(FPR)      (L: the FPR limit, 0.05 in the benchmark)

Pixels of anomalous images outside their regions count neither way. :func:`saturation_area` gives
s_i from a ``defects_config.json`` entry: ``min(threshold, |A_i|)`` pixels for an absolute threshold,
``threshold * |A_i|`` for a relative one.

Exact computation: sort each region's pixels by descending score; its j-th pixel adds
``min(j / s_i, 1) - min((j - 1) / s_i, 1)`` (divided by R) to sPRO once the threshold reaches it, so
sPRO(t) is a weighted count of the region pixels >= t (tied pixels enter together, so their order
does not matter). The curve is then the AUPRO's (:func:`.metrics.overlap_curve_area`): every
distinct score is a threshold, (0, 0) is prepended, the curve is cut at L with linear interpolation
of sPRO and the trapezoid area is divided by L. Values are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .metrics import _as_tensor, _sorted, overlap_curve_area

__all__ = ["saturation_area", "spro", "spro_by_kind"]


def saturation_area(area: float, threshold: float, relative: bool) -> float:
    """The saturation area s of a defect region in pixels: ``threshold * area`` when ``relative``
    (``threshold`` a fraction in (0, 1]), else ``min(threshold, area)`` (``threshold`` in pixels, so
    a region smaller than its threshold saturates when fully covered).

    Raises:
        ValueError: a non-positive area or threshold, or a relative threshold above 1.
    """
    if not area > 0:
        raise ValueError(f"saturation_area: the region has no pixel (area {area!r})")
    if not threshold > 0 or threshold == float("inf"):
        raise ValueError(f"saturation_area: expected a positive finite threshold, got {threshold!r}")
    if relative:
        if threshold > 1:
            raise ValueError(f"saturation_area: a relative threshold is a fraction of the area in (0, 1], got {threshold!r}")
        return float(threshold) * float(area)
    return float(min(threshold, area))


def _check_limits(fpr_limits: Sequence[float]) -> list[float]:
    limits = [float(x) for x in fpr_limits]
    if not limits:
        raise ValueError("fpr_limits: expected at least one FPR limit, e.g. (0.05, 0.3)")
    for x in limits:
        if not 0.0 < x <= 1.0:
            raise ValueError(f"fpr_limit: expected a value in (0, 1], got {x!r}")
    return limits


class _Regions:
    """The region pixels' scores of a test set: ``scores`` ``[M]``, ``region`` ``[M]`` (0 .. R-1),
    ``saturation`` ``[R]`` (pixels, float64) and ``image`` ``[R]`` (the image of each region)."""

    def __init__(self, m: torch.Tensor, regions: Sequence[Any], saturation: Sequence[Any] | None) -> None:
        n, h, w = m.shape
        if len(regions) != n:
            raise ValueError(f"spro: regions has {len(regions)} entries for {n} maps; give one [K, H, W] array per image (K may be 0)")
        if saturation is not None and len(saturation) != n:
            raise ValueError(f"spro: saturation has {len(saturation)} entries for {n} maps; give one [K] array per image")
        scores, sats, images = [], [], []
        for i in range(n):
            r = _as_tensor(regions[i], f"regions[{i}]").to(m.device)
            if r.dim() == 2:
                r = r.unsqueeze(0)
            if r.dim() != 3 or tuple(r.shape[1:]) != (h, w):
                raise ValueError(f"spro: regions[{i}] has shape {tuple(r.shape)}; expected [K, {h}, {w}] (one mask per defect region)")
            r = r != 0
            areas = r.flatten(1).sum(1).double()
            if saturation is None:
                s = areas
            else:
                s = _as_tensor(saturation[i], f"saturation[{i}]").double().reshape(-1).to(m.device)
                if s.numel() != r.shape[0]:
                    raise ValueError(f"spro: saturation[{i}] has {s.numel()} values for {r.shape[0]} regions")
            for k in range(r.shape[0]):
                if areas[k] == 0:
                    raise ValueError(
                        f"spro: region {k} of image {i} has no pixel; leave it out (e.g. a defect that vanished when its "
                        "mask was resized to the map size)"
                    )
                if not (torch.isfinite(s[k]) and s[k] > 0):
                    raise ValueError(f"spro: saturation[{i}][{k}] must be a positive number of pixels, got {float(s[k])!r}")
                scores.append(m[i][r[k]])
                sats.append(s[k].reshape(1))
                images.append(i)
        self.count = len(scores)
        self.scores_per_region = scores
        self.saturation = torch.cat(sats) if sats else torch.zeros(0, dtype=torch.float64, device=m.device)
        self.image = torch.tensor(images, dtype=torch.long)

    def weighted(self, select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fg scores [M], weights [M])`` of the regions ``select`` (bool ``[R]``): each region's
        pixels weighted by their descending rank as the module docstring says, over the selected count."""
        ids = select.nonzero().flatten().tolist()
        fg = torch.cat([self.scores_per_region[k] for k in ids])
        sizes = torch.tensor([self.scores_per_region[k].numel() for k in ids], device=fg.device)
        region = torch.repeat_interleave(torch.arange(len(ids), device=fg.device), sizes)
        s = self.saturation[select.to(self.saturation.device)].to(fg.device)
        # Within-region descending rank: sort by score (descending), then stably by region.
        order = torch.argsort(fg, descending=True, stable=True)
        order = order[torch.argsort(region[order], stable=True)]
        starts = torch.cumsum(sizes, 0) - sizes
        rank = (torch.arange(fg.numel(), device=fg.device) - starts[region[order]] + 1).double()
        s_sorted = s[region[order]]
        gain = torch.clamp(rank / s_sorted, max=1.0) - torch.clamp((rank - 1) / s_sorted, max=1.0)
        weights = torch.zeros_like(gain)
        weights[order] = gain / len(ids)
        return fg, weights


def _maps(maps: Any) -> torch.Tensor:
    m = _as_tensor(maps, "maps")
    if m.dim() == 2:
        m = m.unsqueeze(0)
    if m.dim() != 3:
        raise ValueError(f"spro: expected maps [N, H, W], got shape {tuple(m.shape)}")
    if not m.is_floating_point():
        m = m.double()
    if not torch.isfinite(m).all():
        raise ValueError("spro: maps contain NaN or infinity")
    return m


def _normal_images(normal: Any, regions: _Regions, n: int, device: torch.device) -> torch.Tensor:
    if normal is None:
        has_region = torch.zeros(n, dtype=torch.bool)
        has_region[regions.image] = True
        return ~has_region
    mask = _as_tensor(normal, "normal").reshape(-1).cpu() != 0
    if mask.numel() != n:
        raise ValueError(f"spro: normal has {mask.numel()} values for {n} maps")
    clash = sorted(set(regions.image.tolist()) & set(mask.nonzero().flatten().tolist()))
    if clash:
        raise ValueError(f"spro: images {clash[:5]} are marked normal but hold defect regions")
    return mask


def spro_by_kind(
    maps: Any,
    regions: Sequence[Any],
    saturation: Sequence[Any] | None = None,
    kinds: Sequence[str] | None = None,
    *,
    normal: Any = None,
    fpr_limits: Sequence[float] = (0.05, 0.3),
    groups: Sequence[str] | None = None,
) -> dict[str, dict[str, float | None]]:
    """AU-sPRO of all regions and of each defect kind's regions, at each FPR limit.

    Every group's FPR is counted on the same anomaly-free images; a group holds the regions of the
    images of that kind. The background is sorted once for all groups and limits.

    Args:
        maps: ``[N, H, W]`` anomaly maps (higher = more anomalous).
        regions: N entries; entry i is ``[K_i, H, W]`` (non-zero = in the region; K_i may be 0), one
            defect region per row.
        saturation: N entries of ``[K_i]`` saturation areas in pixels (:func:`saturation_area`);
            ``None``: each region's area (no saturation: plain per-region overlap).
        kinds: N strings, the defect kind of each image (e.g. ``"logical"``, ``"structural"``,
            ``"good"``); ``None``: only ``"all"``.
        normal: bool ``[N]``, the anomaly-free images whose pixels the FPR counts; ``None``: the
            images without a region.
        fpr_limits: FPR integration limits in (0, 1].
        groups: the kinds to report (default: every kind with a region); a kind without a region
            gets ``None``.

    Returns:
        ``{f"{limit:g}": {"all": value, kind: value, ...}}``, fractions in [0, 1].

    Raises:
        ValueError: no defect region, no anomaly-free image, an empty region, a non-positive
            saturation, shapes that do not match, or non-finite maps.
    """
    limits = _check_limits(fpr_limits)
    m = _maps(maps)
    n = m.shape[0]
    found = _Regions(m, regions, saturation)
    if found.count == 0:
        raise ValueError("spro: the ground truth has no defect region (no anomalous test image with a mask)")
    is_normal = _normal_images(normal, found, n, m.device)
    if not is_normal.any():
        raise ValueError("spro: no anomaly-free image: the FPR is counted on the pixels of the anomaly-free test images")
    bg = _sorted(m[is_normal.to(m.device)].reshape(-1))
    if kinds is not None and len(kinds) != n:
        raise ValueError(f"spro: kinds has {len(kinds)} entries for {n} maps")
    region_kind = [str(kinds[i]) for i in found.image.tolist()] if kinds is not None else []
    if groups is None:
        groups = list(dict.fromkeys(region_kind))
    selections: dict[str, torch.Tensor | None] = {"all": torch.ones(found.count, dtype=torch.bool)}
    for kind in groups:
        if kind == "all":
            continue
        select = torch.tensor([k == kind for k in region_kind], dtype=torch.bool) if region_kind else torch.zeros(found.count, dtype=torch.bool)
        selections[kind] = select if select.any() else None
    out: dict[str, dict[str, float | None]] = {f"{x:g}": {} for x in limits}
    for kind, select in selections.items():
        if select is None:
            for x in limits:
                out[f"{x:g}"][kind] = None
            continue
        fg, w = found.weighted(select)
        for x in limits:
            out[f"{x:g}"][kind] = overlap_curve_area(bg, fg.to(bg.dtype), w, x)
    return out


def spro(
    maps: Any,
    regions: Sequence[Any],
    saturation: Sequence[Any] | None = None,
    *,
    normal: Any = None,
    fpr_limit: float = 0.05,
) -> float:
    """AU-sPRO up to ``fpr_limit`` (0.05: the MVTec LOCO AD benchmark; 0.3: like AUPRO), normalised by it.

    Args: as :func:`spro_by_kind` (``maps`` ``[N, H, W]``, ``regions`` N entries of ``[K_i, H, W]``,
    ``saturation`` N entries of ``[K_i]`` pixels, ``normal`` bool ``[N]``).

    Returns:
        A fraction in [0, 1].

    Raises:
        ValueError: as :func:`spro_by_kind`.
    """
    return spro_by_kind(maps, regions, saturation, normal=normal, fpr_limits=(fpr_limit,))[f"{float(fpr_limit):g}"]["all"]
