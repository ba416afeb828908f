"""MSFlow composition: configuration, feature extractor, positional encoding, model and checkpoints."""

from __future__ import annotations

from .checkpoint import convert_official_fusion_state, load_checkpoint, load_official_checkpoint, save_checkpoint
from .config import MSFlowConfig
from .extractor import FeatureExtractor, use_reflect_padding
from .msflow import FlowOutput, MSFlow
from .positional import PositionalEncoding2d, positional_encoding_2d

__all__ = [
    "FeatureExtractor",
    "FlowOutput",
    "MSFlow",
    "MSFlowConfig",
    "PositionalEncoding2d",
    "convert_official_fusion_state",
    "load_checkpoint",
    "load_official_checkpoint",
    "positional_encoding_2d",
    "save_checkpoint",
    "use_reflect_padding",
]
