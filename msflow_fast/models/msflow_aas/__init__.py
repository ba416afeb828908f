"""MS-Flow (Mao, Wu, Xing, Acta Automatica Sinica 2024), registered as ``msflow_aas``: an
INTERPRETATION built from the paper's abstract (the full text and code are not public), not the
authors' method; and not MSFlow of Zhou et al. (TNNLS 2024, :mod:`msflow_fast.models.msflow`).
See :class:`MSFlowAAS` and this folder's README.md."""

from __future__ import annotations

from .config import ANOMALY_MAPS, SCORES, WIRINGS, MSFlowAASConfig
from .flows import HierarchicalFlow, carried_channels, up2
from .hpm import HierarchicalPerceptionModule, hpm_subnet
from .model import RECIPE, MSFlowAAS, MSFlowAASOutput

__all__ = [
    "ANOMALY_MAPS",
    "HierarchicalFlow",
    "HierarchicalPerceptionModule",
    "MSFlowAAS",
    "MSFlowAASConfig",
    "MSFlowAASOutput",
    "RECIPE",
    "SCORES",
    "WIRINGS",
    "carried_channels",
    "hpm_subnet",
    "up2",
]
