"""``FastFlow``: frozen extractor -> per-stage LayerNorm over [C, H, W] -> one 2-D flow per stage -> head."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from ... import ops
from ...nn import SampleLayerNorm, enable_fast_paths
from ..base import AnomalyModel, Prediction, TrainRecipe, TrainStage, as_batch
from ..extractor import FeatureExtractor
from ..registry import register
from .config import PRESETS, FastFlowConfig
from .flows import build_stage_flow
from .head import FastFlowHead


class FastFlowOutput(NamedTuple):
    """Output of :meth:`FastFlow.forward`.

    Attributes:
        latents: per-stage ``z_k [B, C_k, h_k, w_k]``.
        logdets: per-stage log-dets ``[B]`` in nats.
    """

    latents: list[torch.Tensor]
    logdets: list[torch.Tensor]


OFFICIAL_RECIPE = TrainRecipe(
    (TrainStage(name="train", epochs=500, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=1e-5, grad_clip=None, drop_last=True),)
)
"""anomalib's and gathierry/FastFlow's recipe: Adam 1e-3, weight decay 1e-5, batch 32 (the last
incomplete batch dropped, as gathierry), 500 epochs, constant rate, no gradient clipping. Both
select epochs on the test set (early stopping, "best" epochs); msflow_fast reports the last."""


@register("fastflow", summary="FastFlow (Yu et al. 2021): 2-D flows on frozen CNN or ViT features; faithful to anomalib 2.7's FastflowModel")
class FastFlow(AnomalyModel):
    """FastFlow (Yu et al., arXiv 2111.07677), as anomalib's ``FastflowModel`` and gathierry/FastFlow
    compute it, on this package's fused blocks.

    Args:
        config: a :class:`FastFlowConfig` (default: the ``resnet18`` preset).
        backbone: a timm model name (sets ``config.backbone``) or an ``nn.Module`` returning a list
            of feature maps (CNN-like; used as given).
        **overrides: :class:`FastFlowConfig` fields to change.

    ``state_dict`` keys: ``flows.{k}.module_list.{i}.{global_scale, global_offset, w_perm,
    w_perm_inv, subnet.0.*, subnet.2.*}`` (anomalib's ``fast_flow_blocks`` and gathierry's
    ``nf_flows``, see :mod:`.official`), ``norms.{k}.{weight, bias}`` and ``extractor.*``.
    The model enables the fast paths of its blocks (1x1 subnets as batched GEMMs, Winograd 3x3
    convolutions at CPU inference); see :func:`msflow_fast.nn.enable_fast_paths`.
    """

    config_class = FastFlowConfig
    presets = PRESETS
    default_recipe = OFFICIAL_RECIPE
    fixed_on_load = ("backbone", "pretrained", "out_indices", "vit_block")
    # A random-initialised resnet18 at 128 px with four steps per stage: no download, a minute on a CPU.
    demo_config = {"input_size": 128, "backbone": "resnet18", "pretrained": False, "flow_steps": 4}
    demo_training = {"epochs": 8, "lr": 1e-3, "batch_size": 8}

    def __init__(self, config: FastFlowConfig | None = None, backbone: nn.Module | str | None = None, **overrides: Any) -> None:
        backbone = self.backbone_module(backbone, overrides)
        super().__init__(self.make_config(config, **overrides))
        config = self.config
        self.extractor = FeatureExtractor(
            backbone if backbone is not None else config.backbone,
            out_indices=config.out_indices,
            pretrained=config.pretrained,
            input_size=config.input_size,
            vit_block=config.vit_block if backbone is None else None,
            precision=config.backbone_precision,
        )
        height, width = config.input_size
        self.channels = list(self.extractor.channels)
        self.grids = [(height // s, width // s) for s in self.extractor.strides]
        if config.feature_norm == "layer_norm":
            norms = [SampleLayerNorm((c, h, w), affine="element") for c, (h, w) in zip(self.channels, self.grids)]
        elif config.feature_norm == "channel":
            norms = [SampleLayerNorm((c, 1, 1), affine="channel") for c in self.channels]
        else:
            norms = []
        self.norms = nn.ModuleList(norms)
        self.flows = nn.ModuleList(
            build_stage_flow(
                c, h, w, config.flow_steps, conv3x3_only=config.conv3x3_only, hidden_ratio=config.hidden_ratio,
                clamp=config.clamp_alpha, clamp_form=config.clamp_form,
            )
            for c, (h, w) in zip(self.channels, self.grids)
        )
        self.head = FastFlowHead(config.score)
        enable_fast_paths(self)
        try:
            self.check_image_size(height, width)
        except ValueError as exc:
            raise ValueError(f"input_size {config.input_size} does not suit this backbone: {exc}") from None

    def check_image_size(self, height: int, width: int) -> None:
        stride = self.extractor.max_stride
        if height % stride or width % stride:
            raise ValueError(f"images height and width must be divisible by the backbone's largest stride {stride}, got {height}x{width}")
        if (height, width) != tuple(self.config.input_size):
            if self.config.vit_block is not None and self.extractor.source != "module":
                raise ValueError(
                    f"images must be {self.config.input_size[0]}x{self.config.input_size[1]}: the vision transformer's "
                    f"position table is built for that size, got {height}x{width}"
                )
            if self.config.feature_norm == "layer_norm":
                raise ValueError(
                    f"images must be {self.config.input_size[0]}x{self.config.input_size[1]}: the [C, H, W] LayerNorms are "
                    f"built for that size, got {height}x{width} (feature_norm='channel' takes any size with a CNN)"
                )

    # ------------------------------------------------------------------ pipeline

    def frozen_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features ``[B, C_k, h_k, w_k]`` in the flows' dtype (no autograd): the frozen part,
        a pure function of the image (the norms after it train)."""
        self.check_images(images, check_finite=None)
        with torch.no_grad():
            feats = self.extractor(images)
        dtype = next(self.flows.parameters()).dtype
        return [f.to(dtype) for f in feats]

    def frozen_fingerprint(self) -> str:
        """Digest of the extractor's state and the config (see :meth:`AnomalyModel.digest_frozen`)."""
        return self.digest_frozen(self.extractor)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The flows' inputs: :meth:`frozen_features`, then the norms."""
        return self.normalize(self.frozen_features(images))

    def normalize(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The per-stage norms (trainable) on backbone features."""
        if len(self.norms):
            return [norm(f) for norm, f in zip(self.norms, features)]
        return list(features)

    def flows_of(self, features: list[torch.Tensor]) -> FastFlowOutput:
        """One flow per stage on normalised features -> ``FastFlowOutput(latents, logdets)``."""
        latents, logdets = [], []
        for flow, feature in zip(self.flows, features):
            z, logdet = flow(feature)
            latents.append(z)
            logdets.append(logdet)
        return FastFlowOutput(latents, logdets)

    def forward(self, images: torch.Tensor) -> FastFlowOutput:
        """``images [B, 3, H, W]`` -> ``FastFlowOutput(latents, logdets)`` (one flow per stage)."""
        return self.flows_of(self.features(images))

    def loss(self, batch: Any) -> torch.Tensor:
        """``sum_k mean_b (0.5 * sum z_k^2 - logdet_k)`` (nats, scalar), as anomalib's ``FastflowLoss``.

        Args:
            batch: images ``[B, 3, H, W]`` or a batch dict: ``"image"``, or ``"features"`` (cached
                :meth:`frozen_features`) instead.
        """
        batch = as_batch(batch)
        raw = batch["features"] if "features" in batch else self.frozen_features(batch["image"])
        latents, logdets = self.flows_of(self.normalize(list(raw)))
        total = None
        for z, logdet in zip(latents, logdets):
            stage = ops.gaussian_nll(z, logdet).mean()
            total = stage if total is None else total + stage
        return total

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Anomaly map ``[B, H, W]`` and image scores ``[B]`` (see :class:`~msflow_fast.models.fastflow.head.FastFlowHead`)."""
        latents, _ = self(images)
        return self.head(latents, tuple(images.shape[-2:]))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, grids={self.grids}"


__all__ = ["FastFlow", "FastFlowOutput", "OFFICIAL_RECIPE"]
