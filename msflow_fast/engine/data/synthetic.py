"""A synthetic defect dataset, generated from a seed, for the demo and the tests (no download), and
its writer to image folders in the MVTec AD or the BTAD layout."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .checks import fingerprint_files
from .images import PIPELINE_VERSION, normalize

__all__ = ["SyntheticDefects", "write_synthetic_dataset"]

SYNTHETIC_VERSION = 1
"""Bumped whenever the generator changes the images a seed gives (part of the fingerprint)."""


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    coarse = torch.from_numpy(rng.standard_normal((1, channels, cells, cells)).astype(np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return fine[0].permute(1, 2, 0).numpy()


def _normal_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Woven-looking texture: two families of stripes with jittered phase plus smooth colour noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    period = 10.0 + rng.uniform(-0.5, 0.5)
    angle = 0.35 + rng.uniform(-0.05, 0.05)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    stripes = 0.5 * np.sin(2 * math.pi * period * u + rng.uniform(0, 2 * math.pi))
    stripes += 0.3 * np.sin(2 * math.pi * period * 1.5 * v + rng.uniform(0, 2 * math.pi))
    base = np.array([0.55, 0.45, 0.35], dtype=np.float32)
    img = base + 0.12 * stripes[..., None] + 0.05 * _smooth_noise(rng, size, 6, 3)
    img += 0.02 * rng.standard_normal((size, size, 3)).astype(np.float32)
    return img


def _ellipse(rng: np.random.Generator, size: int, min_r: float, max_r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ry, rx = rng.uniform(min_r, max_r, 2) * size
    cy = rng.uniform(ry, size - ry)
    cx = rng.uniform(rx, size - rx)
    theta = rng.uniform(0, math.pi)
    dy, dx = yy - cy, xx - cx
    a = (dx * math.cos(theta) + dy * math.sin(theta)) / rx
    b = (-dx * math.sin(theta) + dy * math.cos(theta)) / ry
    return a * a + b * b <= 1.0


def _add_defect(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    size = img.shape[0]
    kind = ("patch", "blob", "scratch")[int(rng.integers(0, 3))]
    img = img.copy()
    if kind == "patch":
        h, w = (rng.uniform(0.1, 0.25, 2) * size).astype(int) + 2
        y0, x0 = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
        mask = np.zeros((size, size), dtype=bool)
        mask[y0 : y0 + h, x0 : x0 + w] = True
        colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        img[mask] = colour + 0.05 * rng.standard_normal((int(mask.sum()), 3)).astype(np.float32)
    elif kind == "blob":
        mask = _ellipse(rng, size, 0.06, 0.16)
        noise = 0.5 + 0.35 * rng.standard_normal((size, size, 3)).astype(np.float32)
        img[mask] = noise[mask]
    else:
        mask = np.zeros((size, size), dtype=bool)
        t = np.linspace(0.0, 1.0, 4 * size)
        y0, x0 = rng.uniform(0.15, 0.85, 2) * size
        angle = rng.uniform(0, math.pi)
        length = rng.uniform(0.3, 0.6) * size
        half = max(1, size // 64)
        ys = np.clip((y0 + (t - 0.5) * length * math.sin(angle)).astype(int), 0, size - 1)
        xs = np.clip((x0 + (t - 0.5) * length * math.cos(angle)).astype(int), 0, size - 1)
        for dy in range(-half, half + 1):
            for dx in range(-half, half + 1):
                mask[np.clip(ys + dy, 0, size - 1), np.clip(xs + dx, 0, size - 1)] = True
        img[mask] = np.array([0.1, 0.1, 0.12], dtype=np.float32)
    return img, mask, kind


def _synthetic_sample(seed: int, split: str, index: int, size: int, anomalous: bool) -> tuple[np.ndarray, np.ndarray, str]:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    img = _normal_texture(rng, size)
    if anomalous:
        img, mask, kind = _add_defect(rng, img)
    else:
        mask, kind = np.zeros((size, size), dtype=bool), "good"
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mask, kind


class SyntheticDefects(Dataset):
    """Textured images generated on the fly from a seed, with exactly known defect masks.

    Normal images: two families of stripes with jittered frequency, angle and phase plus smooth colour
    noise. Anomalous test images (every other index, so about half) add one defect: a pasted
    colour patch, a noise blob or a dark scratch; the mask is exactly the changed pixels' region.
    Items follow the :class:`MVTecDataset` format (``path`` is ``""``).

    Args:
        split: ``"train"`` (normal only) or ``"test"``.
        num_images: number of items.
        input_size: side of the square images (pixels).
        seed: the same seed gives the same images.
    """

    images_are_finite = True
    deterministic_items = True

    def __init__(self, split: str = "train", num_images: int = 32, input_size: int = 128, seed: int = 0) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        if num_images <= 0:
            raise ValueError(f"num_images: expected a positive int, got {num_images!r}")
        self.split, self.num_images, self.input_size, self.seed = split, num_images, input_size, seed

    def __len__(self) -> int:
        return self.num_images

    def fingerprint(self) -> str:
        """A digest of what the items are (split, count, size, seed, generator version)."""
        settings = {"split": self.split, "num_images": self.num_images, "input_size": self.input_size,
                    "seed": self.seed, "generator": SYNTHETIC_VERSION, "pipeline": PIPELINE_VERSION}
        return fingerprint_files("SyntheticDefects", settings, [])

    def is_anomalous(self, index: int) -> bool:
        return self.split == "test" and index % 2 == 1

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """``(uint8 [S, S, 3] image, bool [S, S] mask, defect name)`` for ``index``."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        return _synthetic_sample(self.seed, self.split, index, self.input_size, self.is_anomalous(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        img, mask, kind = self.raw(index)
        return {
            "image": normalize(_to_tensor(img)),
            "mask": torch.from_numpy(mask),
            "label": int(kind != "good"),
            "path": "",
            "defect": kind,
        }


_FILE_FORMATS = ("png", "bmp")


def write_synthetic_dataset(
    root: str | os.PathLike,
    category: str = "synthetic",
    *,
    num_train: int = 32,
    num_test: int = 24,
    input_size: int = 128,
    seed: int = 0,
    layout: str = "mvtec",
    image_format: str = "png",
    mask_format: str = "png",
    file_size: tuple[int, int] | None = None,
) -> Path:
    """Write :class:`SyntheticDefects` images to ``root/category`` in the MVTec AD or the BTAD layout.

    ``layout="mvtec"``: ``train/good``, ``test/good``, ``test/<defect kind>`` and
    ``ground_truth/<defect kind>/<name>_mask.<mask_format>``. ``layout="btad"``: ``train/ok``,
    ``test/ok``, every defect in ``test/ko`` and ``ground_truth/ko/<name>.<mask_format>``, as BTAD
    ships (images .bmp or .png by product; masks .png, product 03's .bmp).

    Args:
        input_size: side of the generated square images (pixels).
        layout: ``"mvtec"`` or ``"btad"``.
        image_format, mask_format: ``"png"`` or ``"bmp"``.
        file_size: ``(height, width)`` of the written files, e.g. a non-square ``(60, 80)`` like BTAD's
            800x600 product 03: the generated images are resized to it (LANCZOS, masks NEAREST).
            Default: ``input_size`` square, the generated pixels as they are.

    Returns:
        The category folder.
    """
    if layout not in ("mvtec", "btad"):
        raise ValueError(f"layout: expected 'mvtec' or 'btad', got {layout!r}")
    for name, value in (("image_format", image_format), ("mask_format", mask_format)):
        if value not in _FILE_FORMATS:
            raise ValueError(f"{name}: expected one of {', '.join(_FILE_FORMATS)}, got {value!r}")
    if file_size is not None:
        file_size = (int(file_size[0]), int(file_size[1]))
        if min(file_size) < 1:
            raise ValueError(f"file_size: expected a positive (height, width), got {file_size!r}")
    normal, mask_suffix = ("good", "_mask") if layout == "mvtec" else ("ok", "")

    def save(array: np.ndarray, path: Path, resample: int) -> None:
        img = Image.fromarray(array)
        if file_size is not None and img.size != (file_size[1], file_size[0]):
            img = img.resize((file_size[1], file_size[0]), resample)
        img.save(path)

    base = Path(root) / category
    train = SyntheticDefects("train", num_train, input_size, seed)
    test = SyntheticDefects("test", num_test, input_size, seed)
    (base / "train" / normal).mkdir(parents=True, exist_ok=True)
    for i in range(len(train)):
        img, _, _ = train.raw(i)
        save(img, base / "train" / normal / f"{i:03d}.{image_format}", Image.LANCZOS)
    for i in range(len(test)):
        img, mask, kind = test.raw(i)
        folder_name = normal if kind == "good" else (kind if layout == "mvtec" else "ko")
        folder = base / "test" / folder_name
        folder.mkdir(parents=True, exist_ok=True)
        save(img, folder / f"{i:03d}.{image_format}", Image.LANCZOS)
        if kind != "good":
            gt = base / "ground_truth" / folder_name
            gt.mkdir(parents=True, exist_ok=True)
            save(mask.astype(np.uint8) * 255, gt / f"{i:03d}{mask_suffix}.{mask_format}", Image.NEAREST)
    return base
