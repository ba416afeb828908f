"""DADF (Yao et al., IEEE T-ASE 2024, arXiv 2303.17882), faithful to its official code: a frozen CNN,
a dual-attention transformer with learned memory tokens (stage 1), then 2-D flows on the prior and
its two reconstructions (stage 2).

``config`` (:class:`DADFConfig`, the code's backbones as presets), ``transformer``
(:class:`DualAttentionTransformer`), ``flows`` (the per-scale flow), ``model`` (:class:`DADF`) and
``official`` (:func:`load_official`: weights trained by the official code).
See ``README.md`` beside this file.
"""

from __future__ import annotations

from .config import PRECISIONS, PRESETS, SCORES, DADFConfig
from .flows import build_scale_flow, subnet_depthwise
from .model import DADF, OFFICIAL_RECIPE, STAGES, DADFOutput
from .official import convert_vit_state, load_official
from .transformer import DualAttention, DualAttentionTransformer, DualBlock, Reconstructions, reconstruction_loss, sincos_positions_2d

__all__ = [
    "DADF",
    "DADFConfig",
    "DADFOutput",
    "DualAttention",
    "DualAttentionTransformer",
    "DualBlock",
    "OFFICIAL_RECIPE",
    "PRECISIONS",
    "PRESETS",
    "Reconstructions",
    "SCORES",
    "STAGES",
    "build_scale_flow",
    "convert_vit_state",
    "load_official",
    "reconstruction_loss",
    "sincos_positions_2d",
    "subnet_depthwise",
]
