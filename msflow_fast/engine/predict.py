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
from .evaluate import place, prediction_field, unique_stems, write_csv
from .run_folder import fresh_folder
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
    vmin: float | None = None,
    vmax: float | None = None,
    skip_unreadable: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score images (a folder, a file or a list of files) and write heat-map overlays.

    Writes ``out_dir/heatmaps/<name>.png`` (image | overlay of ``anomaly_map``; a fresh folder
    that replaces the old one once complete; names made unique) and ``out_dir/scores.csv`` (path,
    score, heatmap, error), each atomically. The colour range is ``[vmin, vmax]`` for every image,
    the smallest and largest map values over all images unless given, so overlays are comparable
    (and maps in ``[-1, 0]``, as FastFlow's, show). Each image is decoded once (the overlays reuse it, kept as uint8). Every file is
    checked before any is scored.

    Args:
        input_size: resize to this ``(H, W)`` (or side); default: the model's ``input_size``.
        skip_unreadable: score the readable files and report the others (``error`` in the result
            and in ``scores.csv``) instead of stopping.

    Returns:
        One dict per image: ``path``, ``score``, ``heatmap`` (the PNG written), ``error`` (why it
        was skipped, else ``None``).

    Raises:
        FileNotFoundError, ValueError: a missing or empty source, or unreadable files (all named)
            without ``skip_unreadable``.
    """
    if input_size is None:
        input_size = getattr(model, "input_size", None) or getattr(getattr(model, "config", None), "input_size", None)
        if input_size is None:
            raise ValueError("input_size: the model has no input_size; pass input_size")
    dataset = ImageFolderDataset(source, input_size=input_size)
    bad = dataset.unreadable()
    if bad and not skip_unreadable:
        listed = "\n  ".join(reason for _, reason in bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"{len(bad)} of {len(dataset)} images cannot be read (skip them with skip_unreadable=True, CLI: --skip-unreadable):\n  {listed}")
    if bad:
        dataset = dataset.without([path for path, _ in bad])
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
    bottom = vmin if vmin is not None else min(float(m.float().min()) for m in maps)
    results = []
    names = unique_stems([path.stem for path in dataset.files])
    with fresh_folder(out / "heatmaps") as folder:
        for i, (path, amap, score) in enumerate(zip(dataset.files, maps, scores)):
            save_overlay(folder / f"{names[i]}.png", images_u8[i], amap.float(), vmin=bottom, vmax=top)
            results.append({"path": str(path), "score": score, "heatmap": str(out / "heatmaps" / f"{names[i]}.png"), "error": None})
    results += [{"path": str(path), "score": None, "heatmap": None, "error": reason} for path, reason in bad]
    rows = [[r["path"], "" if r["score"] is None else f"{r['score']:.8g}", r["heatmap"] or "", r["error"] or ""] for r in results]
    write_csv(out / "scores.csv", ["path", "score", "heatmap", "error"], rows)
    return results
