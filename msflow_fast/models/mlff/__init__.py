"""MLFF (Tang, Zuo, Zhang, Wang, Wang, Journal of National University of Defense Technology 2025),
registered as ``mlff``: an INTERPRETATION built from the paper's abstract (the full text and code are
not public), not the authors' method. See :class:`MLFF` and this folder's README.md."""

from __future__ import annotations

from .config import CONSISTENCY_LOSSES, FUSIONS, HEAD_NORMS, SCORE_LOSSES, STAGES, MLFFConfig
from .losses import consistency_loss, feature_loss, focal_loss, mask_target, score_loss, top_k_score
from .model import MLFF, RECIPE, MLFFOutput
from .networks import ASPP, BasicBlock, MultiLevelFusion, SegmentationHead, StudentNet, discrepancy

__all__ = [
    "ASPP",
    "BasicBlock",
    "CONSISTENCY_LOSSES",
    "FUSIONS",
    "HEAD_NORMS",
    "MLFF",
    "MLFFConfig",
    "MLFFOutput",
    "MultiLevelFusion",
    "RECIPE",
    "SCORE_LOSSES",
    "STAGES",
    "SegmentationHead",
    "StudentNet",
    "consistency_loss",
    "discrepancy",
    "feature_loss",
    "focal_loss",
    "mask_target",
    "score_loss",
    "top_k_score",
]
