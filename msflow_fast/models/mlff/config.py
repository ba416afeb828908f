"""``MLFFConfig``: the hyper-parameters of ``mlff`` in one frozen, validated dataclass.

``mlff`` is an INTERPRETATION of the multi-level feature fusion network of Tang et al. (Journal of
National University of Defense Technology, 2025, 47(2)), built from the paper's abstract alone
(MODELS_SPEC.md Part B §2.3): every default below is a choice made here (most follow DeSTSeg,
CVPR 2023), not a setting published by the authors.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base import ModelConfig, normalize_input_size
from ..config_checks import require_bool, require_choice, require_int, require_name, require_number

FUSIONS = ("fpn", "concat")
CONSISTENCY_LOSSES = ("focal_l1", "off")
SCORE_LOSSES = ("bce_margin", "bce", "off")
HEAD_NORMS = ("batch", "group")
STAGES = ("student", "segmentation")
STRIDE = 32
"""Both sides of the input must be multiples of this (the student encoder's deepest stride)."""


@dataclass(frozen=True)
class MLFFConfig(ModelConfig):
    """Configuration of ``mlff``, an INTERPRETATION of "Image anomaly detection algorithm using
    multi-level feature fusion network" (Tang et al., 2025): only the abstract is public, so the
    network, losses and every default here are this package's choices (DeSTSeg's where one exists),
    not the authors' settings.

    Attributes:
        input_size: image size ``(H, W)``; both sides multiples of 32 (256, DeSTSeg's).
        backbone: the frozen teacher, a timm CNN name (``resnet18``, DeSTSeg's).
        pretrained: load timm's pretrained teacher weights (needs network or a timm cache).
        layers: the teacher's timm stages whose maps are the feature levels, finest first
            (``(1, 2, 3)``: ResNet-18 layer1-3, 64/128/256 channels at strides 4/8/16).
        student_backbone: timm CNN name of the student's encoder, always randomly initialised; its
            deepest stage (stride 32) feeds the decoder (``resnet18``).
        fusion: how the per-level teacher-student discrepancies ``D_k = -T̂_k ⊙ Ŝ_k`` are fused:
            ``"fpn"`` (default): an FPN top-down path ``P_L = conv1x1(D_L)``,
            ``P_k = conv1x1(D_k) + Up(P_{k+1})``, then ``concat(P_1..P_L, D_1..D_L)`` at the finest
            level; ``"concat"``: the plain ``concat(D_1, Up(D_2), ..)`` (DeSTSeg's, the ablation
            baseline).
        fpn_channels: channels of every FPN level (128).
        seg_channels: width of the segmentation head's two residual blocks and ASPP (256).
        aspp_rates: dilation rates of the ASPP's 3x3 branches (6, 12, 18).
        head_norm: the segmentation head's normalisation: ``"batch"`` (BatchNorm, DeSTSeg's) or
            ``"group"`` (GroupNorm, 8 groups: the same in training and evaluation; for short runs,
            where BatchNorm's running statistics lag behind the head's weights).
        consistency: the consistency constraint of the segmentation stage: ``"focal_l1"``
            (default; the predicted map agrees with the pseudo mask: ``focal_{gamma} + L1``) or
            ``"off"``.
        focal_gamma: ``gamma`` of the focal term (4).
        score_loss: the score constraint of the segmentation stage, on the image score ``s``:
            ``"bce_margin"`` (default: ``BCE(s, y) + margin_weight * (y * max(0, margin - s) +
            (1 - y) * s)``), ``"bce"`` (the BCE alone) or ``"off"``.
        margin: ``m`` of the margin term (0.9).
        margin_weight: ``lambda_m`` of the margin term (0.5).
        feature_weight: weight of the feature constraint in the student stage (1).
        consistency_weight: weight of the consistency constraint in the segmentation stage (1).
        score_weight: weight of the score constraint in the segmentation stage (1).
        top_k: the image score is the mean of the ``top_k`` largest pixels of the map at the input
            size (100, DeSTSeg's rule), used in training too (the score loss's ``s``).
        pseudo_p_normal: the fraction of training samples left normal by the pseudo-anomaly
            generator (0.5, DRAEM's); the other generator settings are the engine's defaults.
    """

    input_size: tuple[int, int] = (256, 256)
    backbone: str = "resnet18"
    pretrained: bool = True
    layers: tuple[int, ...] = (1, 2, 3)
    student_backbone: str = "resnet18"
    fusion: str = "fpn"
    fpn_channels: int = 128
    seg_channels: int = 256
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    head_norm: str = "batch"
    consistency: str = "focal_l1"
    focal_gamma: float = 4.0
    score_loss: str = "bce_margin"
    margin: float = 0.9
    margin_weight: float = 0.5
    feature_weight: float = 1.0
    consistency_weight: float = 1.0
    score_weight: float = 1.0
    top_k: int = 100
    pseudo_p_normal: float = 0.5

    def __post_init__(self) -> None:
        normalize_input_size(self)
        if any(side % STRIDE for side in self.input_size):
            raise ValueError(
                f"input_size {self.input_size}: both sides must be multiples of {STRIDE} (the student encoder's stride), "
                f"e.g. {tuple(max(STRIDE, side // STRIDE * STRIDE) for side in self.input_size)}"
            )
        require_name(self, "backbone")
        require_name(self, "student_backbone")
        require_bool(self, "pretrained")
        for name in ("layers", "aspp_rates"):
            value = tuple(getattr(self, name)) if isinstance(getattr(self, name), (tuple, list)) else getattr(self, name)
            if not isinstance(value, tuple) or not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                raise ValueError(f"{name} must be a non-empty tuple of ints >= 1, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be distinct timm stages in increasing order (finest first), got {self.layers!r}")
        require_choice(self, "fusion", FUSIONS)
        require_choice(self, "head_norm", HEAD_NORMS)
        require_choice(self, "consistency", CONSISTENCY_LOSSES)
        require_choice(self, "score_loss", SCORE_LOSSES)
        if self.consistency == "off" and self.score_loss == "off":
            raise ValueError(
                "consistency='off' and score_loss='off' leave the segmentation stage without a loss; keep at least one "
                "(consistency='focal_l1' or score_loss='bce' / 'bce_margin')"
            )
        for name in ("fpn_channels", "seg_channels", "top_k"):
            require_int(self, name, 1)
        _non_negative(self, "focal_gamma")
        require_number(self, "margin", at_most=1.0)
        _non_negative(self, "margin_weight")
        for name in ("feature_weight", "consistency_weight", "score_weight"):
            require_number(self, name)
        _non_negative(self, "pseudo_p_normal")
        if not self.pseudo_p_normal < 1.0:
            raise ValueError(f"pseudo_p_normal must be a fraction in [0, 1) (1 would draw no anomaly at all), got {self.pseudo_p_normal!r}")


def _non_negative(config: MLFFConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    object.__setattr__(config, name, float(value))


__all__ = ["CONSISTENCY_LOSSES", "FUSIONS", "HEAD_NORMS", "MLFFConfig", "SCORE_LOSSES", "STAGES", "STRIDE"]
