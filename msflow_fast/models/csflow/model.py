"""``CSFlow``: one frozen extractor on the image at three scales -> the cross-scale flow -> head."""

from __future__ import annotations

import torch

from ..base import Prediction, TrainRecipe, TrainStage
from ..image_pyramid import ImagePyramidFlowModel, PyramidFlowOutput
from ..registry import register
from .config import CSFlowConfig
from .flows import CrossScaleFlow
from .head import predict_from_latents


CSFlowOutput = PyramidFlowOutput
"""Output of :meth:`CSFlow.forward`: ``latents [z_0, z_1, z_2]`` (``z_k [B, C, h_k, w_k]``, scale 0 the
finest) and ``logdet [B]`` in nats."""


OFFICIAL_RECIPE = TrainRecipe(
    (TrainStage(name="train", epochs=240, batch_size=16, optimizer="adam", lr=2e-4, eps=1e-4, weight_decay=1e-5, grad_clip=1.0),)
)
"""The official recipe (marco-rudolph/cs-flow ``config.py``/``train.py``): Adam 2e-4, eps 1e-4,
weight decay 1e-5, gradient norm clipped to 1, batch 16 (the last incomplete batch kept), 4 x 60 =
240 epochs at a constant rate, on features extracted once (here: ``fit``'s feature cache). The
official code also reports the best of its four evaluations on the test set; msflow_fast reports
the last epoch."""


@register("csflow", summary="CS-Flow (Rudolph et al., WACV 2022): a cross-scale flow on EfficientNet features of three image scales; faithful to the official code")
class CSFlow(ImagePyramidFlowModel):
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
    # A random-initialised EfficientNet-B0 stage 6 (192 channels) at 256 px, a narrow subnet.
    demo_config = {"input_size": 256, "backbone": "efficientnet_b0", "pretrained": False, "hidden_channels": 96}
    demo_training = {"epochs": 12, "lr": 2e-4, "batch_size": 8}

    def build_flow(self, channels: int) -> CrossScaleFlow:
        c = self.config
        return CrossScaleFlow(
            channels, coupling_blocks=c.coupling_blocks, hidden_channels=c.hidden_channels, kernel_sizes=c.kernel_sizes,
            clamp=c.clamp, leaky_slope=c.leaky_slope, use_gamma=c.use_gamma, permutation=c.permutation,
        )

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Anomaly map ``[B, H, W]`` and image scores ``mean(z^2 / 2)`` ``[B]`` (see :mod:`.head`)."""
        latents, _ = self(images)
        return predict_from_latents(latents, tuple(images.shape[-2:]), self.config.anomaly_map)



__all__ = ["CSFlow", "CSFlowOutput", "OFFICIAL_RECIPE"]
