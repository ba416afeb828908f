"""Heat-map overlays a person can look at: a colour map applied in numpy, blended with the image."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .._files import atomic_write_bytes
from .data.images import IMAGENET_MEAN, IMAGENET_STD, denormalize

__all__ = ["apply_colormap", "images_to_uint8", "overlay", "save_overlay"]

# Control points of a perceptually ordered blue -> cyan -> green -> yellow -> red map.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array(
    [
        [0.19, 0.07, 0.55],
        [0.10, 0.55, 0.95],
        [0.20, 0.85, 0.35],
        [0.98, 0.80, 0.10],
        [0.85, 0.10, 0.05],
    ]
)


def apply_colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape ``S``) to uint8 RGB ``S + (3,)`` (values outside are clipped)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Normalised images ``[B, 3, H, W]`` -> uint8 RGB ``[B, H, W, 3]`` (for overlays, kept instead of re-reading files)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected normalised tensors [B, 3, H, W], got {tuple(images.shape)}")
    x = images.detach().float().cpu()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (x * std + mean).clamp_(0.0, 1.0).mul_(255.0).add_(0.5)
    return rgb.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _image_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image: expected a normalised tensor [3, H, W], got {tuple(image.shape)}")
        rgb = denormalize(image.detach().float().cpu()).permute(1, 2, 0).numpy()
        return (rgb * 255.0 + 0.5).astype(np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
    return arr


def overlay(image: torch.Tensor | np.ndarray, heat: torch.Tensor | np.ndarray, *, vmin: float = 0.0, vmax: float = 1.0, alpha: float = 0.5) -> np.ndarray:
    """Blend a heat map with an image.

    Args:
        image: normalised tensor ``[3, H, W]`` or uint8 ``[H, W, 3]``.
        heat: ``[H, W]`` anomaly map; ``[vmin, vmax]`` maps to the colour range.
        alpha: weight of the colour map.

    Returns:
        uint8 ``[H, W, 3]``.
    """
    img = _image_uint8(image)
    h = heat.detach().float().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, dtype=np.float32)
    if h.shape != img.shape[:2]:
        raise ValueError(f"heat: expected shape {img.shape[:2]} (the image's), got {h.shape}")
    scale = vmax - vmin if vmax > vmin else 1.0
    colours = apply_colormap((h - vmin) / scale).astype(np.float32)
    return (alpha * colours + (1.0 - alpha) * img.astype(np.float32) + 0.5).astype(np.uint8)


def save_overlay(
    path: str | os.PathLike,
    image: torch.Tensor | np.ndarray,
    heat: torch.Tensor | np.ndarray,
    *,
    mask: torch.Tensor | np.ndarray | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    alpha: float = 0.5,
) -> Path:
    """Write a PNG atomically with panels side by side: image | overlay | ground-truth mask (if given).

    ``image`` is a normalised tensor ``[3, H, W]`` or uint8 ``[H, W, 3]`` (see :func:`images_to_uint8`).
    """
    img = _image_uint8(image)
    panels = [img, overlay(img, heat, vmin=vmin, vmax=vmax, alpha=alpha)]
    if mask is not None:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        panels.append(np.repeat((m != 0).astype(np.uint8)[..., None] * 255, 3, axis=2))
    gap = np.full((img.shape[0], 4, 3), 255, dtype=np.uint8)
    row = panels[0]
    for panel in panels[1:]:
        row = np.concatenate([row, gap, panel], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(row).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())
