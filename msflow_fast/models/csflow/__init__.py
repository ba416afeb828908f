"""CS-Flow (Rudolph et al., WACV 2022), registered as ``csflow``: the official code's maths on the
fused coupling op (see :class:`CSFlow`)."""

from __future__ import annotations

from .config import ANOMALY_MAPS, PERMUTATIONS, CSFlowConfig
from .flows import CrossScaleFlow, ParallelPermutation, block_permutations
from .model import OFFICIAL_RECIPE, CSFlow, CSFlowOutput
from .official import anomalib_loss, anomalib_state_dict, load_anomalib, load_official

__all__ = [
    "ANOMALY_MAPS",
    "CSFlow",
    "CSFlowConfig",
    "CSFlowOutput",
    "CrossScaleFlow",
    "OFFICIAL_RECIPE",
    "PERMUTATIONS",
    "ParallelPermutation",
    "anomalib_loss",
    "anomalib_state_dict",
    "block_permutations",
    "load_anomalib",
    "load_official",
]
