"""The model zoo: one folder per model, and the parts they share.

- :mod:`.base`: the protocol the engine knows models by (:class:`AnomalyModel`,
  :class:`Prediction`, :class:`TrainRecipe`).
- :mod:`.registry`: models by name (``register``, ``get``, ``create``, ``available``).
- :mod:`.checkpoint`: one checkpoint format for every model (``save``, ``read``, ``load_model``).
- :mod:`.export`: ``torch.export`` / ONNX of any model's ``predict``.
- :mod:`.complexity`: parameters and FLOPs of any model (``msflow-fast models --flops``).
- :mod:`.extractor`, :mod:`.positional`: the frozen feature extractor and the 2-D positional encoding.
- :mod:`.msflow`: MSFlow (TNNLS 2024).
- :mod:`.fastflow`: FastFlow (Yu et al. 2021), as anomalib 2.7 computes it.
- :mod:`.csflow`: CS-Flow (Rudolph et al. 2022), as its official code computes it.
- :mod:`.msflow_aas`: MS-Flow (Mao et al., Acta Automatica Sinica 2024), an INTERPRETATION of its
  abstract (no code or full text is public), not the authors' method.
- :mod:`.mlff`: MLFF (Tang et al., J. National Univ. Defense Technology 2025), an INTERPRETATION of
  its abstract (no code or full text is public): a teacher-student fusion network trained on pseudo anomalies.
- :mod:`.dadf`: DADF (Yao et al., IEEE T-ASE 2024), as its official code computes it (two stages).
- :mod:`.config_checks`, :mod:`.image_pyramid`: config field checks; the image-pyramid features
  and per-dimension loss shared by CS-Flow and ``msflow_aas``.
- :mod:`.stage_flow`: the flow-step kernel rule and the FastFlow-style head shared by FastFlow and DADF.

Importing this package registers every model in it.
"""

from __future__ import annotations

from . import registry
from .base import METRICS, AnomalyModel, LRSchedule, ModelConfig, Prediction, TrainRecipe, TrainStage, as_batch
from .checkpoint import checkpoint_state, load_model, load_weights, read, save
from .export import PredictModule, export_onnx, export_predict, output_names
from .extractor import FeatureExtractor, use_reflect_padding
from .positional import PositionalEncoding2d, positional_encoding_2d
from .registry import available, create, get, register

from . import csflow, dadf, fastflow, mlff, msflow, msflow_aas  # noqa: E402  (registers each model)
from .csflow import CSFlow, CSFlowConfig  # noqa: E402
from .fastflow import FastFlow, FastFlowConfig  # noqa: E402
from .msflow import MSFlow, MSFlowConfig  # noqa: E402
from .msflow_aas import MSFlowAAS, MSFlowAASConfig  # noqa: E402
from .dadf import DADF, DADFConfig  # noqa: E402
from .mlff import MLFF, MLFFConfig  # noqa: E402

__all__ = [
    "METRICS",
    "AnomalyModel",
    "CSFlow",
    "CSFlowConfig",
    "DADF",
    "DADFConfig",
    "FastFlow",
    "FastFlowConfig",
    "FeatureExtractor",
    "MLFF",
    "MLFFConfig",
    "LRSchedule",
    "MSFlow",
    "MSFlowAAS",
    "MSFlowAASConfig",
    "MSFlowConfig",
    "ModelConfig",
    "PositionalEncoding2d",
    "Prediction",
    "PredictModule",
    "TrainRecipe",
    "TrainStage",
    "as_batch",
    "available",
    "checkpoint_state",
    "create",
    "csflow",
    "dadf",
    "export_onnx",
    "export_predict",
    "fastflow",
    "get",
    "load_model",
    "load_weights",
    "msflow",
    "mlff",
    "msflow_aas",
    "output_names",
    "positional_encoding_2d",
    "read",
    "register",
    "registry",
    "save",
    "use_reflect_padding",
]
