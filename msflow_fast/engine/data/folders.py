"""Datasets of image folders: the MVTec AD layout (also BTAD, VisA "1cls", any folder that follows
it) and plain folders of images for prediction.

Every item is a dict:

- ``image``: float32 ``[3, H, W]``, resized to ``input_size`` (PIL LANCZOS) and ImageNet-normalised;
  grey images replicated to three channels; 8/16-bit, palette, alpha and float files read as
  :mod:`.images` says.
- ``mask``: bool ``[H, W]``, resized with NEAREST (binarised as :func:`.images.load_mask` says); all
  ``False`` for normal images.
- ``label``: int, 0 normal, 1 anomalous.
- ``path``: str, the image file; ``defect``: str, the defect folder name.

Bad files and folders raise errors that name them: ``FileNotFoundError`` for missing folders and
masks, ``ValueError`` for empty folders, unreadable or truncated images and mask/image size
mismatches. :meth:`MVTecDataset.check_files` finds them all up front (headers, checksums, mask
sizes) without decoding the images, so a bad test image is reported before training, not after.

Decoded files are always finite (``images_are_finite``): the engine makes no NaN pass over them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..._sizes import image_size_hw
from .checks import fingerprint_files
from .images import IMAGE_EXTENSIONS, PIPELINE_VERSION, check_image_file, load_image, load_mask

__all__ = ["ImageFolderDataset", "MVTecDataset", "list_images"]

_SHOWN = 10


def _report(problems: list[str], what: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:_SHOWN]) + (f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else "")
        raise ValueError(f"{len(problems)} bad file(s) in {what}:\n  {shown}")


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
    deterministic_items = True

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

    def check_files(self) -> None:
        """Check every image and mask without decoding them: readable headers, intact files (PNG
        checksums), each mask the size of its image.

        Raises:
            ValueError: listing every bad file (up to 10 shown) with what is wrong.
        """
        problems = []
        for path, mask_path, _, _ in self.samples:
            try:
                size = check_image_file(path)
                if mask_path is not None:
                    mask_size = check_image_file(mask_path)
                    if mask_size != size:
                        problems.append(
                            f"mask size mismatch: {mask_path} is {mask_size[0]}x{mask_size[1]} but its image is "
                            f"{size[0]}x{size[1]} (width x height)"
                        )
            except (OSError, ValueError) as err:
                problems.append(str(err))
        _report(problems, f"{self.base / self.split}")

    def fingerprint(self) -> str:
        """A digest of what the items are: split, input size, the image pipeline's version and
        every image and mask file (path, size, modification time). Keys the feature cache."""
        files = [f for path, mask_path, _, _ in self.samples for f in (path, mask_path)]
        settings = {"split": self.split, "input_size": list(self.size_hw), "pipeline": PIPELINE_VERSION}
        return fingerprint_files("MVTecDataset", settings, files)

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
    deterministic_items = True

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

    def fingerprint(self) -> str:
        """A digest of the items (input size, pipeline version, each file's path, size and time)."""
        settings = {"input_size": list(image_size_hw(self.input_size)), "pipeline": PIPELINE_VERSION}
        return fingerprint_files("ImageFolderDataset", settings, self.files)

    def unreadable(self) -> list[tuple[Path, str]]:
        """``(file, reason)`` for every file that does not open (header or checksum), without decoding."""
        bad = []
        for path in self.files:
            try:
                check_image_file(path)
            except (OSError, ValueError) as err:
                bad.append((path, str(err)))
        return bad

    def without(self, files: list[Path]) -> "ImageFolderDataset":
        """The same dataset less ``files``."""
        keep = [f for f in self.files if f not in set(files)]
        if not keep:
            raise ValueError("none of the images could be read")
        return ImageFolderDataset(keep, input_size=self.input_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, _ = load_image(self.files[index], self.input_size)
        return {"image": image, "path": str(self.files[index])}
