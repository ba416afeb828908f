"""``MSFlowConfig``: every MSFlow hyper-parameter in one frozen, validated dataclass (official defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base import ModelConfig, normalize_input_size
from ..extractor import BACKBONE_PRECISIONS

POOL_TYPES = ("avg", "max", "none")
SCORES = ("official", "log_space")
CLAMP_FORMS = ("tanh", "tanh_scaled")


def _int_tuple(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}")
    out = tuple(value)
    if not out or not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise TypeError(f"{name} must be a non-empty sequence of ints, got {value!r}")
    return out


@dataclass(frozen=True)
class MSFlowConfig(ModelConfig):
    """MSFlow model configuration; the defaults are the official ones (MSFLOW_SPEC.md §1.12).

    Attributes:
        input_size: training/inference image size ``(H, W)`` (an int or a 1-element sequence means square). The model accepts
            any size divisible by the backbone's largest stride; this is what data pipelines resize to.
        backbone: timm model name (``features_only``). ``"wide_resnet50_2"`` with ``pretrained=True``
            loads ``wide_resnet50_2.tv_in1k`` (torchvision V1 weights, as the official code).
        pretrained: load pretrained backbone weights (needs network or a timm cache).
        out_indices: backbone stages to use (timm ``out_indices``; official: layer1..layer3).
        reflect_padding: reflect padding in every padded backbone conv (the official extractor).
        pool_type: ``"avg"`` (AvgPool2d(3, 2, 1), official), ``"max"`` (MaxPool2d(3, 2, 1)) or ``"none"``.
        c_cond: positional-encoding channels (multiple of 4).
        parallel_blocks: AllInOneBlocks per scale.
        clamp_alpha: soft clamp of the parallel blocks and of the fusion coupling.
        clamp_form: ``"tanh"`` (FrEIA 0.2, official) or ``"tanh_scaled"`` (FrEIA >= 2023-08).
        top_k: fraction of pixels averaged into the image score.
        score: which score ``predict`` reports as ``score``: ``"official"`` (top-k mean of the "mul"
            map; exactly 1.0 once the top-k pixels lie 17.3 nats or more below the image's most
            likely pixel in float32) or ``"log_space"`` (the top-k mean of those gaps, in nats).
        backbone_precision: ``"float32"`` or ``"bfloat16"``: the frozen backbone's compute precision
            (bf16 autocast, about 2x faster on CPUs with AVX-512 BF16 / AMX and on GPUs); the flows,
            log-dets and scores stay float32. An option, not the default: it moves the features by
            about 0.4 % (see the README's speed section for its effect on AUROC).

    The fusion subnet's hidden width is not a field: it is fixed by the architecture at
    ``sum(C_k // 2) // 4`` (224 for the official widths; the official ``mid_channels`` argument is ignored).
    """

    input_size: tuple[int, int] = (512, 512)
    backbone: str = "wide_resnet50_2"
    pretrained: bool = True
    out_indices: tuple[int, ...] = (1, 2, 3)
    reflect_padding: bool = True
    pool_type: str = "avg"
    c_cond: int = 64
    parallel_blocks: tuple[int, ...] = (2, 5, 8)
    clamp_alpha: float = 1.9
    clamp_form: str = "tanh"
    top_k: float = 0.03
    score: str = "official"
    backbone_precision: str = "float32"

    def __post_init__(self) -> None:
        normalize_input_size(self)
        if self.backbone_precision not in BACKBONE_PRECISIONS:
            raise ValueError(f"backbone_precision must be one of {BACKBONE_PRECISIONS}, got {self.backbone_precision!r}")
        if not isinstance(self.backbone, str) or not self.backbone:
            raise TypeError(f"backbone must be a non-empty timm model name, got {self.backbone!r}")
        if not isinstance(self.pretrained, bool):
            raise TypeError(f"pretrained must be a bool, got {self.pretrained!r}")
        if not isinstance(self.reflect_padding, bool):
            raise TypeError(f"reflect_padding must be a bool, got {self.reflect_padding!r}")
        indices = _int_tuple(self.out_indices, "out_indices")
        if min(indices) < 0:
            raise ValueError(f"out_indices must be >= 0, got {indices}")
        object.__setattr__(self, "out_indices", indices)
        blocks = _int_tuple(self.parallel_blocks, "parallel_blocks")
        if min(blocks) < 1:
            raise ValueError(f"parallel_blocks must all be >= 1, got {blocks}")
        object.__setattr__(self, "parallel_blocks", blocks)
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type must be one of {POOL_TYPES}, got {self.pool_type!r}")
        if isinstance(self.c_cond, bool) or not isinstance(self.c_cond, int) or self.c_cond < 4 or self.c_cond % 4:
            raise ValueError(f"c_cond must be a positive multiple of 4 (2-D sin/cos encoding), got {self.c_cond!r}")
        if isinstance(self.clamp_alpha, bool) or not isinstance(self.clamp_alpha, (int, float)) or not self.clamp_alpha > 0:
            raise ValueError(f"clamp_alpha must be a float > 0, got {self.clamp_alpha!r}")
        object.__setattr__(self, "clamp_alpha", float(self.clamp_alpha))
        if self.clamp_form not in CLAMP_FORMS:
            raise ValueError(f"clamp_form must be one of {CLAMP_FORMS}, got {self.clamp_form!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, float)) or not 0 < self.top_k <= 1:
            raise ValueError(f"top_k must be a float in (0, 1], got {self.top_k!r}")
        object.__setattr__(self, "top_k", float(self.top_k))
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")


__all__ = ["MSFlowConfig", "POOL_TYPES", "SCORES"]
