"""Prior knowledge: where anomalies may go (foreground) and how a normal image may be turned.

Rotation rules (DeSTSeg's per-category choice for MVTec AD), applied to the good image before any
anomaly is drawn, so the normal and the anomalous samples see the same augmentation:

================  =========================================================================
``none``          capsule, metal_nut, pill, toothbrush, transistor; **and every category not
                  listed here** (an unknown product may be orientation-sensitive: choose a
                  rule explicitly with ``rotation=``)
``small``         U(-5, 5) degrees: wood, zipper, cable
``right_angles``  a multiple of 90 degrees (U{0, 1, 2, 3}; 0 or 180 for non-square images)
                  plus U(-5, 5): bottle, grid, hazelnut, leather, tile, carpet, screw
================  =========================================================================

Small rotations fill the corners by reflection. Foreground (object categories only by default:
bottle, cable, capsule, hazelnut, metal_nut, pill, screw, toothbrush, transistor, zipper):
the background colour is the per-channel median of a border band (``max(1, min(H, W) // 32)``
pixels wide); a pixel is foreground when any channel differs from it by more than a threshold;
a closing (max- then min-pool, ``max(3, min(H, W) // 32)`` odd) fills small holes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .draws import randint, uniform
from .geometry import rotate

__all__ = [
    "CATEGORY_ROTATION",
    "OBJECT_CATEGORIES",
    "ROTATION_RULES",
    "TEXTURE_CATEGORIES",
    "apply_rotation",
    "draw_rotation",
    "estimate_foreground",
    "foreground_rule",
    "rotation_rule",
]

ROTATION_RULES = ("none", "small", "right_angles")
OBJECT_CATEGORIES = frozenset({"bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper"})
TEXTURE_CATEGORIES = frozenset({"carpet", "grid", "leather", "tile", "wood"})
CATEGORY_ROTATION = {
    **dict.fromkeys(("capsule", "metal_nut", "pill", "toothbrush", "transistor"), "none"),
    **dict.fromkeys(("wood", "zipper", "cable"), "small"),
    **dict.fromkeys(("bottle", "grid", "hazelnut", "leather", "tile", "carpet", "screw"), "right_angles"),
}
SMALL_DEGREES = 5.0


def rotation_rule(category: str | None) -> str:
    """The rotation rule of an MVTec AD ``category``; ``"none"`` for any other (or ``None``)."""
    return CATEGORY_ROTATION.get((category or "").lower(), "none")


def foreground_rule(category: str | None) -> bool:
    """Whether anomalies of ``category`` are restricted to the foreground: MVTec AD objects only."""
    return (category or "").lower() in OBJECT_CATEGORIES


def draw_rotation(rule: str, rng: torch.Generator, *, square: bool = True) -> tuple[int, float]:
    """``(quarter turns, extra degrees)`` for ``rule`` (see the module docstring)."""
    if rule == "none":
        return 0, 0.0
    if rule == "small":
        return 0, uniform(rng, -SMALL_DEGREES, SMALL_DEGREES)
    if rule == "right_angles":
        turns = randint(rng, 0, 3) if square else 2 * randint(rng, 0, 1)
        return turns, uniform(rng, -SMALL_DEGREES, SMALL_DEGREES)
    raise ValueError(f"rotation rule: expected one of {', '.join(ROTATION_RULES)}, got {rule!r}")


def apply_rotation(image: torch.Tensor, quarter_turns: int, degrees: float) -> torch.Tensor:
    """``image`` ``[C, H, W]`` turned by ``quarter_turns`` x 90 degrees (exact), then by ``degrees`` (reflected corners)."""
    if quarter_turns % 4:
        image = torch.rot90(image, quarter_turns % 4, dims=(-2, -1))
    if degrees:
        image = rotate(image, degrees, padding="reflection").clamp(0.0, 1.0)
    return image


def estimate_foreground(image: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Foreground ``[H, W]`` float in {0, 1} of an image ``[3, H, W]`` in [0, 1] (see the module docstring)."""
    _, h, w = image.shape
    band = max(1, min(h, w) // 32)
    border = torch.cat(
        (image[:, :band].reshape(3, -1), image[:, -band:].reshape(3, -1), image[:, :, :band].reshape(3, -1), image[:, :, -band:].reshape(3, -1)),
        dim=1,
    )
    background = border.median(dim=1).values.view(3, 1, 1)
    foreground = ((image - background).abs().amax(0) > threshold).float()
    k = max(3, (min(h, w) // 32) | 1)
    closed = F.max_pool2d(foreground[None, None], k, stride=1, padding=k // 2)
    closed = -F.max_pool2d(-closed, k, stride=1, padding=k // 2)
    return closed[0, 0]
