"""msflow_fast.engine: datasets, training, evaluation, metrics, checkpoints and heat-map overlays.

Works with any model following the MSFlow protocol: ``model.loss(images)`` for training and
``model.predict(images)`` (``anomaly_map``, ``anomaly_map_mul``, ``score``) for evaluation.
"""

from __future__ import annotations

from .checkpoint import CHECKPOINT_NAME, atomic_write_json, load_checkpoint, save_checkpoint
from .data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    MVTecDataset,
    SyntheticDefects,
    denormalize,
    normalize,
    write_synthetic_dataset,
)
from .evaluate import evaluate, predict_folder
from .metrics import aupro, auroc, image_auroc, pixel_auroc
from .train import FitResult, OfficialSchedule, fit, seed_everything
from .visualize import apply_colormap, overlay, save_overlay

__all__ = [
    "CHECKPOINT_NAME",
    "FitResult",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "MVTecDataset",
    "OfficialSchedule",
    "SyntheticDefects",
    "apply_colormap",
    "atomic_write_json",
    "aupro",
    "auroc",
    "denormalize",
    "evaluate",
    "fit",
    "image_auroc",
    "load_checkpoint",
    "normalize",
    "overlay",
    "pixel_auroc",
    "predict_folder",
    "save_checkpoint",
    "seed_everything",
    "write_synthetic_dataset",
]
