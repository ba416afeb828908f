"""``MSFlow``: frozen extractor -> pooling -> parallel flows (positional condition) -> fusion flow -> head."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...nn import enable_fast_paths
from ..base import AnomalyModel, LRSchedule, Prediction, TrainRecipe, TrainStage, as_batch
from ..extractor import FeatureExtractor
from ..positional import PositionalEncoding2d
from ..registry import register
from .config import MSFlowConfig
from .flows import FusionFlow, build_parallel_flows
from .head import MSFlowHead


class FlowOutput(NamedTuple):
    """Output of :meth:`MSFlow.forward`.

    Attributes:
        latents: per-scale ``z_k [B, C_k, h_k, w_k]``.
        logdet: total log-det ``[B]`` in nats (all parallel flows plus the fusion flow).
    """

    latents: list[torch.Tensor]
    logdet: torch.Tensor


OFFICIAL_WEIGHTS = {"wide_resnet50_2": "tv_in1k"}
"""timm tags of the official extractor's weights: torchvision's V1 weights (timm's default for
``wide_resnet50_2`` is another training)."""

OFFICIAL_RECIPE = TrainRecipe(
    (
        TrainStage(
            name="train",
            epochs=100,
            batch_size=8,
            optimizer="adam",
            lr=1e-4,
            grad_clip=2.0,
            schedule=LRSchedule(warmup=0.12, milestones=(0.7, 0.9), gamma=0.33, warmup_start=0.1),
        ),
    )
)
"""The official schedule (MSFLOW_SPEC.md §1.12): 100 epochs (the official sub-epochs), Adam 1e-4,
linear warm-up from 0.1 over 12 epochs, x0.33 at epochs 70 and 90, gradient norm clipped to 2,
batch 8. For other epoch counts warm-up and milestones scale proportionally."""


@register("msflow", summary="MSFlow (Zhou et al., TNNLS 2024): multi-scale parallel flows + fusion flow; official code cool-xuan/msflow")
class MSFlow(AnomalyModel):
    """Multi-scale flow anomaly detector (MSFlow, TNNLS 2024), built on this package's fused modules.

    Args:
        config: an :class:`MSFlowConfig` (default: the official configuration).
        backbone: a timm model name (sets ``config.backbone``) or an ``nn.Module`` returning a
            list of feature maps, used as given (its channels and strides are inferred;
            ``config.reflect_padding`` applies only to backbones built from a name).
        **overrides: :class:`MSFlowConfig` fields to change, e.g. ``parallel_blocks=(1, 1, 1)``.

    The backbone is frozen and runs under ``no_grad``. Parameters live in ``parallel_flows``
    (``flows.{k}.module_list.{i}.*``, FrEIA SequenceINN keys) and ``fusion_flow``
    (``permutations.{k}.*`` keyed by scale, ``coupling.*``). The model enables the fast paths of
    its blocks (:func:`msflow_fast.nn.enable_fast_paths`): fused LayerNorm, the cached
    positional-condition share of the first subnet convolution and, at CPU inference, Winograd
    convolutions; ``enable_fast_paths(model, False)`` makes every submodule a plain module again.

    :meth:`predict` returns a :class:`~msflow_fast.models.base.Prediction`: ``anomaly_map`` is the
    "add" map (pixel AUROC), ``maps["anomaly_map_mul"]`` the "mul" map (AUPRO) and ``score`` the
    score chosen by ``config.score`` (see :class:`~msflow_fast.models.msflow.head.MSFlowHead`).
    """

    config_class = MSFlowConfig
    metric_maps = {"pixel_auroc": "anomaly_map", "aupro": "anomaly_map_mul", "spro": "anomaly_map_mul"}
    default_recipe = OFFICIAL_RECIPE
    fixed_on_load = ("backbone", "pretrained", "out_indices")
    # A random-initialised resnet18 at 128 px with one block per scale: no download, minutes on a CPU.
    demo_config = {"input_size": 128, "backbone": "resnet18", "pretrained": False, "parallel_blocks": (1, 1, 1)}
    demo_training = {"epochs": 6, "lr": 1e-3, "batch_size": 8}

    def __init__(self, config: MSFlowConfig | None = None, backbone: nn.Module | str | None = None, **overrides: Any) -> None:
        backbone = self.backbone_module(backbone, overrides)
        super().__init__(self.make_config(config, **overrides))
        config = self.config
        self.extractor = FeatureExtractor(
            backbone if backbone is not None else config.backbone,
            out_indices=config.out_indices,
            pretrained=config.pretrained,
            reflect_padding=config.reflect_padding and backbone is None,
            input_size=config.input_size,
            weights_tag=OFFICIAL_WEIGHTS.get(config.backbone),
            precision=config.backbone_precision,
        )
        channels = self.extractor.channels
        if len(channels) != len(config.parallel_blocks):
            raise ValueError(
                f"the backbone returns {len(channels)} feature maps (channels {channels}) but parallel_blocks "
                f"{config.parallel_blocks} has {len(config.parallel_blocks)} entries; they must match"
            )
        self.channels = list(channels)
        self.positional = PositionalEncoding2d(config.c_cond)
        self.parallel_flows = build_parallel_flows(
            channels, config.parallel_blocks, config.c_cond, config.clamp_alpha, clamp_form=config.clamp_form
        )
        self.fusion_flow = FusionFlow(channels, clamp=config.clamp_alpha)
        self.head = MSFlowHead(config.top_k, config.score)
        enable_fast_paths(self)
        try:
            self.check_image_size(*config.input_size)
        except ValueError as exc:
            raise ValueError(f"input_size {config.input_size} does not suit this backbone: {exc}") from None

    def check_image_size(self, height: int, width: int) -> None:
        stride = self.extractor.max_stride
        if height % stride or width % stride:
            raise ValueError(
                f"images height and width must be divisible by the backbone's largest stride {stride}, "
                f"got {height}x{width}; resize to e.g. {max(2 * stride, height // stride * stride)}x{max(2 * stride, width // stride * stride)}"
            )
        if min(height, width) < 2 * stride:
            raise ValueError(
                f"images must be at least {2 * stride}x{2 * stride} for this backbone (its deepest maps are 1/{stride} "
                f"of the image: at {height}x{width} they would be {height // stride}x{width // stride}, too small for "
                "the 3x3 convolutions and pooling); use a larger input size"
            )

    # ------------------------------------------------------------------ pipeline

    def _pool(self, feature: torch.Tensor) -> torch.Tensor:
        if self.config.pool_type == "avg":
            return F.avg_pool2d(feature, 3, 2, 1)
        if self.config.pool_type == "max":
            return F.max_pool2d(feature, 3, 2, 1)
        return feature

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Pooled backbone features ``y_k [B, C_k, h_k, w_k]`` (no autograd)."""
        self.check_images(images, check_finite=None)  # NaN/inf: only when asked (see check_finite)
        with torch.no_grad():
            feats = self.extractor(images)
            dtype = next(self.parallel_flows.parameters()).dtype
            return [self._pool(f).to(dtype) for f in feats]

    def flows(self, features: list[torch.Tensor]) -> FlowOutput:
        """Parallel flows (with positional conditions) then the fusion flow."""
        conds = [self.positional(f.shape[0], f.shape[2], f.shape[3], f.device, f.dtype) for f in features]
        outs, logdets = self.parallel_flows(features, conds)
        latents, logdet_fusion = self.fusion_flow(outs)
        return FlowOutput(latents, sum(logdets) + logdet_fusion)

    def forward(self, images: torch.Tensor) -> FlowOutput:
        """``images [B, 3, H, W]`` -> ``FlowOutput(latents, logdet [B])``.

        Images are validated by :meth:`check_images`; NaN/inf values are rejected only when the
        finiteness check is on (see :attr:`check_finite`), otherwise they give non-finite outputs.
        """
        return self.flows(self.features(images))

    def frozen_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`features`: the pooled backbone features, a pure function of the image."""
        return self.features(images)

    def frozen_fingerprint(self) -> str:
        """Digest of the extractor's state and the config (see :meth:`AnomalyModel.digest_frozen`)."""
        return self.digest_frozen(self.extractor)

    def loss(self, batch: Any) -> torch.Tensor:
        """Official training loss: mean over the batch of ``sum_k 0.5 * sum z_k^2 - logdet`` (nats, scalar).

        Args:
            batch: images ``[B, 3, H, W]`` or a batch dict: ``"image"``, or ``"features"`` (cached
                :meth:`frozen_features`) instead.
        """
        batch = as_batch(batch)
        features = batch["features"] if "features" in batch else self.features(batch["image"])
        latents, logdet = self.flows(list(features))
        nll = ops.gaussian_nll(latents[0], logdet)
        for z in latents[1:]:
            nll = nll + ops.gaussian_nll(z, torch.zeros_like(logdet))
        return nll.mean()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Anomaly maps ``[B, H, W]`` at the input resolution and image scores ``[B]`` (see the class)."""
        latents, _ = self(images)
        return self.head(latents, tuple(images.shape[-2:]))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, strides={self.extractor.strides}"


__all__ = ["FlowOutput", "MSFlow", "OFFICIAL_RECIPE"]
