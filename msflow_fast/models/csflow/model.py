"""``CSFlow``: one frozen extractor on the image at three scales -> the cross-scale flow -> head."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...nn import enable_fast_paths
from ..base import AnomalyModel, Prediction, TrainRecipe, TrainStage, as_batch
from ..extractor import FeatureExtractor
from ..registry import register
from .config import CSFlowConfig
from .flows import SCALES, CrossScaleFlow
from .head import predict_from_latents


class CSFlowOutput(NamedTuple):
    """Output of :meth:`CSFlow.forward`.

    Attributes:
        latents: ``[z_0, z_1, z_2]``, ``z_k [B, C, h_k, w_k]`` (scale 0 the finest).
        logdet: ``[B]`` log-det of the whole flow, in nats.
    """

    latents: list[torch.Tensor]
    logdet: torch.Tensor


OFFICIAL_RECIPE = TrainRecipe(
    (TrainStage(name="train", epochs=240, batch_size=16, optimizer="adam", lr=2e-4, eps=1e-4, weight_decay=1e-5, grad_clip=1.0),)
)
"""The official recipe (marco-rudolph/cs-flow ``config.py``/``train.py``): Adam 2e-4, eps 1e-4,
weight decay 1e-5, gradient norm clipped to 1, batch 16 (the last incomplete batch kept), 4 x 60 =
240 epochs at a constant rate, on features extracted once (here: ``fit``'s feature cache). The
official code also reports the best of its four evaluations on the test set; msflow_fast reports
the last epoch."""


@register("csflow", summary="CS-Flow (Rudolph et al., WACV 2022): a cross-scale flow on EfficientNet features of three image scales; faithful to the official code")
class CSFlow(AnomalyModel):
    """CS-Flow (Rudolph et al., WACV 2022), as the official code (marco-rudolph/cs-flow) computes it,
    on this package's fused coupling op.

    The image (``input_size``) and its nearest-neighbour resizes to 1/2 and 1/4 go through one
    frozen extractor (EfficientNet-B5's stage 6 by default: 304 channels at stride 32); the three
    maps go through :class:`~msflow_fast.models.csflow.flows.CrossScaleFlow` jointly.

    Loss (the official ``get_loss``): ``mean_b(0.5 * sum z^2 - logdet) / D`` over all
    ``D = sum_k C h_k w_k`` dimensions, per sample. anomalib 2.7's ``CsFlowLoss`` subtracts instead
    a log-det summed over the whole batch from every sample, weighting the log-det term B times
    more; :func:`~msflow_fast.models.csflow.official.anomalib_loss` computes that for comparison.

    Args:
        config: a :class:`CSFlowConfig`.
        backbone: a timm model name (sets ``config.backbone``) or an ``nn.Module`` returning one
            feature map (or a list holding one) at stride ``s`` for an image; used as given.
        **overrides: :class:`CSFlowConfig` fields to change.

    ``state_dict`` keys: ``flow.permutations.{i}.scales.{k}.{perm, perm_inv}``,
    ``flow.couplings.{i}.subnet_{1,2}.*`` (see :mod:`.official` for the official and anomalib
    names) and ``extractor.*``.
    """

    config_class = CSFlowConfig
    default_recipe = OFFICIAL_RECIPE
    fixed_on_load = ("backbone", "pretrained", "cnn_block")
    # A random-initialised EfficientNet-B0 stage 6 (192 channels) at 256 px, a narrow subnet.
    demo_config = {"input_size": 256, "backbone": "efficientnet_b0", "pretrained": False, "hidden_channels": 96}
    demo_training = {"epochs": 12, "lr": 2e-4, "batch_size": 8}

    def __init__(self, config: CSFlowConfig | None = None, backbone: nn.Module | str | None = None, **overrides: Any) -> None:
        backbone = self.backbone_module(backbone, overrides)
        super().__init__(self.make_config(config, **overrides))
        config = self.config
        self.extractor = FeatureExtractor(
            backbone if backbone is not None else config.backbone,
            pretrained=config.pretrained,
            input_size=config.input_size,
            cnn_block=config.cnn_block if backbone is None else None,
            precision=config.backbone_precision,
        )
        if len(self.extractor.channels) != 1:
            raise ValueError(f"CS-Flow takes one feature map per image scale; the backbone gives {len(self.extractor.channels)}")
        self.channels = self.extractor.channels[0]
        self.stride = self.extractor.strides[0]
        self.flow = CrossScaleFlow(
            self.channels, coupling_blocks=config.coupling_blocks, hidden_channels=config.hidden_channels,
            kernel_sizes=config.kernel_sizes, clamp=config.clamp, leaky_slope=config.leaky_slope,
            use_gamma=config.use_gamma, permutation=config.permutation,
        )
        enable_fast_paths(self)
        try:
            self.check_image_size(*config.input_size)
        except ValueError as exc:
            raise ValueError(f"input_size {config.input_size} does not suit this backbone: {exc}") from None

    def check_image_size(self, height: int, width: int) -> None:
        unit = self.stride * 2 ** (SCALES - 1)
        if height % unit or width % unit:
            raise ValueError(
                f"images height and width must be multiples of {unit} (the backbone's stride {self.stride} x 4, so that "
                f"the three feature grids halve exactly; CS-Flow: multiples of 128), got {height}x{width}"
            )

    # ------------------------------------------------------------------ pipeline

    def frozen_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Extractor features of the image at full, half and quarter size: ``[B, C, H/s/2^k, W/s/2^k]``
        for ``k = 0, 1, 2``, in the flow's dtype (no autograd; the flow's inputs as they are)."""
        self.check_images(images, check_finite=None)
        height, width = images.shape[-2:]
        dtype = next(self.flow.parameters()).dtype
        feats = []
        with torch.no_grad():
            for k in range(SCALES):
                scaled = images if k == 0 else F.interpolate(images, size=(height // 2**k, width // 2**k))
                feats.append(self.extractor(scaled)[0].to(dtype))
        return feats

    def frozen_fingerprint(self) -> str:
        """Digest of the extractor's state and the config (see :meth:`AnomalyModel.digest_frozen`)."""
        return self.digest_frozen(self.extractor)

    def forward(self, images: torch.Tensor) -> CSFlowOutput:
        """``images [B, 3, H, W]`` -> ``CSFlowOutput(latents, logdet)``."""
        return CSFlowOutput(*self.flow(self.frozen_features(images)))

    def loss(self, batch: Any) -> torch.Tensor:
        """The official loss ``mean_b(0.5 * sum z^2 - logdet) / D`` (nats per dimension, scalar).

        Args:
            batch: images ``[B, 3, H, W]`` or a batch dict: ``"image"``, or ``"features"`` (cached
                :meth:`frozen_features`) instead.
        """
        batch = as_batch(batch)
        feats = list(batch["features"]) if "features" in batch else self.frozen_features(batch["image"])
        latents, logdet = self.flow(feats)
        nll = ops.gaussian_nll(latents[0], logdet)
        for z in latents[1:]:
            nll = nll + ops.gaussian_nll(z, torch.zeros_like(logdet))
        dims = sum(z[0].numel() for z in latents)
        return nll.mean() / dims

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Anomaly map ``[B, H, W]`` and image scores ``mean(z^2 / 2)`` ``[B]`` (see :mod:`.head`)."""
        latents, _ = self(images)
        return predict_from_latents(latents, tuple(images.shape[-2:]), self.config.anomaly_map)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}"


__all__ = ["CSFlow", "CSFlowOutput", "OFFICIAL_RECIPE"]
