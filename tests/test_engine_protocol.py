"""A tiny registered model that follows the protocol of ``msflow_fast.models.base``, shared by the
engine and CLI tests: the engine must work with it exactly as with MSFlow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msflow_fast.models import registry
from msflow_fast.models.base import (
    AnomalyModel,
    LRSchedule,
    ModelConfig,
    Prediction,
    TrainRecipe,
    TrainStage,
    as_batch,
    normalize_input_size,
)


@dataclass(frozen=True)
class TinyFlowConfig(ModelConfig):
    """Config of :class:`TinyFlowModel`.

    Attributes:
        input_size: image size (H, W).
        channels: image channels the flow models.
        top_k: fraction of pixels in the score.
    """

    input_size: tuple[int, int] = (32, 32)
    channels: int = 3
    top_k: float = 0.03

    def __post_init__(self) -> None:
        normalize_input_size(self)
        if self.input_size[0] % 4 or self.input_size[1] % 4:
            raise ValueError(f"input_size: expected multiples of 4, got {self.input_size}")


TINY_RECIPE = TrainRecipe(
    (TrainStage(name="train", epochs=100, batch_size=8, lr=1e-4, grad_clip=2.0, schedule=LRSchedule(0.12, (0.7, 0.9), 0.33, 0.1)),)
)


@registry.register("tiny_flow", summary="test stand-in: a per-pixel affine flow on pooled colours")
class TinyFlowModel(AnomalyModel):
    """Per-pixel affine flow on 4x4-pooled image colours: ``z = (x - mu) * exp(-log_sigma)``.

    ``loss`` is the batch-mean Gaussian NLL (0.5 * sum z^2 minus the log-det, nats), ``predict`` gives
    ``0.5 * mean_c z^2`` upsampled to the input size as the map (also as ``maps["twin"]``) and the
    top-3% mean as the score. A fixed random 1x1 "backbone" buffer mimics a frozen extractor.
    """

    config_class = TinyFlowConfig
    metric_maps = {"aupro": "twin"}
    demo_config = {"input_size": (32, 32)}
    demo_training = {"epochs": 2, "lr": 0.05, "batch_size": 4}

    def __init__(self, config: TinyFlowConfig | None = None, backbone: Any = None, **overrides: Any) -> None:
        super().__init__(self.make_config(config, **overrides))
        channels = self.config.channels
        self.register_buffer("mix", torch.eye(channels) + 0.1 * torch.randn(channels, channels))
        self.mu = nn.Parameter(torch.zeros(channels, 1, 1))
        self.log_sigma = nn.Parameter(torch.zeros(channels, 1, 1))

    @classmethod
    def recipe_for(cls, config: TinyFlowConfig) -> TrainRecipe:
        return TINY_RECIPE

    def _latent(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            feats = F.avg_pool2d(torch.einsum("dc,bchw->bdhw", self.mix, images), 4)
        z = (feats - self.mu) * torch.exp(-self.log_sigma)
        logdet = -self.log_sigma.sum() * feats.shape[-2] * feats.shape[-1]
        return z, logdet.expand(images.shape[0])

    def loss(self, batch: Any) -> torch.Tensor:
        z, logdet = self._latent(as_batch(batch)["image"])
        return (0.5 * z.float().pow(2).flatten(1).sum(1) - logdet).mean()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        z, _ = self._latent(images)
        m = 0.5 * z.pow(2).mean(1, keepdim=True)
        m = F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
        k = max(1, int(m[0].numel() * self.config.top_k))
        score = m.flatten(1).topk(k, dim=1).values.mean(1)
        return Prediction(m, score, {"twin": m.clone()})


def test_stand_in_follows_protocol():
    model = TinyFlowModel(input_size=16)
    x = torch.randn(2, 3, 16, 16)
    loss = model.loss(x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert model.loss({"image": x, "label": torch.zeros(2)}) == loss
    loss.backward()
    assert model.mu.grad is not None
    pred = model.predict(x)
    assert pred.anomaly_map.shape == (2, 16, 16) and pred.get("twin").shape == (2, 16, 16)
    assert pred.score.shape == (2,)
    assert model.metric_map("aupro") == "twin" and model.metric_map("pixel_auroc") == "anomaly_map"
    assert registry.get("tiny_flow") is TinyFlowModel and model.name == "tiny_flow"
    assert model.input_size == (16, 16)
    with pytest.raises(KeyError, match="twin"):
        pred.get("missing")
