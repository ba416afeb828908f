"""MSFlow composition: configuration, feature extractor, positional encoding, model, checkpoints and export."""

from __future__ import annotations

from .checkpoint import (
    atomic_write,
    check_checkpoint_state,
    checkpoint_state,
    convert_official_fusion_state,
    load_checkpoint,
    load_checkpoint_state,
    load_official_checkpoint,
    model_from_checkpoint_state,
    read_checkpoint,
    save_checkpoint,
    versions,
    write_checkpoint,
)
from .config import MSFlowConfig
from .extractor import FeatureExtractor, use_reflect_padding
from .export import PredictModule, export_onnx, export_predict
from .msflow import FlowOutput, MSFlow
from .positional import PositionalEncoding2d, positional_encoding_2d

__all__ = [
    "atomic_write",
    "FeatureExtractor",
    "FlowOutput",
    "MSFlow",
    "MSFlowConfig",
    "PositionalEncoding2d",
    "PredictModule",
    "check_checkpoint_state",
    "checkpoint_state",
    "convert_official_fusion_state",
    "export_onnx",
    "export_predict",
    "load_checkpoint",
    "load_checkpoint_state",
    "load_official_checkpoint",
    "model_from_checkpoint_state",
    "positional_encoding_2d",
    "read_checkpoint",
    "save_checkpoint",
    "use_reflect_padding",
    "versions",
    "write_checkpoint",
]
