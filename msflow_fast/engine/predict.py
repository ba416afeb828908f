"""Prediction on unlabelled images: scores, heat-map overlays (PNG) and ``scores.csv``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import ImageFolderDataset
from .evaluate import place, prediction_field, write_csv
from .visualize import images_to_uint8, save_overlay

__all__ = ["predict_folder"]


@torch.no_grad()
def predict_folder(
    model: nn.Module,
    source: str | os.PathLike | list,
    out_dir: str | os.PathLike,
    *,
    input_size: int | tuple[int, int] | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    vmax: float | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score images (a folder, a file or a list of files) and write heat-map overlays.

    Writes ``out_dir/heatmaps/<name>.png`` (image | overlay of ``anomaly_map``) and
    ``out_dir/scores.csv`` (path, score), each atomically. The colour range is ``[0, vmax]`` for
    every image, with ``vmax`` = the largest map value over all images unless given, so overlays
    are comparable. Each image is decoded once (the overlays reuse it, kept as uint8).

    Args:
        input_size: resize to this ``(H, W)`` (or side); default: the model's ``input_size``.

    Returns:
        One dict per image: ``path``, ``score``, ``heatmap`` (the PNG written).

    Raises:
        FileNotFoundError, ValueError: a missing, empty or unreadable source (named).
    """
    if input_size is None:
        input_size = getattr(model, "input_size", None) or getattr(getattr(model, "config", None), "input_size", None)
        if input_size is None:
            raise ValueError("input_size: the model has no input_size; pass input_size")
    dataset = ImageFolderDataset(source, input_size=input_size)
    device = place(model, device)
    was_training = model.training
    model.eval()
    maps: list[torch.Tensor] = []
    scores: list[float] = []
    images_u8: list[np.ndarray] = []
    loader: Any = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="predict", leave=False, dynamic_ncols=True)
    try:
        for batch in loader:
            # Decoded 8-bit files: always finite, no NaN pass.
            images = batch["image"]
            pred = model.predict(images.to(device, non_blocking=device.type == "cuda"))
            maps.extend(prediction_field(pred, "anomaly_map").detach().float().cpu().half())
            scores.extend(prediction_field(pred, "score").detach().float().reshape(-1).cpu().tolist())
            images_u8.extend(images_to_uint8(images))
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
        png = save_overlay(out / "heatmaps" / f"{name}.png", images_u8[i], amap.float(), vmax=top)
        results.append({"path": str(path), "score": score, "heatmap": str(png)})
    write_csv(out / "scores.csv", ["path", "score", "heatmap"], [[r["path"], f"{r['score']:.8g}", r["heatmap"]] for r in results])
    return results
