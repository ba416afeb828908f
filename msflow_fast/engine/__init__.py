"""msflow_fast.engine: model-agnostic datasets, training, evaluation, prediction, metrics and heat maps.

The engine knows models only through :mod:`msflow_fast.models.base` (``loss(batch)``,
``predict(images)``, ``recipe()``, ``metric_maps``) and saves them with
:mod:`msflow_fast.models.checkpoint`; it holds no model of its own.
"""

from __future__ import annotations

from .data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    MVTecDataset,
    MVTecLocoDataset,
    PseudoAnomalyConfig,
    PseudoAnomalyDataset,
    PseudoAnomalyGenerator,
    SyntheticDefects,
    denormalize,
    normalize,
    write_synthetic_dataset,
)
from .evaluate import evaluate
from .feature_cache import CacheReport
from .metrics import aupro, auroc, image_auroc, pixel_auroc
from .metrics_spro import saturation_area, spro, spro_by_kind
from .optim import EpochSchedule, make_optimizer
from .predict import predict_folder
from .pseudo_eval import evaluate_pseudo_anomalies, holdout_split
from .train import CHECKPOINT_NAME, DEFAULT_RECIPE, FitResult, fit, seed_everything
from .visualize import apply_colormap, images_to_uint8, overlay, save_overlay

__all__ = [
    "CHECKPOINT_NAME",
    "CacheReport",
    "DEFAULT_RECIPE",
    "EpochSchedule",
    "FitResult",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "MVTecDataset",
    "MVTecLocoDataset",
    "PseudoAnomalyConfig",
    "PseudoAnomalyDataset",
    "PseudoAnomalyGenerator",
    "SyntheticDefects",
    "apply_colormap",
    "aupro",
    "auroc",
    "denormalize",
    "evaluate",
    "evaluate_pseudo_anomalies",
    "fit",
    "holdout_split",
    "image_auroc",
    "images_to_uint8",
    "make_optimizer",
    "normalize",
    "overlay",
    "pixel_auroc",
    "predict_folder",
    "saturation_area",
    "save_overlay",
    "seed_everything",
    "spro",
    "spro_by_kind",
    "write_synthetic_dataset",
]
