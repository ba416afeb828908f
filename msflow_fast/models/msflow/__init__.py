"""MSFlow (Zhou et al., "MSFlow: Multi-Scale Flow-based Framework for Unsupervised Anomaly
Detection", TNNLS 2024), faithful to the official code (cool-xuan/msflow on FrEIA 0.2).

``config`` (:class:`MSFlowConfig`), ``model`` (:class:`MSFlow`), ``flows`` (the parallel-flow
builder and :class:`FusionFlow`), ``head`` (:class:`MSFlowHead`) and ``official`` (reading and
writing the official checkpoints). See ``README.md`` beside this file.
"""

from __future__ import annotations

from .config import MSFlowConfig
from .flows import FusionFlow, build_parallel_flow, build_parallel_flows
from .head import MSFlowHead
from .model import OFFICIAL_RECIPE, FlowOutput, MSFlow
from .official import convert_official_fusion_state, load_official, official_state, save_official

__all__ = [
    "OFFICIAL_RECIPE",
    "FlowOutput",
    "FusionFlow",
    "MSFlow",
    "MSFlowConfig",
    "MSFlowHead",
    "build_parallel_flow",
    "build_parallel_flows",
    "convert_official_fusion_state",
    "load_official",
    "official_state",
    "save_official",
]
