"""Datasets: the MVTec AD folder layout (also BTAD, VisA "1cls") and a synthetic defect dataset.

Every item is a dict:

- ``image``: float32 ``[3, S, S]``, resized to ``input_size`` S (PIL LANCZOS) and ImageNet-normalised;
  grayscale images are replicated to three channels.
- ``mask``: bool ``[S, S]``, resized with NEAREST and binarised (any non-zero pixel is anomalous);
  all ``False`` for normal images.
- ``label``: int, 0 normal, 1 anomalous.
- ``path``: str, the image file (``""`` for generated items); ``defect``: str, the defect folder name.

Bad files and folders raise errors that name them: ``FileNotFoundError`` for missing folders and
masks, ``ValueError`` for empty folders, unreadable or truncated images and mask/image size
mismatches.

Non-finite images: decoded files are 8-bit, so they are always finite: these datasets say so
(``images_are_finite``) and the engine does not check them. Images from elsewhere (a custom
Dataset, tensors) are checked by the engine once per batch with :func:`check_finite_images`, on the
CPU before the batch moves to the device (no device sync); the error names the files when the batch
carries their paths. A model's forward pass checks only when asked (``model.check_finite = True``
or ``MSFLOW_FAST_CHECK_FINITE=1``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .._sizes import image_size_hw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "MVTecDataset",
    "SyntheticDefects",
    "check_finite_images",
    "decoded_finite",
    "denormalize",
    "image_size_hw",
    "list_images",
    "load_image",
    "load_mask",
    "normalize",
    "write_synthetic_dataset",
]


# ----------------------------------------------------------------------------------------------
# file helpers
# ----------------------------------------------------------------------------------------------


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name.

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a directory.
        ValueError: ``folder`` holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder} (expected a directory of images)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(
            f"empty folder: {folder} holds no image file (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _open_verified(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err} (truncated or corrupt file?)") from err


def check_finite_images(images: torch.Tensor, paths: Any = None, where: str = "") -> torch.Tensor:
    """Raise ``ValueError`` if a CPU image batch ``[B, ...]`` holds NaN or infinity; returns it unchanged.

    The engine calls this on every batch before moving it to the device: one pass over host memory,
    no device sync. Batches that already live on an accelerator are not checked here (that would
    cost a sync per batch); there a model checks when ``model.check_finite`` is set or
    ``MSFLOW_FAST_CHECK_FINITE=1``, and ``fit`` stops on the resulting non-finite loss.

    Args:
        paths: the batch's file paths (a list of ``str``, ``""`` for none), named in the error.
        where: where the batch came from, e.g. ``"training batch 3 of epoch 1"``.
    """
    if images.device.type != "cpu" or not images.is_floating_point() or images.numel() == 0:
        return images
    # Fast path: one reduction. A NaN/inf makes the sum non-finite; a finite batch whose sum
    # overflows falls through to the exact per-element test below.
    if bool(torch.isfinite(images.sum(dtype=torch.float64 if images.dtype == torch.float64 else torch.float32))):
        return images
    bad = ~torch.isfinite(images.reshape(images.shape[0], -1) if images.dim() > 0 else images.reshape(1, 1))
    per_image = bad.any(1).nonzero().flatten().tolist()
    if not per_image:
        return images
    names = []
    for i in per_image:
        path = paths[i] if isinstance(paths, (list, tuple)) and i < len(paths) else ""
        names.append(f"{path} (image {i} of the batch)" if path else f"image {i} of the batch")
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise ValueError(
        f"non-finite input image{'s' if len(names) > 1 else ''}: {shown}"
        f"{' in ' + where if where else ''} contain{'' if len(names) > 1 else 's'} NaN or infinite values "
        f"({int(bad.sum())} of {images.numel()} values); check the data pipeline (decoding, normalisation)"
    )


def decoded_finite(data: Any) -> bool:
    """Whether ``data`` (a Dataset, or a DataLoader over one) yields images decoded from files or
    generated in 8 bits, which are always finite, so the engine skips its NaN/inf pass over them.

    A dataset says so with a true ``images_are_finite`` class attribute (this module's datasets do).
    """
    dataset = data.dataset if isinstance(data, DataLoader) else data
    return bool(getattr(dataset, "images_are_finite", False))


def normalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of ``[3, H, W]`` (or ``[B, 3, H, W]``) values in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, clipped to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0.0, 1.0)


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)


def load_image(path: str | os.PathLike, input_size: int | tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read an image as a normalised float32 ``[3, H, W]`` tensor (LANCZOS resize to ``input_size``).

    Returns:
        The tensor and the original ``(width, height)``.
    """
    path = Path(path)
    img = _open_verified(path, "RGB")
    size = img.size
    if input_size is not None:
        h, w = image_size_hw(input_size)
        if size != (w, h):
            img = img.resize((w, h), Image.LANCZOS)
    return normalize(_to_tensor(np.asarray(img, dtype=np.uint8))), size


def load_mask(path: str | os.PathLike, input_size: int | tuple[int, int] | None, expected_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a ground-truth mask as bool ``[H, W]`` (NEAREST resize, any non-zero pixel = anomalous).

    ``expected_size`` is the image's original ``(width, height)``; a different mask size raises.
    """
    path = Path(path)
    img = _open_verified(path, "L")
    if expected_size is not None and img.size != expected_size:
        raise ValueError(
            f"mask size mismatch: {path} is {img.size[0]}x{img.size[1]} but its image is "
            f"{expected_size[0]}x{expected_size[1]} (width x height); fix or regenerate the mask"
        )
    if input_size is not None:
        h, w = image_size_hw(input_size)
        if img.size != (w, h):
            img = img.resize((w, h), Image.NEAREST)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8) > 0)


# ----------------------------------------------------------------------------------------------
# MVTec layout
# ----------------------------------------------------------------------------------------------


def _find_mask(gt_dir: Path, image: Path) -> Path:
    stem = image.stem
    for name in (stem + "_mask", stem):
        for ext in (".png",) + tuple(e for e in IMAGE_EXTENSIONS if e != ".png"):
            candidate = gt_dir / (name + ext)
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"missing mask for defect image {image}: looked for {gt_dir / (stem + '_mask.png')} "
        f"or {gt_dir / (stem + '.png')}"
    )


class MVTecDataset(Dataset):
    """A category of a dataset in the MVTec AD folder layout.

    Layout (``root/category`` or, with ``category=None``, ``root`` itself)::

        train/good/*.png
        test/good/*.png                    normal test images (no masks)
        test/<defect>/*.png                anomalous test images
        ground_truth/<defect>/<name>_mask.png   (or <name>.png, as in VisA "1cls" and BTAD)

    Works for MVTec AD, BTAD, VisA in the "1cls" layout and any folder that follows it.

    Args:
        root: dataset root (e.g. ``data/MVTec``).
        category: class folder under ``root`` (e.g. ``"bottle"``), or ``None``.
        split: ``"train"`` or ``"test"``.
        input_size: size the model sees: an int S (square) or ``(H, W)`` (pixels).
    """

    images_are_finite = True

    def __init__(self, root: str | os.PathLike, category: str | None = None, split: str = "train", input_size: int | tuple[int, int] = 512) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        self.size_hw = image_size_hw(input_size)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {root}")
        base = root / category if category else root
        if not base.is_dir():
            raise FileNotFoundError(f"category folder not found: {base} (check --data and --category)")
        split_dir = base / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"split folder not found: {split_dir} (expected the MVTec AD layout {split}/good, ...)")
        self.root, self.category, self.split, self.input_size = root, category, split, self.size_hw
        self.base = base
        self.samples: list[tuple[Path, Path | None, int, str]] = []
        if split == "train":
            for path in list_images(split_dir / "good"):
                self.samples.append((path, None, 0, "good"))
        else:
            defects = sorted(p for p in split_dir.iterdir() if p.is_dir())
            if not defects:
                raise ValueError(f"empty folder: {split_dir} holds no defect-type folder (expected good/ and <defect>/)")
            for defect_dir in defects:
                defect = defect_dir.name
                images = list_images(defect_dir)
                if defect == "good":
                    self.samples.extend((p, None, 0, defect) for p in images)
                    continue
                gt_dir = base / "ground_truth" / defect
                if not gt_dir.is_dir():
                    raise FileNotFoundError(f"ground-truth folder not found: {gt_dir} (needed for the images in {defect_dir})")
                self.samples.extend((p, _find_mask(gt_dir, p), 1, defect) for p in images)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s[2] for s in self.samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, mask_path, label, defect = self.samples[index]
        image, size = load_image(path, self.input_size)
        if mask_path is None:
            mask = torch.zeros(self.size_hw, dtype=torch.bool)
        else:
            mask = load_mask(mask_path, self.input_size, expected_size=size)
        return {"image": image, "mask": mask, "label": label, "path": str(path), "defect": defect}

    def __repr__(self) -> str:
        return f"MVTecDataset({str(self.base)!r}, split={self.split!r}, input_size={self.input_size}, n={len(self)})"


class ImageFolderDataset(Dataset):
    """Unlabelled images (a folder, or a list of files) for prediction; items have ``image`` and ``path``."""

    images_are_finite = True

    def __init__(self, source: str | os.PathLike | list, input_size: int | tuple[int, int] = 512) -> None:
        input_size = image_size_hw(input_size)
        if isinstance(source, (list, tuple)):
            files = [Path(p) for p in source]
            if not files:
                raise ValueError("source: expected at least one image file, got an empty list")
            for p in files:
                if not p.is_file():
                    raise FileNotFoundError(f"image file not found: {p}")
        else:
            source = Path(source)
            files = [source] if source.is_file() else list_images(source)
        self.files, self.input_size = files, input_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, _ = load_image(self.files[index], self.input_size)
        return {"image": image, "path": str(self.files[index])}


# ----------------------------------------------------------------------------------------------
# synthetic defects
# ----------------------------------------------------------------------------------------------


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

    def __init__(self, split: str = "train", num_images: int = 32, input_size: int = 128, seed: int = 0) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        if num_images <= 0:
            raise ValueError(f"num_images: expected a positive int, got {num_images!r}")
        self.split, self.num_images, self.input_size, self.seed = split, num_images, input_size, seed

    def __len__(self) -> int:
        return self.num_images

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


def write_synthetic_dataset(
    root: str | os.PathLike,
    category: str = "synthetic",
    *,
    num_train: int = 32,
    num_test: int = 24,
    input_size: int = 128,
    seed: int = 0,
) -> Path:
    """Write :class:`SyntheticDefects` images to ``root/category`` in the MVTec AD layout.

    Returns:
        The category folder.
    """
    base = Path(root) / category
    train = SyntheticDefects("train", num_train, input_size, seed)
    test = SyntheticDefects("test", num_test, input_size, seed)
    (base / "train" / "good").mkdir(parents=True, exist_ok=True)
    for i in range(len(train)):
        img, _, _ = train.raw(i)
        Image.fromarray(img).save(base / "train" / "good" / f"{i:03d}.png")
    for i in range(len(test)):
        img, mask, kind = test.raw(i)
        folder = base / "test" / kind
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
        if kind != "good":
            gt = base / "ground_truth" / kind
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(gt / f"{i:03d}_mask.png")
    return base
