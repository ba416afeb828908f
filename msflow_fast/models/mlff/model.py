"""``MLFF``: frozen teacher pyramid + denoising student -> multi-level fusion of their discrepancies ->
segmentation head, trained on pseudo anomalies in two stages. An INTERPRETATION of Tang et al. (2025)
from its abstract (MODELS_SPEC.md Part B §2.3), not the authors' code."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..base import AnomalyModel, Prediction, TrainRecipe, TrainStage, as_batch
from ..extractor import FeatureExtractor
from ..registry import register
from . import losses
from .config import STAGES, STRIDE, MLFFConfig
from .networks import MultiLevelFusion, SegmentationHead, StudentNet, discrepancy, up_to

RECIPE = TrainRecipe((
    TrainStage(name="student", epochs=125, batch_size=32, optimizer="adam", lr=1e-3),
    TrainStage(name="segmentation", epochs=500, batch_size=32, optimizer="adam", lr=1e-3),
))
"""Our stand-in for DeSTSeg's schedule (the paper's is not public): 1000 student steps, then 4000
segmentation steps with the student frozen, at batch 32 on a class of about 256 training images
(125 and 500 epochs). Adam 1e-3 for both stages (DeSTSeg: SGD 0.4 / 0.1 / 0.01 with momentum; the
engine's optimizers are Adam and AdamW), constant rate, no clipping."""


class MLFFOutput(NamedTuple):
    """What :meth:`MLFF.forward` returns for images ``[B, 3, H, W]``.

    Attributes:
        teacher, student: the levels ``[B, C_k, h_k, w_k]``, finest first, both of the input images.
        segmentation: ``Ŷ`` ``[B, h_1, w_1]`` in [0, 1] at the finest level's grid.
    """

    teacher: list[torch.Tensor]
    student: list[torch.Tensor]
    segmentation: torch.Tensor


def _timm_encoder(name: str) -> tuple[nn.Module, int]:
    """A randomly initialised timm ``name`` (``features_only``: its stage maps, the last at stride 32)
    and the channels of that last map, the student's code."""
    try:
        import timm
    except ImportError as exc:
        raise ImportError(f"student_backbone={name!r} needs timm (pip install timm)") from exc
    try:
        encoder = timm.create_model(name, features_only=True, pretrained=False)
    except RuntimeError as exc:
        raise ValueError(f"student_backbone {name!r}: timm cannot build it as a CNN feature extractor ({exc}); use a timm CNN "
                         "name such as resnet18 (timm.list_models())") from None
    reductions = list(encoder.feature_info.reduction())
    if reductions[-1] != STRIDE:
        raise ValueError(f"student_backbone {name!r} does not end at stride {STRIDE} (its strides: {reductions}); use a CNN such as resnet18")
    return encoder, int(encoder.feature_info.channels()[-1])


@register(
    "mlff",
    summary="MLFF (Tang et al., J. National Univ. Defense Technology 2025), an interpretation from the abstract, not the "
    "authors' code: teacher-student discrepancies fused over levels (FPN) into a segmentation head, trained on pseudo anomalies",
    interpretation=True,
)
class MLFF(AnomalyModel):
    """An INTERPRETATION of the multi-level feature fusion network of Tang, Zuo, Zhang, Wang, Wang
    ("Image anomaly detection algorithm using multi-level feature fusion network", Journal of
    National University of Defense Technology 2025, 47(2):173-182; MVTec AD 98.7 image AUROC, 97.9
    pixel AUROC, 94.2 PRO). Only the abstract is public; the network, losses, sizes and recipe here
    are this package's reading of it on DeSTSeg's skeleton (MODELS_SPEC.md Part B §2.3).

    What the abstract states, and how it is read here:

    - "pseudo anomalies generated with anomaly prior knowledge turn AD into supervised learning":
      every stage trains on the engine's pseudo-anomaly generator (DRAEM texture, CutPaste, scar,
      NSA Poisson blend; category rotation and foreground priors), new anomalies every epoch
      (:meth:`pseudo_anomalies`);
    - "a multi-level feature fusion network": the per-level teacher-student discrepancies
      ``D_k = -T̂_k ⊙ Ŝ_k`` go through an FPN top-down path, concatenated with the plain levels,
      into a segmentation head (:class:`~.networks.MultiLevelFusion`, ``fusion="concat"`` is the
      DeSTSeg baseline);
    - "a feature constraint loss": the student reproduces the frozen teacher's features of the
      CLEAN image from the corrupted one (cosine, DeSTSeg's);
    - "a score constraint loss and a consistency constraint loss": BCE + margin on the image score,
      focal + L1 between the map and the pseudo mask (:mod:`.losses`; each switchable).

    Stages (:data:`RECIPE`): ``"student"`` trains the student on the feature loss; ``"segmentation"``
    freezes it (eval mode) and trains the fusion and the head on the consistency and score losses.

    ``predict``: ``anomaly_map`` = ``Ŷ`` bilinearly upsampled to the input size; ``score`` = the
    mean of its ``top_k`` largest pixels. ``maps`` adds ``"student_teacher"`` (``sum_k Up(1 - cos_k)``)
    and its top-k ``"score_student_teacher"``.

    Args:
        config: a :class:`MLFFConfig`.
        backbone: a timm model name (sets ``config.backbone``) or an ``nn.Module`` returning the
            teacher's feature maps; used as given.
        **overrides: :class:`MLFFConfig` fields to change.

    ``state_dict`` keys: ``teacher.*`` (a pretrained teacher is not stored in checkpoints),
    ``student.encoder.*``, ``student.decoder.*``, ``fusion.*``, ``head.*``.
    """

    config_class = MLFFConfig
    default_recipe = RECIPE
    # A random-initialised ResNet-18 teacher (no download) at 128 px, a narrow head.
    demo_config = {"input_size": 128, "pretrained": False, "fpn_channels": 32, "seg_channels": 64, "top_k": 50}
    demo_training = {"epochs": 8, "lr": 1e-3, "batch_size": 8}

    def __init__(self, config: MLFFConfig | None = None, *, backbone: nn.Module | str | None = None, **overrides: Any) -> None:
        module = self.backbone_module(backbone, overrides)
        config = self.make_config(config, **overrides)
        super().__init__(config)
        c = config
        self.teacher = FeatureExtractor(module if module is not None else c.backbone, out_indices=c.layers, pretrained=c.pretrained,
                                        input_size=c.input_size)
        encoder, encoder_channels = _timm_encoder(c.student_backbone)
        channels = self.teacher.channels
        self.student = StudentNet(encoder, encoder_channels, channels)
        self.fusion = MultiLevelFusion(channels, c.fusion, c.fpn_channels)
        self.head = SegmentationHead(self.fusion.out_channels, c.seg_channels, c.aspp_rates, c.head_norm)
        self.stage = STAGES[0]

    # -------------------------------------------------------------- protocol

    def check_image_size(self, height: int, width: int) -> None:
        if height % STRIDE or width % STRIDE:
            raise ValueError(f"images of {height}x{width}: MLFF needs both sides multiples of {STRIDE} (config input_size {self.input_size})")

    def pseudo_anomalies(self, stage: str) -> dict[str, Any]:
        """Every stage trains on pseudo anomalies: the engine's generator defaults, ``p_normal`` from the config."""
        return {"p_normal": self.config.pseudo_p_normal}

    def set_stage(self, stage: str) -> None:
        """``"student"``: only the student trains; ``"segmentation"``: the student is frozen (and kept
        in eval mode), the fusion and the head train."""
        if stage not in STAGES:
            raise ValueError(f"MLFF has the stages {STAGES}, got {stage!r}")
        self.stage = stage
        self.student.requires_grad_(stage == "student")
        for part in (self.fusion, self.head):
            part.requires_grad_(stage == "segmentation")
        self.train(self.training)

    def train(self, mode: bool = True) -> "MLFF":
        super().train(mode)
        if self.stage == "segmentation":
            self.student.eval()
        return self

    def forward(self, images: torch.Tensor) -> MLFFOutput:
        """Teacher and student levels of ``images`` ``[B, 3, H, W]`` and the segmentation ``Ŷ`` ``[B, h_1, w_1]``."""
        images = self.check_images(images, None)
        teacher = self.teacher(images)
        student = self.student(images, [t.shape[-2:] for t in teacher])
        return MLFFOutput(teacher, student, self.segment(teacher, student))

    def segment(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
        """``Ŷ`` ``[B, h_1, w_1]`` from the levels: fusion of ``D_k = -T̂_k ⊙ Ŝ_k``, then the head."""
        return self.head(self.fusion([discrepancy(t, s) for t, s in zip(teacher, student)]))[:, 0]

    def loss_terms(self, batch: Any, stage: str | None = None) -> dict[str, torch.Tensor]:
        """The unweighted terms of ``stage`` (default: the current one) that are switched on:
        ``{"feature"}`` for ``"student"``; ``{"consistency", "score"}`` (those not ``"off"``) for
        ``"segmentation"``.

        The batch (:func:`~msflow_fast.models.base.as_batch`): ``"image"`` ``[B, 3, H, W]`` (the
        corrupted images), ``"clean_image"`` (the good images before the anomaly: the teacher's
        target; default: ``"image"``, right for good images), ``"mask"`` ``[B, H, W]`` (default: no
        anomaly) and ``"label"`` ``[B]`` (default: whether the mask is non-empty).
        """
        stage = self.stage if stage is None else stage
        if stage not in STAGES:
            raise ValueError(f"MLFF has the stages {STAGES}, got {stage!r}")
        batch = as_batch(batch)
        images = self.check_images(batch["image"], None)
        c = self.config
        if stage == "student":
            clean = batch.get("clean_image", images)
            if not isinstance(clean, torch.Tensor) or clean.shape != images.shape:
                raise ValueError(f"batch 'clean_image' must be a tensor shaped as 'image' {tuple(images.shape)}, got "
                                 f"{tuple(clean.shape) if isinstance(clean, torch.Tensor) else type(clean).__name__}")
            target = self.teacher(clean.to(images.dtype))
            student = self.student(images, [t.shape[-2:] for t in target])
            return {"feature": losses.feature_loss(target, student)}
        mask = batch.get("mask")
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], device=images.device)
        mask = mask.to(images.device)
        label = batch.get("label")
        label = (mask.flatten(1) > 0).any(1) if label is None else torch.as_tensor(label, device=images.device)
        with torch.no_grad():
            teacher = self.teacher(images)
            student = self.student(images, [t.shape[-2:] for t in teacher])
        prob = self.segment(teacher, student)
        terms: dict[str, torch.Tensor] = {}
        if c.consistency == "focal_l1":
            terms["consistency"] = losses.consistency_loss(prob, mask, c.focal_gamma)
        if c.score_loss != "off":
            score = losses.top_k_score(up_to(prob[:, None], images.shape[-2:])[:, 0], c.top_k)
            terms["score"] = losses.score_loss(score, label, margin=c.margin, margin_weight=c.margin_weight,
                                               with_margin=c.score_loss == "bce_margin")
        return terms

    def loss(self, batch: Any) -> torch.Tensor:
        """The current stage's weighted sum of :meth:`loss_terms` (``feature_weight``,
        ``consistency_weight``, ``score_weight``)."""
        weights = {"feature": self.config.feature_weight, "consistency": self.config.consistency_weight, "score": self.config.score_weight}
        return sum(weights[name] * value for name, value in self.loss_terms(batch).items())

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """``anomaly_map`` ``[B, H, W]`` (``Ŷ`` upsampled), ``score`` ``[B]`` (its top-k mean), and the
        student-teacher map ``sum_k Up(1 - cos_k)`` with its top-k score in ``maps``."""
        out = self(images)
        size = images.shape[-2:]
        anomaly_map = up_to(out.segmentation[:, None], size)[:, 0]
        st = sum(up_to((1.0 - F.cosine_similarity(t, s, dim=1))[:, None], size)[:, 0] for t, s in zip(out.teacher, out.student))
        k = self.config.top_k
        return Prediction(anomaly_map, losses.top_k_score(anomaly_map, k),
                          {"student_teacher": st, "score_student_teacher": losses.top_k_score(st, k)})

    def extra_repr(self) -> str:
        return f"fusion={self.config.fusion!r}, stage={self.stage!r}, interpretation=True"


__all__ = ["MLFF", "MLFFOutput", "RECIPE"]
