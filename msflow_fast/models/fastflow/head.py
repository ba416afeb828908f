"""FastFlow's anomaly map and image score (MODELS_SPEC.md Part A §1.5): :class:`FastFlowHead`, shared
with DADF (it lives in :mod:`msflow_fast.models.stage_flow`)."""

from __future__ import annotations

from ..stage_flow import FastFlowHead

__all__ = ["FastFlowHead"]
