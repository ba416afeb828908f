"""FastFlow (Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing
Flows", arXiv 2111.07677), faithful to anomalib 2.7's ``FastflowModel`` (itself gathierry/FastFlow's).

``config`` (:class:`FastFlowConfig`, the four published presets), ``model`` (:class:`FastFlow`),
``flows`` (the per-stage flow), ``head`` (:class:`FastFlowHead`) and ``official`` (anomalib's and
gathierry's checkpoints). See ``README.md`` beside this file.
"""

from __future__ import annotations

from .config import PRESETS, FastFlowConfig, from_preset
from .flows import build_stage_flow, step_kernel
from .head import FastFlowHead
from .model import OFFICIAL_RECIPE, FastFlow, FastFlowOutput
from .official import anomalib_config, convert_state, load_anomalib, load_gathierry

__all__ = [
    "OFFICIAL_RECIPE",
    "PRESETS",
    "FastFlow",
    "FastFlowConfig",
    "FastFlowHead",
    "FastFlowOutput",
    "anomalib_config",
    "build_stage_flow",
    "convert_state",
    "from_preset",
    "load_anomalib",
    "load_gathierry",
    "step_kernel",
]
