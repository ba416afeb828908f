"""msflow_fast: fused normalizing-flow kernels, drop-in flow blocks and a model zoo for visual anomaly detection."""

from __future__ import annotations

from ._version import __version__
from ._build import build_info
from . import ops
from .models import CSFlow, CSFlowConfig, DADF, DADFConfig, FastFlow, FastFlowConfig, MLFF, MLFFConfig, MSFlow, MSFlowAAS, MSFlowAASConfig, MSFlowConfig, available, create, load_model, save

__all__ = ["CSFlow", "CSFlowConfig", "DADF", "DADFConfig", "FastFlow", "FastFlowConfig", "MLFF", "MLFFConfig", "MSFlow", "MSFlowAAS", "MSFlowAASConfig", "MSFlowConfig", "__version__", "available", "build_info", "create", "load_model", "ops", "save"]
