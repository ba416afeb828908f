"""Evaluation (image AUROC, pixel AUROC, AUPRO) and prediction with heat-map overlays.

The model only needs ``model.predict(images [B, 3, H, W])`` returning an object with
``anomaly_map`` ``[B, H, W]`` (add aggregation, used for pixel AUROC and the overlays),
``anomaly_map_mul`` ``[B, H, W]`` (mul aggregation, used for AUPRO) and ``score`` ``[B]`` (image
score); :class:`msflow_fast.model.MSFlow` provides it.

Metrics are fractions in [0, 1] (MSFlow's logs print percentages: multiply by 100). Maps are
collected on CPU in float32 (preallocated when the data has a length) and masks as bool, about
9 bytes per pixel, so a full MVTec class at 512 px needs roughly 250 MB.

Input images on the CPU are checked for NaN/inf once per batch, before they move to the device
(:func:`~msflow_fast.engine.data.check_finite_images`: no device sync; the error names the files).
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .checkpoint import atomic_write_bytes, atomic_write_json
from .data import ImageFolderDataset, check_finite_images
from .metrics import aupro, auroc
from .train import batch_images, batch_paths
from .visualize import save_overlay

__all__ = ["evaluate", "predict_folder"]


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _loader(data: Any, batch_size: int, num_workers: int):
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if isinstance(data, (torch.Tensor, dict)):
        return [data]
    return data


def _field(pred: Any, name: str) -> torch.Tensor:
    value = pred.get(name) if isinstance(pred, dict) else getattr(pred, name, None)
    if value is None:
        raise TypeError(f"model.predict: the result has no '{name}' field")
    return value


def _strings(batch: Any, key: str, n: int) -> list[str]:
    if isinstance(batch, dict) and key in batch:
        value = batch[key]
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)] * n
    return [""] * n


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


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
) -> dict[str, Any]:
    """Score a labelled test set.

    Args:
        model: a module with ``predict(images)`` (see the module docstring).
        data: a Dataset / DataLoader / iterable of dict batches with ``image`` ``[B, 3, H, W]``,
            ``mask`` ``[B, H, W]`` (non-zero = anomalous; optional) and ``label`` ``[B]`` (optional:
            derived from the mask).
        pixel_metrics: compute pixel AUROC and AUPRO (needs masks).
        fpr_limit: AUPRO integration limit (0.3).
        out_dir: if given, writes ``metrics.json`` and ``scores.csv`` there (atomically) and, with
            ``heatmaps=True`` and a Dataset, ``heatmaps/<defect>_<name>.png`` overlays.

    Returns:
        ``{"image_auroc", "pixel_auroc", "aupro"}`` as fractions in [0, 1] (``None`` when undefined,
        e.g. a test set without anomalies), plus ``num_images``, ``num_anomalous``, ``seconds`` and
        ``images_per_second``.

    Raises:
        ValueError: a batch of CPU images holds NaN or infinity (the message names the files when
            the batches carry ``"path"``; batches already on the device are not checked).
    """
    if not callable(getattr(model, "predict", None)):
        raise TypeError(f"model: expected a module with a predict(images) method, got {type(model).__name__}")
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device)
    was_training = model.training
    model.eval()
    loader = _loader(data, batch_size, num_workers)
    total = None
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        total = len(data)  # type: ignore[arg-type]
    elif isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
        total = len(data.dataset)  # type: ignore[arg-type]

    scores: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    paths: list[str] = []
    defects: list[str] = []
    maps_add = maps_mul = masks = None
    chunks_add, chunks_mul, chunks_mask = [], [], []
    filled = 0
    have_masks = pixel_metrics
    started = time.perf_counter()
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True, total=len(loader) if hasattr(loader, "__len__") else None)
    try:
        for index, batch in enumerate(iterator):
            images = check_finite_images(batch_images(batch), batch_paths(batch), f"evaluation batch {index + 1}")
            images = images.to(device)
            n = images.shape[0]
            pred = model.predict(images)
            score = _field(pred, "score").detach().float().reshape(-1).cpu()
            if score.numel() != n:
                raise ValueError(f"model.predict: score has {score.numel()} values for a batch of {n}")
            mask = batch.get("mask") if isinstance(batch, dict) else None
            if mask is not None:
                mask = mask.reshape(n, *mask.shape[-2:]).cpu() != 0
            label = batch.get("label") if isinstance(batch, dict) else None
            if label is None:
                if mask is None:
                    raise ValueError("evaluate: each batch needs a 'label' or a 'mask' entry")
                label = mask.flatten(1).any(1)
            scores.append(score)
            labels.append(torch.as_tensor(label).reshape(-1).long().cpu())
            paths.extend(_strings(batch, "path", n))
            defects.extend(_strings(batch, "defect", n))
            if have_masks and mask is None:
                have_masks = False
            if have_masks:
                amap = _field(pred, "anomaly_map").detach().float().cpu()
                mmap = _field(pred, "anomaly_map_mul").detach().float().cpu()
                if amap.shape != mask.shape or mmap.shape != mask.shape:
                    raise ValueError(
                        f"evaluate: anomaly maps {tuple(amap.shape)} / {tuple(mmap.shape)} do not match masks "
                        f"{tuple(mask.shape)}; build the dataset with the model's input_size"
                    )
                if total is not None:
                    if maps_add is None:
                        shape = (total, *mask.shape[1:])
                        maps_add, maps_mul = torch.zeros(shape), torch.zeros(shape)
                        masks = torch.zeros(shape, dtype=torch.bool)
                    maps_add[filled : filled + n] = amap
                    maps_mul[filled : filled + n] = mmap
                    masks[filled : filled + n] = mask
                else:
                    chunks_add.append(amap)
                    chunks_mul.append(mmap)
                    chunks_mask.append(mask)
            filled += n
    finally:
        if was_training:
            model.train()
    seconds = time.perf_counter() - started
    if filled == 0:
        raise ValueError("evaluate: the data produced no image")
    if have_masks and total is None:
        maps_add, maps_mul, masks = torch.cat(chunks_add), torch.cat(chunks_mul), torch.cat(chunks_mask)
        chunks_add, chunks_mul, chunks_mask = [], [], []
    elif have_masks:
        maps_add, maps_mul, masks = maps_add[:filled], maps_mul[:filled], masks[:filled]
    score_t, label_t = torch.cat(scores), torch.cat(labels)
    n_anom = int((label_t != 0).sum())
    result: dict[str, Any] = {
        "image_auroc": None,
        "pixel_auroc": None,
        "aupro": None,
        "num_images": filled,
        "num_anomalous": n_anom,
        "seconds": seconds,
        "images_per_second": filled / seconds if seconds > 0 else None,
        "units": "fraction",
    }
    if 0 < n_anom < filled:
        result["image_auroc"] = auroc(score_t, label_t)
    if have_masks and masks.any() and not masks.all():
        result["pixel_auroc"] = auroc(maps_add, masks)
        result["aupro"] = aupro(maps_mul, masks, fpr_limit=fpr_limit)
    result["metric_seconds"] = time.perf_counter() - started - seconds

    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(out / "metrics.json", result)
        rows = [[p, d, int(l), f"{s:.8g}"] for p, d, l, s in zip(paths, defects, label_t.tolist(), score_t.tolist())]
        _write_csv(out / "scores.csv", ["path", "defect", "label", "score"], rows)
        if heatmaps and isinstance(data, Dataset) and maps_add is not None:
            vmax = float(maps_add.max())
            for i in range(filled):
                item = data[i]
                stem = Path(paths[i]).stem if paths[i] else f"{i:05d}"
                save_overlay(out / "heatmaps" / f"{defects[i] or 'image'}_{stem}.png", item["image"], maps_add[i], mask=masks[i], vmax=vmax)
    return result


@torch.no_grad()
def predict_folder(
    model: nn.Module,
    source: str | os.PathLike | list,
    out_dir: str | os.PathLike,
    *,
    input_size: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    vmax: float | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score images (a folder, a file or a list of files) and write heat-map overlays.

    Writes ``out_dir/heatmaps/<name>.png`` (image | overlay of ``anomaly_map``) and
    ``out_dir/scores.csv`` (path, score). The colour range is ``[0, vmax]`` for every image, with
    ``vmax`` = the largest map value over all images unless given, so overlays are comparable.

    Args:
        input_size: resize side; default = ``model.config.input_size``.

    Returns:
        One dict per image: ``path``, ``score``, ``heatmap`` (the PNG written).

    Raises:
        ValueError: an image holds NaN or infinity after loading (the message names the file).
    """
    if input_size is None:
        config = getattr(model, "config", None)
        input_size = getattr(config, "input_size", None)
        if input_size is None:
            raise ValueError("input_size: the model has no config.input_size; pass input_size")
    dataset = ImageFolderDataset(source, input_size=input_size)
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device)
    was_training = model.training
    model.eval()
    maps: list[torch.Tensor] = []
    scores: list[float] = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="predict", leave=False, dynamic_ncols=True)
    try:
        for batch in loader:
            images = check_finite_images(batch["image"], batch_paths(batch))
            pred = model.predict(images.to(device))
            maps.extend(_field(pred, "anomaly_map").detach().float().cpu().half())
            scores.extend(_field(pred, "score").detach().float().reshape(-1).cpu().tolist())
    finally:
        if was_training:
            model.train()
    out = Path(out_dir)
    top = vmax if vmax is not None else max(float(m.float().max()) for m in maps)
    results = []
    used: set[str] = set()
    for i, (path, amap, score) in enumerate(zip(dataset.files, maps, scores)):
        name = path.stem if path.stem not in used else f"{path.stem}_{i}"
        used.add(name)
        png = save_overlay(out / "heatmaps" / f"{name}.png", dataset[i]["image"], amap.float(), vmax=top)
        results.append({"path": str(path), "score": score, "heatmap": str(png)})
    _write_csv(out / "scores.csv", ["path", "score", "heatmap"], [[r["path"], f"{r['score']:.8g}", r["heatmap"]] for r in results])
    return results
