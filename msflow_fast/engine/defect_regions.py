"""Per-region ground truth gathered while evaluating a test set whose items carry defect regions
(MVTec LOCO AD, :class:`~.data.loco.MVTecLocoDataset`), and the metrics it gives: AU-sPRO of all,
logical and structural regions, and image AUROC per defect kind.

Batches carry ``defect_masks`` bool ``[B, K, H, W]``, ``defect_saturation`` float64 ``[B, K]``
(pixels; NaN = no region) and ``defect_kind`` (B strings). Only the anomalous images' regions are
kept (bool, about one byte per region pixel of the maps' size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from .metrics import auroc
from .metrics_spro import spro_by_kind

__all__ = ["KINDS", "DefectRegions", "has_defect_regions"]

KINDS = ("logical", "structural")
"""The defect kinds reported beside ``"all"``."""


def has_defect_regions(data: Any) -> bool:
    """Whether ``data`` (a Dataset, or a DataLoader over one) yields per-region ground truth: its
    ``has_defect_regions`` attribute (MVTec LOCO AD's test split sets it)."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    return bool(getattr(dataset, "has_defect_regions", False))


class DefectRegions:
    """The defect regions of the images scored so far, in order."""

    def __init__(self) -> None:
        self.regions: list[torch.Tensor] = []
        self.saturation: list[torch.Tensor] = []
        self.kinds: list[str] = []
        self.vanished = 0

    def add(self, batch: Mapping[str, Any], n: int) -> None:
        """Keep the regions of a batch of ``n`` images (images without regions keep an empty entry).

        Raises:
            ValueError: a batch without ``defect_masks`` / ``defect_saturation``.
        """
        if "defect_masks" not in batch or "defect_saturation" not in batch:
            raise ValueError("evaluate: a batch of a dataset with defect regions lacks 'defect_masks' or 'defect_saturation'")
        masks = torch.as_tensor(batch["defect_masks"]).cpu()
        saturation = torch.as_tensor(batch["defect_saturation"]).double().cpu().reshape(n, -1)
        masks = masks.reshape(n, saturation.shape[1], *masks.shape[-2:]) != 0
        kinds = batch.get("defect_kind", ["good"] * n)
        kinds = [str(k) for k in kinds] if isinstance(kinds, (list, tuple)) else [str(kinds)] * n
        for i in range(n):
            real = ~torch.isnan(saturation[i])
            keep = real & (saturation[i] > 0) & masks[i].flatten(1).any(1)
            self.vanished += int((real & ~keep).sum())
            self.regions.append(masks[i][keep].clone())
            self.saturation.append(saturation[i][keep].clone())
            self.kinds.append(kinds[i])

    def metrics(self, maps: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, fpr_limits: Sequence[float]) -> tuple[dict[str, Any], list[str]]:
        """``(result entries, warnings)`` for the ``evaluate`` result.

        Args:
            maps: ``[N, H, W]`` the maps sPRO reads; ``labels`` ``[N]`` (0 = anomaly-free);
            ``scores`` ``[N]`` image scores; ``fpr_limits``: sPRO's FPR limits.

        Returns:
            ``spro``: ``{f"{limit:g}": {"all", "logical", "structural"}}`` (``None`` where a kind has no
            region or the test set has no anomaly-free image); ``spro_regions``: region counts per
            kind; ``image_auroc_by_kind``: ``{"logical", "structural"}`` image AUROC of each kind's
            images against the anomaly-free ones.
        """
        if len(self.regions) != maps.shape[0]:
            raise ValueError(f"evaluate: {len(self.regions)} images carried defect regions but {maps.shape[0]} were scored")
        warnings = []
        if self.vanished:
            warnings.append(
                f"{self.vanished} defect region(s) have no pixel at the input size {tuple(maps.shape[-2:])} (too small for the "
                "resize) and are left out of sPRO; a larger input size keeps them"
            )
        counts = {"all": sum(r.shape[0] for r in self.regions)}
        counts.update({k: sum(r.shape[0] for r, kind in zip(self.regions, self.kinds) if kind == k) for k in KINDS})
        normal = labels == 0
        limits = [f"{float(x):g}" for x in fpr_limits]
        spro: dict[str, dict[str, float | None]] = {x: {g: None for g in ("all", *KINDS)} for x in limits}
        if counts["all"] and bool(normal.any()):
            spro = spro_by_kind(maps, self.regions, self.saturation, self.kinds, normal=normal, fpr_limits=fpr_limits, groups=KINDS)
        elif counts["all"]:
            warnings.append("sPRO needs anomaly-free test images (its FPR is counted on them); the test split has none")
        by_kind: dict[str, float | None] = {}
        for kind in KINDS:
            select = normal | torch.tensor([k == kind for k in self.kinds], dtype=torch.bool)
            y = (~normal)[select]
            by_kind[kind] = auroc(scores[select], y) if bool(y.any()) and not bool(y.all()) else None
        return {"spro": spro, "spro_regions": counts, "image_auroc_by_kind": by_kind}, warnings
