"""The MVTec LOCO AD layout: a folder of masks per defect image, each mask one defect region, and
``defects_config.json`` giving each defect type's pixel value and saturation threshold.

Layout of a category (``<root>/<category>``)::

    train/good/*.png                  normal training images
    validation/good/*.png             normal validation images (split="validation")
    test/good/*.png                   anomaly-free test images
    test/logical_anomalies/*.png      defect_kind "logical"
    test/structural_anomalies/*.png   defect_kind "structural"
    ground_truth/<kind folder>/<image stem>/000.png, 001.png, ...   one mask per defect region
    defects_config.json               [{"defect_name", "pixel_value", "saturation_threshold",
                                        "relative_saturation"}, ...]

A mask's non-zero pixels are its region; their value (one per file) names the defect type in
``defects_config.json``. Test items add to the :class:`~.folders.MVTecDataset` item (whose ``mask``
is the union of the regions, for pixel AUROC and AUPRO):

- ``defect_kind``: str, ``"logical"``, ``"structural"`` or ``"good"``.
- ``defect_masks``: bool ``[K, H, W]``, one region per row, resized with NEAREST like ``mask``; K is
  the largest mask count of the split's images (rows past an image's own count are all False).
- ``defect_values``: int64 ``[K]``, each region's pixel value (-1: padding).
- ``defect_saturation``: float64 ``[K]``, each region's saturation area in pixels at the input size
  (NaN: padding): the fraction f of the region that saturates it at the file's own resolution
  (``min(threshold, area) / area`` absolute, ``threshold`` relative) times its area at the input size,
  so resizing keeps the share of a region a map must cover. A region too small to keep a pixel at
  the input size has saturation 0; the evaluation leaves it out with a warning.

The engine's training has no validation split: ``train`` and ``eval`` ignore ``validation/good``;
``MVTecLocoDataset(..., split="validation")`` reads it (normal items, as the train split).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..._sizes import image_size_hw
from .checks import fingerprint_files
from .folders import MVTecDataset, _category_hint, _report, category_folder, list_images
from .images import IMAGE_EXTENSIONS, PIPELINE_VERSION, check_image_file, load_image

__all__ = ["CONFIG_NAME", "LOCO_KINDS", "LOCO_SPLITS", "DefectType", "MVTecLocoDataset", "is_loco_folder", "read_defect_mask", "read_defects_config"]

CONFIG_NAME = "defects_config.json"
LOCO_KINDS = {"logical_anomalies": "logical", "structural_anomalies": "structural"}
"""The anomalous ``test/`` folders of MVTec LOCO AD and the ``defect_kind`` of their images."""
LOCO_SPLITS = ("train", "validation", "test")
_SHAPE = (
    "train/good/, validation/good/, test/{good,logical_anomalies,structural_anomalies}/, "
    "ground_truth/<kind>/<image stem>/000.png ..., defects_config.json"
)


def is_loco_folder(base: str | os.PathLike) -> bool:
    """Whether a category folder is in the MVTec LOCO AD layout: it holds ``defects_config.json``
    or a ``logical_anomalies/`` or ``structural_anomalies/`` folder under ``test/`` or ``ground_truth/``."""
    base = Path(base)
    return (base / CONFIG_NAME).is_file() or any((base / split / kind).is_dir() for split in ("test", "ground_truth") for kind in LOCO_KINDS)


# ---------------------------------------------------------------------------------------------- defects_config.json


@dataclass(frozen=True)
class DefectType:
    """One entry of ``defects_config.json``.

    Attributes:
        name: ``defect_name``.
        pixel_value: the value of the defect's pixels in its masks (1 .. 65535).
        saturation_threshold: pixels (absolute) or a fraction in (0, 1] of the region's area (relative).
        relative_saturation: which of the two ``saturation_threshold`` is.
    """

    name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool

    def saturation_fraction(self, area: int) -> float:
        """The share of a region of ``area`` pixels (at the mask file's resolution) that saturates it."""
        if self.relative_saturation:
            return self.saturation_threshold
        return min(self.saturation_threshold, area) / area


_FIELDS = ("defect_name", "pixel_value", "saturation_threshold", "relative_saturation")


def _entry(path: Path, index: int, entry: Any) -> DefectType:
    """One entry of ``defects_config.json``, checked (errors name the file, the entry and the field)."""
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict):
        raise ValueError(f"malformed {where} is a {type(entry).__name__}, expected an object with {', '.join(_FIELDS)}")
    missing = [k for k in _FIELDS if k not in entry]
    if missing:
        raise ValueError(
            f"malformed {where} ({entry.get('defect_name', '?')!r}) lacks {', '.join(missing)}; each entry needs {', '.join(_FIELDS)}"
        )
    name, value, threshold, relative = entry["defect_name"], entry["pixel_value"], entry["saturation_threshold"], entry["relative_saturation"]
    where = f"{where} ({name!r})"
    if not isinstance(name, str) or not name:
        raise ValueError(f"malformed {where}: defect_name must be a non-empty string, got {name!r}")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"malformed {where}: pixel_value must be an int in 1..65535 (0 is background), got {value!r}")
    if not isinstance(relative, bool):
        raise ValueError(f"malformed {where}: relative_saturation must be true or false, got {relative!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"malformed {where}: saturation_threshold must be a positive number, got {threshold!r}")
    if relative and threshold > 1:
        raise ValueError(f"malformed {where}: a relative saturation_threshold is a fraction of the defect's area in (0, 1], got {threshold!r}")
    return DefectType(name, value, float(threshold), relative)


def read_defects_config(path: str | os.PathLike) -> dict[int, DefectType]:
    """The defect types of ``defects_config.json``, by pixel value.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not a non-empty list of entries, an entry with a missing or bad field,
            or two entries with one pixel value (the message names the file and the entry).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{CONFIG_NAME} not found: {path} (MVTec LOCO AD keeps each defect type's pixel value and saturation threshold there; "
            "copy it from the dataset)"
        )
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed {path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"malformed {path}: not UTF-8 text ({err})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"malformed {path}: expected a non-empty JSON list of defect entries, got {type(entries).__name__}")
    types: dict[int, DefectType] = {}
    for index, entry in enumerate(entries):
        defect = _entry(path, index, entry)
        if defect.pixel_value in types:
            raise ValueError(
                f"malformed {path}: entries {types[defect.pixel_value].name!r} and {defect.name!r} share pixel_value {defect.pixel_value}"
            )
        types[defect.pixel_value] = defect
    return types


# ---------------------------------------------------------------------------------------------- masks


def _mask_values(path: Path) -> np.ndarray:
    """A mask file's stored values ``[H, W]``: 8/16-bit grey and palette indices as they are, other
    modes through their grey conversion."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"):
                return np.asarray(img).astype(np.int64)
            return np.asarray(img.convert("L")).astype(np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file not found: {path}") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise ValueError(f"cannot read mask {path}: {type(err).__name__}: {err} (truncated or corrupt file?)") from err


def read_defect_mask(path: str | os.PathLike, defects: dict[int, DefectType], config: str | os.PathLike = CONFIG_NAME,
                     expected_size: tuple[int, int] | None = None) -> tuple[np.ndarray, DefectType]:
    """One region's mask file: ``(bool [H, W] region, its DefectType)``.

    Args:
        defects: :func:`read_defects_config`'s types; ``config``: that file, named in errors.
        expected_size: the image's ``(width, height)``; a different mask size raises.

    Raises:
        ValueError: a size mismatch, no non-zero pixel, several non-zero values, or a value the
            config does not list (each naming the file).
    """
    path = Path(path)
    values = _mask_values(path)
    if expected_size is not None and (values.shape[1], values.shape[0]) != tuple(expected_size):
        raise ValueError(
            f"mask size mismatch: {path} is {values.shape[1]}x{values.shape[0]} but its image is "
            f"{expected_size[0]}x{expected_size[1]} (width x height); fix or regenerate the mask"
        )
    levels = np.unique(values[values != 0])
    if levels.size == 0:
        raise ValueError(f"empty defect mask: {path} has no non-zero pixel; each mask file is one defect region (remove the file or redraw it)")
    if levels.size > 1:
        raise ValueError(
            f"defect mask {path} holds {levels.size} non-zero values ({', '.join(str(v) for v in levels[:6])}); each mask "
            "file is one defect region of one pixel value (split it into one file per defect)"
        )
    value = int(levels[0])
    if value not in defects:
        raise ValueError(
            f"defect mask {path} has pixel value {value}, which {config} does not list (it lists "
            f"{', '.join(f'{v} ({d.name})' for v, d in sorted(defects.items()))}); add an entry for it or fix the mask"
        )
    return values != 0, defects[value]


def _mask_files(gt_dir: Path, image: Path) -> tuple[Path, ...]:
    """The mask files of a defect image: the image files in ``gt_dir/<image stem>/``, sorted by name."""
    folder = gt_dir / image.stem
    if not folder.is_dir():
        raise FileNotFoundError(
            f"missing mask folder for defect image {image}: expected {folder}/ holding one mask per defect region "
            "(000.png, 001.png, ...); add it, or move the image out of the test split"
        )
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"empty mask folder: {folder} holds no mask for defect image {image} (expected 000.png, 001.png, ...)")
    return tuple(files)


def _resized(region: np.ndarray, size_hw: tuple[int, int]) -> torch.Tensor:
    """A bool region resized with NEAREST to ``size_hw`` (as :func:`.images.load_mask` resizes masks)."""
    img = Image.fromarray(region.astype(np.uint8) * 255)
    h, w = size_hw
    if img.size != (w, h):
        img = img.resize((w, h), Image.NEAREST)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8) > 0)


# ---------------------------------------------------------------------------------------------- dataset


class MVTecLocoDataset(MVTecDataset):
    """A category of MVTec LOCO AD (the module docstring gives the layout and the items).

    ``MVTecDataset(..., layout="loco")``, or ``layout="auto"`` on a folder :func:`is_loco_folder`
    recognises, gives this class.

    Args:
        root, category, input_size: as :class:`~.folders.MVTecDataset`.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        layout: ``"loco"`` or ``"auto"``.

    Raises:
        FileNotFoundError: a missing root, category, split folder, ``good/`` folder, ground-truth
            folder, mask folder or ``defects_config.json``.
        ValueError: an empty folder, an unknown ``test/`` folder, a malformed ``defects_config.json``.
    """

    has_defect_regions = False

    def __init__(
        self,
        root: str | os.PathLike,
        category: str | None = None,
        split: str = "train",
        input_size: int | tuple[int, int] = 512,
        layout: str = "loco",
    ) -> None:
        if split not in LOCO_SPLITS:
            raise ValueError(f"split: expected one of {', '.join(repr(s) for s in LOCO_SPLITS)}, got {split!r}")
        if layout not in ("auto", "loco"):
            raise ValueError(f"layout: MVTecLocoDataset reads the 'loco' layout (or 'auto'), got {layout!r}; use MVTecDataset for others")
        self.size_hw = image_size_hw(input_size)
        root, base = category_folder(root, category)
        split_dir = base / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"split folder not found: {split_dir} (expected the MVTec LOCO AD layout {_SHAPE}){_category_hint(base)}")
        self.root, self.category, self.split, self.input_size = root, category, split, self.size_hw
        self.base, self.layout = base, "loco"
        self.config_path = base / CONFIG_NAME
        self.defects: dict[int, DefectType] = {}
        self.samples: list[tuple[Path, tuple[Path, ...] | None, int, str]] = []
        if split != "test":
            if not (split_dir / "good").is_dir():
                raise FileNotFoundError(f"no {split}/good folder under {base}: MVTec LOCO AD keeps the normal {split} images there ({_SHAPE})")
            self.samples = [(p, None, 0, "good") for p in list_images(split_dir / "good")]
            self.max_regions = 0
            return
        self.defects = read_defects_config(self.config_path)
        self.has_defect_regions = True
        folders = sorted(p for p in split_dir.iterdir() if p.is_dir())
        if not folders:
            raise ValueError(f"empty folder: {split_dir} holds no image folder (expected good/, logical_anomalies/, structural_anomalies/)")
        for folder in folders:
            if folder.name == "good":
                self.samples.extend((p, None, 0, "good") for p in list_images(folder))
                continue
            if folder.name not in LOCO_KINDS:
                raise ValueError(
                    f"unexpected folder {folder} in an MVTec LOCO AD test split: expected good/, logical_anomalies/ and "
                    "structural_anomalies/ (move it out, or read an MVTec AD folder with layout='mvtec')"
                )
            gt_dir = base / "ground_truth" / folder.name
            if not gt_dir.is_dir():
                raise FileNotFoundError(
                    f"ground-truth folder not found: {gt_dir} (needed for the anomalous images in {folder}: one folder of masks per image)"
                )
            self.samples.extend((p, _mask_files(gt_dir, p), 1, folder.name) for p in list_images(folder))
        self.max_regions = max((len(s[1]) for s in self.samples if s[1] is not None), default=0)

    def kind(self, index: int) -> str:
        """The ``defect_kind`` of item ``index``: ``"logical"``, ``"structural"`` or ``"good"``."""
        return LOCO_KINDS.get(self.samples[index][3], "good")

    def check_files(self) -> None:
        """Check every image and mask: readable headers, intact files, each mask the size of its image
        and (decoding the masks, which are small) of one pixel value that ``defects_config.json`` lists.

        Raises:
            ValueError: listing every bad file (up to 10 shown) with what is wrong.
        """
        problems = []
        for path, mask_paths, _, _ in self.samples:
            try:
                size = check_image_file(path)
            except (OSError, ValueError) as err:
                problems.append(str(err))
                continue
            for mask_path in mask_paths or ():
                try:
                    check_image_file(mask_path)
                    read_defect_mask(mask_path, self.defects, self.config_path, expected_size=size)
                except (OSError, ValueError) as err:
                    problems.append(str(err))
        _report(problems, f"{self.base / self.split}")

    def fingerprint(self) -> str:
        """A digest of what the items are: split, input size, pipeline version, every image and mask
        file and ``defects_config.json`` (path, size, modification time)."""
        files = [f for path, masks, _, _ in self.samples for f in (path, *(masks or ()))]
        if self.split == "test":
            files.append(self.config_path)
        settings = {"split": self.split, "input_size": list(self.size_hw), "pipeline": PIPELINE_VERSION, "layout": "loco"}
        return fingerprint_files("MVTecLocoDataset", settings, files)

    def _regions(self, mask_paths: tuple[Path, ...] | None, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(bool [K, H, W] regions, int64 [K] pixel values, float64 [K] saturation pixels)``, padded to ``max_regions``."""
        k = self.max_regions
        regions = torch.zeros((k, *self.size_hw), dtype=torch.bool)
        values = torch.full((k,), -1, dtype=torch.int64)
        saturation = torch.full((k,), float("nan"), dtype=torch.float64)
        for j, mask_path in enumerate(mask_paths or ()):
            region, defect = read_defect_mask(mask_path, self.defects, self.config_path, expected_size=size)
            regions[j] = _resized(region, self.size_hw)
            values[j] = defect.pixel_value
            saturation[j] = defect.saturation_fraction(int(region.sum())) * int(regions[j].sum())
        return regions, values, saturation

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, mask_paths, label, defect = self.samples[index]
        image, size = load_image(path, self.input_size)
        item: dict[str, Any] = {"image": image, "mask": None, "label": label, "path": str(path), "defect": defect}
        if self.split != "test":
            item["mask"] = torch.zeros(self.size_hw, dtype=torch.bool)
            return item
        regions, values, saturation = self._regions(mask_paths, size)
        item["mask"] = regions.any(0) if regions.shape[0] else torch.zeros(self.size_hw, dtype=torch.bool)
        item.update(defect_kind=self.kind(index), defect_masks=regions, defect_values=values, defect_saturation=saturation)
        return item

    def __repr__(self) -> str:
        return (
            f"MVTecLocoDataset({str(self.base)!r}, split={self.split!r}, input_size={self.input_size}, "
            f"layout='loco', n={len(self)})"
        )
