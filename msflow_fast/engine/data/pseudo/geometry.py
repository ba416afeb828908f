"""Geometry on ``[C, H, W]`` tensors: rotation about the centre, rotated-rectangle pastes, resizing.

Angles are degrees, counter-clockwise as seen on screen; pixel coordinates are ``(row, col)`` of
pixel centres. Every function runs on the tensor's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["paste_rotated_rect", "resize", "rotate"]

_PADDINGS = ("zeros", "border", "reflection")


def rotate(image: torch.Tensor, degrees: float, *, padding: str = "zeros", mode: str = "bilinear") -> torch.Tensor:
    """``image`` ``[C, H, W]`` rotated by ``degrees`` about its centre; the size is kept.

    ``padding``: what fills the corners: ``"zeros"``, ``"border"`` (replicate) or ``"reflection"``.
    """
    if padding not in _PADDINGS:
        raise ValueError(f"padding: expected one of {', '.join(_PADDINGS)}, got {padding!r}")
    if degrees == 0.0:
        return image.clone()
    c, h, w = image.shape
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    # Output pixel (x, y) reads input R(-theta) (x, y) in pixel units; normalised coords scale x by 2/W, y by 2/H.
    matrix = torch.tensor(
        [[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=torch.float32, device=image.device
    )
    grid = F.affine_grid(matrix[None], [1, c, h, w], align_corners=False)
    out = F.grid_sample(image[None].float(), grid, mode=mode, padding_mode=padding, align_corners=False)
    return out[0].to(image.dtype)


def resize(image: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """``[C, h, w]`` -> ``[C, H, W]``, bilinear, antialiased when shrinking."""
    if tuple(image.shape[-2:]) == tuple(size_hw):
        return image
    shrink = size_hw[0] < image.shape[-2] or size_hw[1] < image.shape[-1]
    return F.interpolate(image[None].float(), size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=shrink)[0]


def paste_rotated_rect(
    target: torch.Tensor, source: torch.Tensor, *, src_centre: tuple[float, float], dst_centre: tuple[float, float],
    height: float, width: float, degrees: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a ``height x width`` rectangle (pixels) of ``source`` centred at ``src_centre`` onto
    ``target`` at ``dst_centre``, rotated by ``degrees``.

    Both images are ``[C, H, W]`` of one size. A target pixel belongs to the pasted region when its
    centre lies inside the rotated rectangle; its value is read from the matching source point
    (bilinear, border-replicated).

    Returns:
        ``(image [C, H, W], mask [H, W] float in {0, 1})``.
    """
    c, h, w = target.shape
    device = target.device
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None]
    cols = torch.arange(w, device=device, dtype=torch.float32)[None, :]
    dy, dx = rows - float(dst_centre[0]), cols - float(dst_centre[1])
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    # Rectangle-local coordinates of each target pixel (inverse rotation).
    local_y = cos * dy + sin * dx
    local_x = -sin * dy + cos * dx
    mask = ((local_y.abs() <= height / 2.0) & (local_x.abs() <= width / 2.0)).float()
    src_y = local_y + float(src_centre[0])
    src_x = local_x + float(src_centre[1])
    grid = torch.stack(((src_x + 0.5) * (2.0 / w) - 1.0, (src_y + 0.5) * (2.0 / h) - 1.0), dim=-1)
    sampled = F.grid_sample(source[None].float(), grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0]
    return target + (sampled.to(target.dtype) - target) * mask, mask
