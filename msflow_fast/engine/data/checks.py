"""Checks of image batches the engine runs before they reach a model."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

__all__ = ["check_finite_images", "decoded_finite", "deterministic_items", "fingerprint_files"]


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


def deterministic_items(data: Any) -> bool:
    """Whether ``data`` (a map-style Dataset) returns the same item for an index every time: no
    random augmentation. A dataset says so with a true ``deterministic_items`` class attribute
    (this module's datasets do); only then does ``fit(feature_cache="auto")`` cache features."""
    return bool(getattr(data, "deterministic_items", False))


def fingerprint_files(kind: str, settings: dict, files: Iterable[str | os.PathLike | None]) -> str:
    """A sha256 hex digest of a dataset: its ``kind``, ``settings`` (JSON-able: split, size, pipeline
    version, ...) and each file's path, size and modification time (``None``: no file)."""
    digest = hashlib.sha256(json.dumps({"kind": kind, "settings": settings}, sort_keys=True, default=str).encode())
    for path in files:
        if path is None:
            digest.update(b"-\n")
            continue
        stat = os.stat(path)
        digest.update(f"{os.fspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
