"""Data: image and mask files (:mod:`.images`), folder datasets (:mod:`.folders`; MVTec LOCO AD in
:mod:`.loco`), the synthetic defect dataset (:mod:`.synthetic`), pseudo anomalies on good images (:mod:`.pseudo_anomaly`) and the batch checks the engine runs
(:mod:`.checks`)."""

from __future__ import annotations

from ..._sizes import image_size_hw
from .checks import check_finite_images, decoded_finite, deterministic_items, fingerprint_files
from .folders import LAYOUTS, ImageFolderDataset, MVTecDataset, detect_layout, list_images
from .images import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_image_file,
    decode_image,
    denormalize,
    load_image,
    load_mask,
    normalize,
)
from .loco import DefectType, MVTecLocoDataset, read_defects_config
from .pseudo_anomaly import PseudoAnomalyConfig, PseudoAnomalyDataset, PseudoAnomalyGenerator, PseudoSample
from .synthetic import SyntheticDefects, write_synthetic_dataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "LAYOUTS",
    "DefectType",
    "MVTecDataset",
    "MVTecLocoDataset",
    "PseudoAnomalyConfig",
    "PseudoAnomalyDataset",
    "PseudoAnomalyGenerator",
    "PseudoSample",
    "SyntheticDefects",
    "check_finite_images",
    "check_image_file",
    "decode_image",
    "decoded_finite",
    "detect_layout",
    "deterministic_items",
    "fingerprint_files",
    "denormalize",
    "image_size_hw",
    "list_images",
    "load_image",
    "load_mask",
    "normalize",
    "read_defects_config",
    "write_synthetic_dataset",
]
