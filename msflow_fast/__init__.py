"""msflow_fast: fused normalizing-flow kernels and modules for visual anomaly detection (MSFlow)."""

from __future__ import annotations

__version__ = "0.1.0"

from ._build import build_info
from . import ops
from .model import MSFlow, MSFlowConfig

__all__ = ["MSFlow", "MSFlowConfig", "__version__", "build_info", "ops"]
