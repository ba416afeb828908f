"""Datasets of image folders: the MVTec AD layout (also VisA "1cls" and any folder that follows it),
the BTAD layout (normal images in ``ok/``, anomalous ones in ``ko/``) and plain folders of images for
prediction. The MVTec LOCO AD layout (a folder of masks per image) is read by :mod:`.loco`.

Every item is a dict:

- ``image``: float32 ``[3, H, W]``, resized to ``input_size`` (PIL LANCZOS) and ImageNet-normalised;
  grey images replicated to three channels; 8/16-bit, palette, alpha and float files read as
  :mod:`.images` says.
- ``mask``: bool ``[H, W]``, resized with NEAREST (binarised as :func:`.images.load_mask` says); all
  ``False`` for normal images.
- ``label``: int, 0 normal, 1 anomalous.
- ``path``: str, the image file; ``defect``: str, the image's folder name (``good`` / ``ok`` for
  normal images).

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

__all__ = ["LAYOUTS", "ImageFolderDataset", "MVTecDataset", "detect_layout", "list_images"]

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
# MVTec AD and BTAD layouts
# ----------------------------------------------------------------------------------------------

LAYOUTS = {"mvtec": "good", "btad": "ok"}
"""The folder layouts :class:`MVTecDataset` reads, each with the name of its normal-image folder
(under ``train/`` and ``test/``); every other folder under ``test/`` holds anomalous images whose
masks are in ``ground_truth/<that folder>/``."""

_LAYOUT_NAMES = {"mvtec": "MVTec AD", "btad": "BTAD"}
_LAYOUT_SHAPES = {
    "mvtec": "train/good/, test/good/, test/<defect>/, ground_truth/<defect>/",
    "btad": "train/ok/, test/ok/, test/ko/, ground_truth/ko/",
}
_SPLITS = ("train", "test")


def _expected_layouts() -> str:
    return "; ".join(f"the {_LAYOUT_NAMES[k]} layout {_LAYOUT_SHAPES[k]}" for k in LAYOUTS)


def detect_layout(folder: str | os.PathLike) -> str | None:
    """The layout of a category folder: ``"loco"`` (MVTec LOCO AD) when it holds
    ``defects_config.json`` or a ``logical_anomalies/`` or ``structural_anomalies/`` folder
    (:func:`.loco.is_loco_folder`); otherwise from its normal-image folders: ``"mvtec"`` when
    ``train/good`` or ``test/good`` exists, ``"btad"`` when ``train/ok`` or ``test/ok`` does, ``None``
    when neither does.

    Raises:
        ValueError: the folder holds both (``good/`` and ``ok/``): the layout must be given.
    """
    from .loco import is_loco_folder

    folder = Path(folder)
    if is_loco_folder(folder):
        return "loco"
    found = [k for k, normal in LAYOUTS.items() if any((folder / split / normal).is_dir() for split in _SPLITS)]
    if len(found) > 1:
        names = " and ".join(f"{LAYOUTS[k]}/ ({_LAYOUT_NAMES[k]})" for k in found)
        raise ValueError(
            f"cannot tell the layout of {folder}: it holds both {names} normal-image folders under train/ or test/; "
            f"pass layout={found[0]!r} or layout={found[1]!r} (CLI: --layout), or remove the folder that does not belong"
        )
    return found[0] if found else None


def _mask_index(gt_dir: Path) -> dict[str, list[Path]]:
    """The image files in ``gt_dir`` by lower-cased stem (one directory listing for all masks)."""
    index: dict[str, list[Path]] = {}
    for p in gt_dir.iterdir():
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            index.setdefault(p.stem.lower(), []).append(p)
    return index


_MASK_EXTENSION_ORDER = {ext: i for i, ext in enumerate((".png",) + tuple(e for e in IMAGE_EXTENSIONS if e != ".png"))}


def _find_mask(gt_dir: Path, image: Path, index: dict[str, list[Path]] | None = None) -> Path:
    """The mask of the anomalous ``image`` in ``gt_dir``: ``<stem>_mask.<ext>`` (MVTec AD) or
    ``<stem>.<ext>`` (BTAD, VisA), any image extension in any letter case, ``.png`` first.

    Raises:
        FileNotFoundError: no such file (naming the image and where the mask was looked for).
    """
    index = _mask_index(gt_dir) if index is None else index
    stem = image.stem
    for name in (stem + "_mask", stem):
        candidates = index.get(name.lower(), [])
        exact = [p for p in candidates if p.stem == name] or candidates
        if exact:
            return min(exact, key=lambda p: (_MASK_EXTENSION_ORDER[p.suffix.lower()], p.name))
    loco = (gt_dir / stem).is_dir()
    raise FileNotFoundError(
        f"missing mask for defect image {image}: looked for {gt_dir / (stem + '_mask.png')} or "
        f"{gt_dir / (stem + '.png')} (or another image extension: {', '.join(IMAGE_EXTENSIONS)}); "
        + (f"{gt_dir / stem} is a folder of masks, as in MVTec LOCO AD: read it with layout='loco'" if loco
           else "add the mask, or move the image out of the test split")
    )


def category_folder(root: str | os.PathLike, category: str | None) -> tuple[Path, Path]:
    """``(root, root / category)`` (``category=None``: ``(root, root)``), both checked to be folders.

    Raises:
        FileNotFoundError: a missing root or category folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    base = root / category if category else root
    if not base.is_dir():
        raise FileNotFoundError(f"category folder not found: {base} (check --data and --category)")
    return root, base


def _category_hint(base: Path) -> str:
    """A hint to pass ``--category`` when ``base`` is a dataset root (its folders hold train/ or test/), else ``""``."""
    categories = sorted(p.name for p in base.iterdir() if p.is_dir() and any((p / split).is_dir() for split in _SPLITS))
    if not categories:
        return ""
    shown = ", ".join(categories[:10]) + (", ..." if len(categories) > 10 else "")
    return f"; {base} looks like a dataset root holding the categories {shown}: pass --category (category=) one of them"


class MVTecDataset(Dataset):
    """A category of a dataset in the MVTec AD or the BTAD folder layout.

    Layouts (of ``root/category`` or, with ``category=None``, ``root`` itself)::

        MVTec AD                                  BTAD
        train/good/*.png                          train/ok/*.bmp|*.png
        test/good/*.png     normal test images    test/ok/*
        test/<defect>/*.png anomalous images      test/ko/*
        ground_truth/<defect>/<name>_mask.png     ground_truth/ko/<name>.png|.bmp

    A mask is ``<name>_mask`` or ``<name>`` with any image extension (VisA "1cls" and BTAD name masks
    as their images; BTAD's product 03 stores them as .bmp). Normal images (``good`` / ``ok``) have
    label 0 and an all-false mask; images in every other ``test/`` folder label 1 and need a mask
    (a missing one raises). Images of any size and aspect (BTAD 03 is 800x600) are resized to
    ``input_size`` as they are, without cropping.

    Works for MVTec AD, BTAD (``BTech_Dataset_transformed/01`` ...), VisA in the "1cls" layout and any
    folder that follows one of the layouts.

    Args:
        root: dataset root (e.g. ``data/MVTec`` or ``data/BTech_Dataset_transformed``).
        category: class folder under ``root`` (e.g. ``"bottle"``, ``"01"``), or ``None``.
        split: ``"train"`` or ``"test"``.
        input_size: size the model sees: an int S (square) or ``(H, W)`` (pixels).
        layout: ``"mvtec"``, ``"btad"``, ``"loco"`` or ``"auto"`` (the default): found from the
            normal-image folders (``good/`` or ``ok/`` under ``train/`` or ``test/``, :func:`detect_layout`); a test
            split with neither reads every folder as anomalous, as MVTec AD does. An MVTec LOCO AD
            folder (``"loco"``, given or found) gives a :class:`~.loco.MVTecLocoDataset`, whose test
            items add each defect's own mask (and which also reads ``split="validation"``).

    Raises:
        FileNotFoundError: a missing root, category, split, normal-image or ground-truth folder, or mask.
        ValueError: an empty folder, a bad argument, or a folder with both ``good/`` and ``ok/``.
    """

    images_are_finite = True
    deterministic_items = True

    def __new__(cls, root: str | os.PathLike | None = None, category: str | None = None, *args: Any, **kwargs: Any) -> "MVTecDataset":
        # An MVTec LOCO AD folder (layout="loco", or found by "auto") gives the LOCO reader, a subclass.
        if cls is MVTecDataset and root is not None:
            layout = kwargs.get("layout", args[2] if len(args) > 2 else "auto")
            base = Path(root) / category if category else Path(root)
            if layout == "loco" or (layout == "auto" and base.is_dir() and detect_layout(base) == "loco"):
                from .loco import MVTecLocoDataset

                cls = MVTecLocoDataset
        return super().__new__(cls)

    def __init__(
        self,
        root: str | os.PathLike,
        category: str | None = None,
        split: str = "train",
        input_size: int | tuple[int, int] = 512,
        layout: str = "auto",
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        if layout != "auto" and layout not in LAYOUTS:
            raise ValueError(
                f"layout: expected 'auto', {', '.join(repr(k) for k in LAYOUTS)}, got {layout!r} "
                "('loco' reads MVTec LOCO AD, through MVTecDataset itself or MVTecLocoDataset)"
            )
        self.size_hw = image_size_hw(input_size)
        root, base = category_folder(root, category)
        split_dir = base / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"split folder not found: {split_dir} (expected {_expected_layouts()}){_category_hint(base)}"
            )
        if layout == "auto":
            layout = detect_layout(base)
            if layout == "loco":
                raise ValueError(f"{base} is an MVTec LOCO AD folder: read it with MVTecLocoDataset (or MVTecDataset(..., layout='loco'))")
            if layout is None:
                if split == "train":
                    raise FileNotFoundError(
                        f"no train/good or train/ok folder under {base}: expected {_expected_layouts()}"
                        f"{_category_hint(base)}"
                    )
                layout = "mvtec"
        normal = LAYOUTS[layout]
        self.root, self.category, self.split, self.input_size = root, category, split, self.size_hw
        self.base, self.layout = base, layout
        self.samples: list[tuple[Path, Path | None, int, str]] = []
        if split == "train":
            if not (split_dir / normal).is_dir():
                raise FileNotFoundError(
                    f"no train/{normal} folder under {base}: the {_LAYOUT_NAMES[layout]} layout keeps the normal training "
                    f"images there ({_LAYOUT_SHAPES[layout]})"
                )
            for path in list_images(split_dir / normal):
                self.samples.append((path, None, 0, normal))
        else:
            folders = sorted(p for p in split_dir.iterdir() if p.is_dir())
            if not folders:
                raise ValueError(
                    f"empty folder: {split_dir} holds no image folder (expected {normal}/ for normal images and a folder "
                    f"of anomalous ones, as in the {_LAYOUT_NAMES[layout]} layout {_LAYOUT_SHAPES[layout]})"
                )
            for folder in folders:
                defect = folder.name
                images = list_images(folder)
                if defect == normal:
                    self.samples.extend((p, None, 0, defect) for p in images)
                    continue
                gt_dir = base / "ground_truth" / defect
                if not gt_dir.is_dir():
                    raise FileNotFoundError(
                        f"ground-truth folder not found: {gt_dir} (needed for the anomalous images in {folder}; "
                        f"normal images belong in {split_dir / normal})"
                    )
                index = _mask_index(gt_dir)
                self.samples.extend((p, _find_mask(gt_dir, p, index), 1, defect) for p in images)

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
        return (
            f"MVTecDataset({str(self.base)!r}, split={self.split!r}, input_size={self.input_size}, "
            f"layout={self.layout!r}, n={len(self)})"
        )


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
