"""``MSFlowAAS``: one frozen extractor on the image at three scales -> the hierarchical flow -> head.
An INTERPRETATION of MS-Flow (Acta Automatica Sinica 2024) from its abstract, not the authors' code."""

from __future__ import annotations

import torch

from ...nn import enable_fast_paths
from ..base import Prediction, TrainRecipe, TrainStage
from ..image_pyramid import ImagePyramidFlowModel, PyramidFlowOutput
from ..registry import register
from .config import MSFlowAASConfig
from .flows import HierarchicalFlow
from .head import predict_from_latents


MSFlowAASOutput = PyramidFlowOutput
"""Output of :meth:`MSFlowAAS.forward`: ``latents [z_0, z_1, z_2]`` (``z_l [B, C_l, h_l, w_l]``, level 0
the finest) and ``logdet [B]`` in nats."""


RECIPE = TrainRecipe(
    (TrainStage(name="train", epochs=240, batch_size=16, optimizer="adam", lr=2e-4, eps=1e-4, weight_decay=1e-5, grad_clip=1.0),)
)
"""CS-Flow's official recipe, taken for this interpretation (the paper's is not public): Adam 2e-4,
eps 1e-4, weight decay 1e-5, gradient norm clipped to 1, batch 16, 240 epochs at a constant rate, on
features computed once (``fit``'s feature cache), no augmentation."""


@register(
    "msflow_aas",
    summary="MS-Flow (Mao et al., Acta Automatica Sinica 2024), an interpretation from the abstract, not the authors' code: "
    "a coarse-to-fine multi-scale flow with Res2Net-style subnets on CS-Flow's features (not MSFlow, TNNLS 2024)",
    interpretation=True,
)
class MSFlowAAS(ImagePyramidFlowModel):
    """An INTERPRETATION of MS-Flow (Mao, Wu, Xing, Acta Automatica Sinica 2024, 50(3)) from the
    paper's abstract: the full text and code are not public, so the architecture, sizes, loss,
    scores and recipe are this package's choices (MODELS_SPEC.md Part A §4.3), not the authors'
    method. It is not MSFlow of Zhou et al. (TNNLS 2024, ``msflow``).

    What the abstract states, and how it is read here:

    - "a hierarchical multi-scale architecture inside the flow, avoiding redundant cross computation":
      three flow levels run coarse to fine, the finer one conditioned on the coarser one's latent
      (or fed its factored-out half, ``wiring="split"``), instead of CS-Flow's bidirectional
      cross-scale convolutions in every block (:class:`~.flows.HierarchicalFlow`);
    - "a hierarchical perception module fusing multi-granular features layer by layer": a
      Res2Net-style subnet in every coupling (:class:`~.hpm.HierarchicalPerceptionModule`);
    - "about 1/8 of CS-Flow's FLOPs": the default widths give flows of 1/8.0 of CS-Flow's flow FLOPs
      at 768 and 256 px, measured (see :class:`MSFlowAASConfig`).

    Features as CS-Flow's: the image (``input_size``) and its nearest-neighbour resizes to 1/2 and
    1/4 go through one frozen extractor (EfficientNet-B5's stage 6 by default: 304 channels at
    stride 32; 24/12/6 grids at 768 px).

    Loss (CS-Flow's form): ``mean_b(0.5 * sum z^2 - logdet) / D`` over all ``D = sum_l C_l h_l w_l``
    latent dimensions (nats per dimension). Scores and maps: see :mod:`.head`.

    Args:
        config: a :class:`MSFlowAASConfig`.
        backbone: a timm model name (sets ``config.backbone``) or an ``nn.Module`` returning one
            feature map (or a list holding one) for an image; used as given.
        **overrides: :class:`MSFlowAASConfig` fields to change.

    ``state_dict`` keys: ``flow.levels.{l}.module_list.{k}.*`` (AllInOneBlock keys, the HPM under
    ``subnet.*``) and ``extractor.*``.
    """

    config_class = MSFlowAASConfig
    default_recipe = RECIPE
    # A random-initialised EfficientNet-B0 stage 6 (192 channels) at 256 px, narrow and shallow levels.
    demo_config = {"input_size": 256, "backbone": "efficientnet_b0", "pretrained": False, "blocks_per_level": 4, "hpm_mid": 96}
    demo_training = {"epochs": 40, "lr": 1e-3, "batch_size": 8}  # the loss still falls steeply at 12

    def build_flow(self, channels: int) -> HierarchicalFlow:
        c = self.config
        return HierarchicalFlow(
            channels, blocks_per_level=c.blocks_per_level, hpm_mid=c.hpm_mid, hpm_groups=c.hpm_groups, clamp=c.clamp, wiring=c.wiring,
        )

    def enable_fast_paths(self, enabled: bool = True) -> int:
        """Switch the flow's fast paths (:data:`msflow_fast.nn.FAST_PATHS`: Winograd 3x3 convs in the
        HPMs at CPU inference); on from construction. Returns the number of modules switched."""
        return enable_fast_paths(self, enabled)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Anomaly map ``[B, H, W]`` and image scores ``[B]`` (see :func:`.head.predict_from_latents`)."""
        latents, _ = self(images)
        c = self.config
        return predict_from_latents(latents, tuple(images.shape[-2:]), anomaly_map=c.anomaly_map, score=c.score, top_k=c.top_k)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}, interpretation=True"


__all__ = ["MSFlowAAS", "MSFlowAASOutput", "RECIPE"]
