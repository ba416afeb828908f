"""Evaluation on a labelled test set: image AUROC, pixel AUROC and AUPRO, routed by the model's ``metric_maps``.

The model needs ``predict(images [B, 3, H, W])`` returning a
:class:`~msflow_fast.models.base.Prediction` (or any object with ``anomaly_map`` ``[B, H, W]``,
``score`` ``[B]`` and, optionally, a ``maps`` dict). Pixel AUROC reads the map named by
``model.metric_map("pixel_auroc")`` and AUPRO the one named by ``model.metric_map("aupro")``
(``anomaly_map`` for models that name none). Test sets with per-defect masks (MVTec LOCO AD) also
get AU-sPRO of all, logical and structural regions from ``model.metric_map("spro")`` and image AUROC
per defect kind (:mod:`.defect_regions`).

Metrics are fractions in [0, 1]. Maps are collected on CPU in float32 (preallocated when the data
has a length) and masks as bool, about 5 bytes per pixel per map, so a full MVTec class at 512 px
needs roughly 250 MB.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .._files import atomic_write_bytes, atomic_write_json
from ..models.base import Prediction, as_batch, batch_paths
from .data import check_finite_images, decoded_finite
from .defect_regions import DefectRegions, has_defect_regions
from .metrics import aupro, auroc
from .run_folder import fresh_folder
from .visualize import images_to_uint8, save_overlay

__all__ = ["evaluate", "metric_map_name", "prediction_field", "score_warnings", "unique_stems"]


def _device_of(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def place(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Move ``model`` to ``device`` unless it is there already (a move drops inference caches)."""
    current = _device_of(model)
    target = torch.device(device) if device is not None else current
    if target.type == current.type and (target.index is None or target.index == current.index):
        return current  # "cuda" is the model's cuda:N: no move (a move drops the inference caches)
    model.to(target)
    return target


def metric_map_name(model: Any, metric: str) -> str:
    """The prediction map that feeds ``metric`` (the model's ``metric_map``; ``anomaly_map`` by default)."""
    if callable(getattr(model, "metric_map", None)):
        return model.metric_map(metric)
    return dict(getattr(model, "metric_maps", {}) or {}).get(metric, "anomaly_map")


def prediction_field(pred: Any, name: str) -> torch.Tensor:
    """``anomaly_map``, ``score`` or a named map of a prediction (a ``Prediction``, a dict, or an object)."""
    if isinstance(pred, Prediction):
        try:
            return pred.get(name)
        except KeyError as exc:
            raise TypeError(f"model.predict: {exc.args[0]}") from None
    if isinstance(pred, Mapping):
        value = pred.get(name, (pred.get("maps") or {}).get(name))
    else:
        value = getattr(pred, name, None)
        if value is None:
            value = (getattr(pred, "maps", None) or {}).get(name)
    if value is None:
        raise TypeError(f"model.predict: the result has no '{name}' field")
    return value


def score_warnings(scores: torch.Tensor) -> list[str]:
    """Warnings about image scores that cannot rank anything (all equal, or not finite)."""
    out = []
    finite = scores[torch.isfinite(scores)]
    if finite.numel() < scores.numel():
        out.append(f"{scores.numel() - finite.numel()} of {scores.numel()} image scores are NaN or infinite: the model or its inputs are broken")
    if finite.numel() > 1 and bool(finite.max() == finite.min()):
        out.append(
            f"every image got the same score ({float(finite[0]):.6g}): the scores rank nothing (a diverged model, "
            "or the official MSFlow score saturated at 1.0: try score=log_space)"
        )
    return out


def unique_stems(names: list[str]) -> list[str]:
    """File stems made unique: the first ``a`` stays ``a``, later ones become ``a_2``, ``a_3``, ... skipping taken names."""
    taken: set[str] = set()
    out = []
    for name in names:
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}_{n}"
        taken.add(candidate)
        out.append(candidate)
    return out


def _loader(data: Any, batch_size: int, num_workers: int):
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=torch.cuda.is_available())
    if isinstance(data, (torch.Tensor, Mapping)):
        return [data]
    return data


def _strings(batch: Mapping[str, Any], key: str, n: int) -> list[str]:
    if key in batch:
        value = batch[key]
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)] * n
    return [""] * n


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    """Write a CSV file atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_bytes(path, buf.getvalue().encode())


class _MapStore:
    """Per-image maps collected on the CPU: preallocated when the total is known, else chunks."""

    def __init__(self, total: int | None) -> None:
        self.total, self.filled = total, 0
        self.full: torch.Tensor | None = None
        self.chunks: list[torch.Tensor] = []

    def add(self, values: torch.Tensor) -> None:
        if self.total is None:
            self.chunks.append(values)
        else:
            if self.full is None:
                self.full = torch.zeros((self.total, *values.shape[1:]), dtype=values.dtype)
            self.full[self.filled : self.filled + values.shape[0]] = values
        self.filled += values.shape[0]

    def tensor(self) -> torch.Tensor:
        if self.total is None:
            return torch.cat(self.chunks)
        return self.full[: self.filled]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    pixel_metrics: bool = True,
    fpr_limit: float = 0.3,
    out_dir: str | os.PathLike | None = None,
    heatmaps: bool = False,
    progress: bool = True,
    spro_fpr_limits: tuple[float, ...] = (0.05, 0.3),
    annotate: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score a labelled test set.

    Args:
        model: a module with ``predict(images)`` (see the module docstring).
        data: a Dataset / DataLoader / iterable of dict batches with ``image`` ``[B, 3, H, W]``,
            ``mask`` ``[B, H, W]`` (non-zero = anomalous; optional) and ``label`` ``[B]`` (optional:
            derived from the mask).
        pixel_metrics: compute pixel AUROC and AUPRO (needs masks).
        fpr_limit: AUPRO integration limit (0.3).
        spro_fpr_limits: sPRO integration limits, for data with defect regions (MVTec LOCO AD's test
            split): 0.05 is the benchmark's, 0.3 AUPRO's.
        out_dir: if given, writes ``metrics.json`` and ``scores.csv`` there (atomically) and, with
            ``heatmaps=True``, ``heatmaps/<defect>_<name>.png`` overlays of ``anomaly_map``.
        heatmaps: write the overlays (the images are kept as uint8 while scoring, not read again).
        annotate: entries added to the result and to ``metrics.json`` (e.g. labels of an estimate);
            its ``"warnings"`` are appended to the result's.

    Returns:
        ``{"image_auroc", "pixel_auroc", "aupro"}`` as fractions in [0, 1] (``None`` when undefined,
        e.g. a test set without anomalies), ``maps`` (the map each pixel metric read), for data with
        defect regions also ``spro``, ``spro_regions`` and ``image_auroc_by_kind``
        (:meth:`.defect_regions.DefectRegions.metrics`),
        ``num_images``, ``num_anomalous``, ``seconds``, ``images_per_second`` and ``warnings``
        (e.g. every image scored the same). The overlays go to a fresh ``heatmaps/`` folder that
        replaces the old one only once complete.

    Raises:
        ValueError: a batch of CPU images holds NaN or infinity (the message names the files when
            the batches carry ``"path"``; decoded files and batches on the device are not checked).
    """
    if not callable(getattr(model, "predict", None)):
        raise TypeError(f"model: expected a module with a predict(images) method, got {type(model).__name__}")
    device = place(model, device)
    was_training = model.training
    model.eval()
    loader = _loader(data, batch_size, num_workers)
    total = None
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        total = len(data)  # type: ignore[arg-type]
    elif isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
        total = len(data.dataset)  # type: ignore[arg-type]
    finite_data = decoded_finite(data)
    routing = {"pixel_auroc": metric_map_name(model, "pixel_auroc"), "aupro": metric_map_name(model, "aupro")}
    regions = DefectRegions() if pixel_metrics and has_defect_regions(data) else None
    if regions is not None:
        routing["spro"] = metric_map_name(model, "spro")
    wanted = sorted(set(routing.values()) | ({"anomaly_map"} if heatmaps and out_dir is not None else set()))

    scores: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    paths: list[str] = []
    defects: list[str] = []
    images_u8: list[np.ndarray] = []
    stores = {name: _MapStore(total) for name in wanted}
    masks = _MapStore(total)
    filled = 0
    have_masks = pixel_metrics
    keep_images = heatmaps and out_dir is not None
    started = time.perf_counter()
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True, total=len(loader) if hasattr(loader, "__len__") else None)
    try:
        for index, raw in enumerate(iterator):
            batch = as_batch(raw)
            images = batch["image"]
            if not finite_data:
                check_finite_images(images, batch_paths(batch), f"evaluation batch {index + 1}")
            n = images.shape[0]
            pred = model.predict(images.to(device, non_blocking=device.type == "cuda"))
            score = prediction_field(pred, "score").detach().float().reshape(-1).cpu()
            if score.numel() != n:
                raise ValueError(f"model.predict: score has {score.numel()} values for a batch of {n}")
            mask = batch.get("mask")
            if mask is not None:
                mask = torch.as_tensor(mask).reshape(n, *mask.shape[-2:]).cpu() != 0
            label = batch.get("label")
            if label is None:
                if mask is None:
                    raise ValueError("evaluate: each batch needs a 'label' or a 'mask' entry")
                label = mask.flatten(1).any(1)
            scores.append(score)
            labels.append(torch.as_tensor(label).reshape(-1).long().cpu())
            paths.extend(_strings(batch, "path", n))
            defects.extend(_strings(batch, "defect", n))
            if keep_images:
                images_u8.extend(images_to_uint8(images))
            if have_masks and mask is None:
                have_masks = False
            for name in wanted:
                if not ((have_masks and name in routing.values()) or (keep_images and name == "anomaly_map")):
                    continue
                values = prediction_field(pred, name).detach().float().cpu()
                if mask is not None and values.shape != mask.shape:
                    raise ValueError(
                        f"evaluate: the model's {name!r} has shape {tuple(values.shape)} but the masks are "
                        f"{tuple(mask.shape)}; build the dataset with the model's input_size"
                    )
                stores[name].add(values)
            if mask is not None:
                masks.add(mask)
            if regions is not None:
                regions.add(batch, n)
            filled += n
    finally:
        if was_training:
            model.train()
    seconds = time.perf_counter() - started
    if filled == 0:
        raise ValueError("evaluate: the data produced no image")
    score_t, label_t = torch.cat(scores), torch.cat(labels)
    n_anom = int((label_t != 0).sum())
    result: dict[str, Any] = {
        "image_auroc": None,
        "pixel_auroc": None,
        "aupro": None,
        "maps": routing,
        "num_images": filled,
        "num_anomalous": n_anom,
        "seconds": seconds,
        "images_per_second": filled / seconds if seconds > 0 else None,
        "units": "fraction",
        "warnings": score_warnings(score_t),
    }
    if 0 < n_anom < filled:
        result["image_auroc"] = auroc(score_t, label_t)
    mask_t = masks.tensor() if have_masks else None
    if mask_t is not None and mask_t.any() and not mask_t.all():
        result["pixel_auroc"] = auroc(stores[routing["pixel_auroc"]].tensor(), mask_t)
        result["aupro"] = aupro(stores[routing["aupro"]].tensor(), mask_t, fpr_limit=fpr_limit)
    if regions is not None and mask_t is not None:
        entries, notes = regions.metrics(stores[routing["spro"]].tensor(), label_t, score_t, spro_fpr_limits)
        result.update(entries)
        result["warnings"].extend(notes)
    result["metric_seconds"] = time.perf_counter() - started - seconds
    if annotate:
        extra = dict(annotate)
        result["warnings"] = result["warnings"] + list(extra.pop("warnings", []))
        result.update(extra)

    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(out / "metrics.json", result)
        rows = [[p, d, int(l), f"{s:.8g}"] for p, d, l, s in zip(paths, defects, label_t.tolist(), score_t.tolist())]
        write_csv(out / "scores.csv", ["path", "defect", "label", "score"], rows)
        if keep_images:
            maps = stores["anomaly_map"].tensor()
            vmin, vmax = float(maps.min()), float(maps.max())  # one colour range over the run (maps may be negative)
            names = unique_stems([f"{defects[i] or 'image'}_{Path(paths[i]).stem if paths[i] else f'{i:05d}'}" for i in range(filled)])
            with fresh_folder(out / "heatmaps") as folder:
                for i in range(filled):
                    overlay_mask = mask_t[i] if mask_t is not None else None
                    save_overlay(folder / f"{names[i]}.png", images_u8[i], maps[i], mask=overlay_mask, vmin=vmin, vmax=vmax)
    return result
