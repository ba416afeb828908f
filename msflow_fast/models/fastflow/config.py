"""``FastFlowConfig``: every FastFlow hyper-parameter in one frozen, validated dataclass, and the
four published presets (MODELS_SPEC.md Part A §1.3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base import ModelConfig, normalize_input_size
from ..extractor import BACKBONE_PRECISIONS

FEATURE_NORMS = ("layer_norm", "channel", "backbone", "none")
SCORES = ("max", "log_space")
CLAMP_FORMS = ("tanh", "tanh_scaled")


@dataclass(frozen=True)
class FastFlowConfig(ModelConfig):
    """FastFlow model configuration; the defaults are the ``resnet18`` preset (gathierry/FastFlow's).

    Attributes:
        input_size: image size ``(H, W)`` (an int means square). With ``feature_norm="layer_norm"``
            the norms' affine is built for this size and the model takes only it.
        backbone: timm model name: a CNN (``features_only``) or, with ``vit_block``, a vision
            transformer whose token maps are used.
        pretrained: load timm's pretrained backbone weights (its default tag for the name, as
            anomalib 2.7: for wide_resnet50_2 that is ``racm_in1k``; needs network or a timm cache).
        out_indices: CNN stages used (timm ``out_indices``; FastFlow: layer1..layer3).
        vit_block: for a ViT backbone, the block (0-based) whose tokens feed the flow
            (FastFlow: 7 for DeiT, 40 for CaiT); ``None`` for a CNN.
        flow_steps: AllInOneBlocks per stage (8 for CNNs, 20 for ViTs).
        conv3x3_only: every subnet 3x3; otherwise 3x3 and 1x1 alternate (even steps 3x3).
        hidden_ratio: subnet hidden width as a fraction of its input width (1.0 CNNs, 0.16 ViTs).
        clamp_alpha: soft clamp of the couplings (FastFlow: 2.0).
        clamp_form: ``"tanh"`` = ``alpha * tanh(0.1 a)`` (FrEIA 0.2, FastFlow) or ``"tanh_scaled"``.
        feature_norm: ``"layer_norm"``: a trainable LayerNorm over [C, H, W] per stage (faithful for
            CNNs; ties the model to ``input_size``); ``"channel"``: the same normalisation with a
            per-channel affine, for any input size with a CNN (not in the paper); ``"backbone"``: none
            beyond the ViT's own final norm (faithful for ViTs); ``"none"``.
        score: ``"max"`` (the maximum of the anomaly map, anomalib's score) or ``"log_space"``
            (the same maximum as ``-log(-map)`` in nats: the same ranking, never underflowing).
        backbone_precision: ``"float32"`` or ``"bfloat16"``: the frozen backbone's compute precision
            (bf16 autocast, about 2x faster on CPUs with AVX-512 BF16 / AMX and on GPUs); the flows,
            log-dets and scores stay float32. An option, not the default: it moves the features by
            about 0.4 % (see the README's speed section for its effect on AUROC).
    """

    input_size: tuple[int, int] = (256, 256)
    backbone: str = "resnet18"
    pretrained: bool = True
    out_indices: tuple[int, ...] = (1, 2, 3)
    vit_block: int | None = None
    flow_steps: int = 8
    conv3x3_only: bool = True
    hidden_ratio: float = 1.0
    clamp_alpha: float = 2.0
    clamp_form: str = "tanh"
    feature_norm: str = "layer_norm"
    score: str = "max"
    backbone_precision: str = "float32"

    def __post_init__(self) -> None:
        normalize_input_size(self)
        if self.backbone_precision not in BACKBONE_PRECISIONS:
            raise ValueError(f"backbone_precision must be one of {BACKBONE_PRECISIONS}, got {self.backbone_precision!r}")
        if not isinstance(self.backbone, str) or not self.backbone:
            raise TypeError(f"backbone must be a non-empty timm model name, got {self.backbone!r}")
        for name in ("pretrained", "conv3x3_only"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        indices = tuple(self.out_indices) if not isinstance(self.out_indices, (str, bytes)) else ()
        if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise ValueError(f"out_indices must be a non-empty sequence of ints >= 0, got {self.out_indices!r}")
        object.__setattr__(self, "out_indices", indices)
        if self.vit_block is not None and (isinstance(self.vit_block, bool) or not isinstance(self.vit_block, int) or self.vit_block < 0):
            raise ValueError(f"vit_block must be None or an int >= 0, got {self.vit_block!r}")
        if isinstance(self.flow_steps, bool) or not isinstance(self.flow_steps, int) or self.flow_steps < 1:
            raise ValueError(f"flow_steps must be an int >= 1, got {self.flow_steps!r}")
        for name in ("hidden_ratio", "clamp_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.clamp_form not in CLAMP_FORMS:
            raise ValueError(f"clamp_form must be one of {CLAMP_FORMS}, got {self.clamp_form!r}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")


PRESETS: dict[str, dict[str, Any]] = {
    "resnet18": dict(
        input_size=(256, 256), backbone="resnet18", vit_block=None, flow_steps=8, conv3x3_only=True,
        hidden_ratio=1.0, feature_norm="layer_norm",
    ),
    "wide_resnet50_2": dict(
        input_size=(256, 256), backbone="wide_resnet50_2", vit_block=None, flow_steps=8, conv3x3_only=False,
        hidden_ratio=1.0, feature_norm="layer_norm",
    ),
    "deit": dict(
        input_size=(384, 384), backbone="deit_base_distilled_patch16_384", vit_block=7, flow_steps=20,
        conv3x3_only=False, hidden_ratio=0.16, feature_norm="backbone",
    ),
    "cait": dict(
        input_size=(448, 448), backbone="cait_m48_448", vit_block=40, flow_steps=20,
        conv3x3_only=False, hidden_ratio=0.16, feature_norm="backbone",
    ),
}
"""The published settings (gathierry/FastFlow configs; anomalib's backbones): input size, steps,
kernels (3-3 or 3-1), hidden ratio and feature norm: :func:`from_preset` or ``FastFlow.from_preset``."""


def from_preset(name: str, **changes: Any) -> FastFlowConfig:
    """The config of preset ``name`` (see :data:`PRESETS`) with ``changes``."""
    if name not in PRESETS:
        raise ValueError(f"unknown FastFlow preset {name!r}; presets: {', '.join(PRESETS)}")
    return FastFlowConfig(**{**PRESETS[name], **changes})


__all__ = ["CLAMP_FORMS", "FEATURE_NORMS", "FastFlowConfig", "PRESETS", "SCORES", "from_preset"]
