"""Reading image and mask files: every pixel format into [0, 1], or a refusal that names the file.

Images (:func:`load_image`):

============================  ================================================================
PIL mode                      read as
============================  ================================================================
``RGB``, ``L``, ``P``, ``1``  8-bit: ``/255`` (palette and 1-bit through RGB); grey replicated
``RGBA``, ``LA``, ``PA``      the colour channels (alpha dropped)
``CMYK``, ``YCbCr``, ...      converted to RGB by Pillow (a mode it cannot convert is refused)
``I;16`` (16-bit grey)        ``/65535``; resized in float32
``I`` (32-bit integer)        ``/65535`` when every value lies in [0, 65535] (16-bit data stored
                              as ``I``), else refused
``F`` (32-bit float)          as is when every value is finite and in [0, 1], else refused
============================  ================================================================

8-bit images are resized by Pillow's LANCZOS on the 8-bit image (as before); higher bit depths
per channel in float32 with the same filter, clipped to [0, 1]. Masks (:func:`load_mask`) are
binary when their non-zero pixels share one value (any non-zero pixel is anomalous); a mask with
grey levels (a JPEG mask, an anti-aliased edge) is binarised at half its range, with a warning
naming the file, instead of at ``> 0`` (which would grow every defect by its blur).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..._sizes import image_size_hw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PIPELINE_VERSION = 1
"""Bumped whenever decoding, resizing or normalisation changes what an image becomes (a part of the
datasets' fingerprints, so cached features of the old pipeline are never reused)."""

_EIGHT_BIT = ("RGB", "L", "P", "1", "RGBA", "LA", "PA", "RGBX", "CMYK", "YCbCr")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")

__all__ = [
    "PIPELINE_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "check_image_file",
    "decode_image",
    "denormalize",
    "load_image",
    "load_mask",
    "normalize",
]


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


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy() if img.mode != "P" else img.convert("RGBA" if "transparency" in img.info else "RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err} (truncated or corrupt file?)") from err


def check_image_file(path: str | os.PathLike) -> tuple[int, int]:
    """Open ``path``'s header and check the file's integrity without decoding it; returns ``(width, height)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an image, truncated or corrupt (PNG chunk checksums and the length of uncompressed
            BMPs included).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            size = img.size
            missing = _missing_raw_bytes(img, path)
            img.verify()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as err:
        raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err} (truncated or corrupt file?)") from err
    if missing:
        raise ValueError(
            f"cannot read image {path}: truncated file: its pixel data needs {missing} more bytes than the file holds "
            "(copy or extract it again)"
        )
    return size


def _missing_raw_bytes(img: Image.Image, path: Path) -> int:
    """How many bytes an uncompressed BMP's pixel rows need beyond the end of the file (0: none).

    Pillow's ``verify`` checks PNG checksums but not a BMP's length; an uncompressed BMP (BTAD's
    format) declares where its rows start and how long each is, so a cut file shows from its size
    alone. Compressed (RLE) BMPs and other formats are left to ``verify``.
    """
    if img.format != "BMP":
        return 0
    needed = 0
    for tile in img.tile:
        codec, extents, offset, args = tile[0], tile[1], tile[2], tile[3]
        if codec != "raw" or not isinstance(args, tuple) or len(args) < 2 or not isinstance(args[1], int) or args[1] <= 0:
            return 0
        needed = max(needed, offset + args[1] * (extents[3] - extents[1]))
    return max(0, needed - os.path.getsize(path))


def _high_depth(img: Image.Image, path: Path, what: str) -> np.ndarray:
    """A 16-bit, 32-bit integer or float single-channel image as float32 values in [0, 1]."""
    values = np.asarray(img)
    if img.mode in _SIXTEEN_BIT:
        return values.astype(np.float32) / 65535.0
    if img.mode == "I":
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"cannot read {what} {path}: 32-bit integer pixels span [{low}, {high}], outside a 16-bit range; "
                "save it as 8- or 16-bit, or as float in [0, 1]"
            )
        return values.astype(np.float32) / 65535.0
    values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"cannot read {what} {path}: its float pixels hold NaN or infinity")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"cannot read {what} {path}: float pixels span [{low:.4g}, {high:.4g}]; expected values in [0, 1] "
            "(rescale it, or save it as 8- or 16-bit)"
        )
    return values


def decode_image(path: str | os.PathLike, size_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Read ``path`` as RGB (see the module docstring for the pixel formats), resized to ``size_hw``.

    Returns:
        ``(pixels, (width, height) of the file)``: ``pixels`` is uint8 ``[H, W, 3]`` for 8-bit files and
        float32 ``[H, W, 3]`` in [0, 1] for deeper ones.

    Raises:
        FileNotFoundError, ValueError: a missing, unreadable or unsupported file (named, with its mode).
    """
    path = Path(path)
    img = _open(path)
    size = img.size
    target = None if size_hw is None else (size_hw[1], size_hw[0])
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        grey = _high_depth(img, path, "image")
        if target is not None and size != target:
            grey = np.asarray(Image.fromarray(grey, mode="F").resize(target, Image.LANCZOS), dtype=np.float32).clip(0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=2), size
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as err:
            raise ValueError(f"cannot read image {path}: pixel mode {img.mode!r} does not convert to RGB ({err})") from err
    if target is not None and size != target:
        img = img.resize(target, Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8), size


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float()
    return tensor.div_(255.0) if pixels.dtype == np.uint8 else tensor


def load_image(path: str | os.PathLike, input_size: int | tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read an image as a normalised float32 ``[3, H, W]`` tensor (LANCZOS resize to ``input_size``).

    Returns:
        The tensor and the original ``(width, height)``.
    """
    pixels, size = decode_image(path, None if input_size is None else image_size_hw(input_size))
    return normalize(_to_tensor(pixels)), size


def load_mask(path: str | os.PathLike, input_size: int | tuple[int, int] | None, expected_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a ground-truth mask as bool ``[H, W]`` (binarised as the module docstring says, NEAREST resize).

    ``expected_size`` is the image's original ``(width, height)``; a different mask size raises.
    """
    path = Path(path)
    img = _open(path)
    if expected_size is not None and img.size != expected_size:
        raise ValueError(
            f"mask size mismatch: {path} is {img.size[0]}x{img.size[1]} but its image is "
            f"{expected_size[0]}x{expected_size[1]} (width x height); fix or regenerate the mask"
        )
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        values, full = _high_depth(img, path, "mask"), 1.0
    else:
        try:
            values, full = np.asarray(img.convert("L"), dtype=np.uint8), 255
        except (ValueError, OSError) as err:
            raise ValueError(f"cannot read mask {path}: pixel mode {img.mode!r} does not convert to grey ({err})") from err
    levels = np.unique(values[values > 0])
    if levels.size <= 1:
        binary = values > 0
    else:
        threshold = full / 2
        warnings.warn(
            f"mask {path} is not binary ({levels.size + 1} grey levels, e.g. a JPEG or anti-aliased mask): "
            f"binarised at > {threshold:g} (half its range), not at > 0",
            stacklevel=2,
        )
        binary = values > threshold
    mask = Image.fromarray(binary.astype(np.uint8) * 255)
    if input_size is not None:
        h, w = image_size_hw(input_size)
        if mask.size != (w, h):
            mask = mask.resize((w, h), Image.NEAREST)
    return torch.from_numpy(np.asarray(mask, dtype=np.uint8) > 0)
