"""A gallery of pseudo anomalies a person can look at: PNG files, an index and a contact sheet.

:func:`write_gallery` writes into ``out``::

    samples/0000_image.png     the generated image (8-bit RGB, input_size)
    samples/0000_mask.png      its mask (white = anomalous)
    samples/0000_overlay.png   image | mask as a heat overlay | mask (engine.visualize.save_overlay)
    ...
    index.csv                  image, mask, overlay, source, branch, label, mask_area (fraction), attempts
    contact_sheet.png          up to 64 thumbnails with the mask outlined in red and the branch named
    settings.json              seed, config, texture entries, the good images used

``samples/`` is written beside the old one and swapped in when complete (never two runs mixed);
every file is written atomically. Take the folder's lock (:class:`~.run_folder.RunLock`) around it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Subset

from .._files import atomic_write_bytes, atomic_write_json
from .data.images import denormalize
from .data.pseudo_anomaly import PseudoAnomalyConfig, PseudoAnomalyGenerator
from .evaluate import write_csv
from .run_folder import fresh_folder
from .visualize import save_overlay

__all__ = ["CONTACT_SHEET_LIMIT", "write_gallery"]

CONTACT_SHEET_LIMIT = 64
_THUMB = 128


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _uint8(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> uint8 ``[H, W, 3]``."""
    return (image.detach().float().cpu().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def _thumbnail(image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """uint8 ``[T, T, 3]`` thumbnail: the image (area-resized) with the mask's outline (mask pixels
    next to a non-mask pixel, at thumbnail resolution) in red."""
    small = F.interpolate(image.detach().float().cpu()[None], size=(_THUMB, _THUMB), mode="area")[0]
    m = F.interpolate(mask.detach().float().cpu()[None, None], size=(_THUMB, _THUMB), mode="area")
    m = (m > 0).float()  # any anomalous pixel under a thumbnail pixel: tiny scars stay visible
    eroded = -F.max_pool2d(-m, 3, stride=1, padding=1)
    edge = (m - eroded)[0, 0] > 0
    rgb = _uint8(small)
    rgb[edge.numpy()] = (255, 0, 0)
    return rgb


def _contact_sheet(tiles: list[tuple[np.ndarray, str]]) -> bytes:
    columns = min(8, len(tiles))
    rows = (len(tiles) + columns - 1) // columns
    caption = 14
    sheet = Image.new("RGB", (columns * (_THUMB + 4) + 4, rows * (_THUMB + caption + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (rgb, label) in enumerate(tiles):
        r, c = divmod(k, columns)
        x, y = 4 + c * (_THUMB + 4), 4 + r * (_THUMB + caption + 4)
        sheet.paste(Image.fromarray(rgb), (x, y))
        draw.text((x + 2, y + _THUMB + 1), label, fill=(0, 0, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _first(items: list) -> Any:
    return items[0]


def _read_good(base: Any, count: int, normalization: str, device: torch.device, num_workers: int) -> tuple[list[torch.Tensor], list[str]]:
    """The first ``count`` good images of ``base`` in [0, 1] on ``device``, and their paths."""
    loader = DataLoader(Subset(base, range(count)), batch_size=1, num_workers=num_workers, collate_fn=_first)
    images, paths = [], []
    for item in loader:
        image = item["image"].float().to(device)
        images.append(denormalize(image) if normalization == "imagenet" else image)
        paths.append(str(item.get("path", "")))
    return images, paths


def write_gallery(
    base: Any, out: str | os.PathLike, *, count: int = 16, seed: int = 0, config: PseudoAnomalyConfig | None = None,
    normalization: str = "imagenet", mixture: bool = False, describe: dict[str, Any] | None = None,
    device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = False,
) -> list[dict[str, Any]]:
    """Draw ``count`` samples from the good images of ``base`` and write them (module docstring).

    Sample ``k`` starts from good image ``k % m`` (``m = min(len(base), count + 1)``: the first
    images are read once) and blends (Poisson branch) from the next one; its draws are those of
    index ``k`` of a :class:`PseudoAnomalyGenerator` with ``seed``.

    Args:
        base: a map-style dataset of good images (dict items with ``"image"`` ``[3, H, W]``).
        normalization: ``"imagenet"`` (the engine's datasets) or ``"none"`` (images in [0, 1]).
        mixture: draw from the full mixture (normal samples included); default: anomalies only.
        describe: extra entries for ``settings.json`` (e.g. the data root and category).
        device: where the samples are generated (the good images are read there once).
        num_workers: DataLoader processes that read the good images.
        progress: show a progress bar.

    Returns:
        The index rows (dicts), as written to ``index.csv``.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count: expected a positive int, got {count!r}")
    if normalization not in ("imagenet", "none"):
        raise ValueError(f"normalization: expected 'imagenet' or 'none', got {normalization!r}")
    n = len(base)
    if n == 0:
        raise ValueError("base: the dataset of good images is empty")
    generator = PseudoAnomalyGenerator(config, seed)
    out = Path(out)
    images, paths = _read_good(base, min(n, count + 1), normalization, torch.device(device), num_workers)
    steps: Any = range(count)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="pseudo anomalies", leave=False, dynamic_ncols=True)

    rows: list[dict[str, Any]] = []
    tiles: list[tuple[np.ndarray, str]] = []
    with fresh_folder(out / "samples") as folder:
        for k in steps:
            image, path = images[k % len(images)], paths[k % len(images)]
            other = images[(k + 1) % len(images)] if len(images) > 1 else None
            sample = generator(image, k, other=other, force=None if mixture else "anomaly")
            stem = f"{k:04d}"
            rgb = _uint8(sample.image)
            mask = (sample.mask.detach().cpu().numpy() > 0.5).astype(np.uint8) * 255
            atomic_write_bytes(folder / f"{stem}_image.png", _png(rgb))
            atomic_write_bytes(folder / f"{stem}_mask.png", _png(mask))
            save_overlay(folder / f"{stem}_overlay.png", rgb, sample.mask.cpu(), mask=sample.mask.cpu())
            rows.append({
                "image": f"samples/{stem}_image.png", "mask": f"samples/{stem}_mask.png", "overlay": f"samples/{stem}_overlay.png",
                "source": path, "branch": sample.branch, "label": sample.label, "mask_area": round(sample.area, 6),
                "attempts": sample.attempts,
            })
            if len(tiles) < CONTACT_SHEET_LIMIT:
                tiles.append((_thumbnail(sample.image, sample.mask), f"{stem} {sample.branch}"))
    header = list(rows[0])
    write_csv(out / "index.csv", header, [[row[h] for h in header] for row in rows])
    atomic_write_bytes(out / "contact_sheet.png", _contact_sheet(tiles))
    settings = {
        "seed": seed, "count": count, "mixture": mixture, "config": generator.config.to_dict(),
        "texture_entries": list(generator.sources), "good_images_used": len(images), **(describe or {}),
    }
    atomic_write_json(out / "settings.json", settings)
    return rows
