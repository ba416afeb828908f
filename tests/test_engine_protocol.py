"""A tiny stand-in for MSFlow's engine protocol (``loss`` / ``predict``), shared by the engine tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


class TinyFlowModel(nn.Module):
    """Per-pixel affine flow on 4x4-pooled image colours: ``z = (x - mu) * exp(-log_sigma)``.

    ``loss`` is the batch-mean Gaussian NLL (0.5 * sum z^2 minus the log-det, nats), ``predict`` gives
    ``0.5 * mean_c z^2`` upsampled to the input size as both maps and the top-3% mean as the score.
    A fixed random 1x1 "backbone" buffer mimics a frozen extractor.
    """

    def __init__(self, channels: int = 3, input_size: int = 32) -> None:
        super().__init__()
        self.input_size = input_size
        self.register_buffer("mix", torch.eye(channels) + 0.1 * torch.randn(channels, channels))
        self.mu = nn.Parameter(torch.zeros(channels, 1, 1))
        self.log_sigma = nn.Parameter(torch.zeros(channels, 1, 1))
        self.config = SimpleNamespace(input_size=input_size)

    def _latent(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            feats = F.avg_pool2d(torch.einsum("dc,bchw->bdhw", self.mix, images), 4)
        z = (feats - self.mu) * torch.exp(-self.log_sigma)
        logdet = -self.log_sigma.sum() * feats.shape[-2] * feats.shape[-1]
        return z, logdet.expand(images.shape[0])

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        z, logdet = self._latent(images)
        return (0.5 * z.float().pow(2).flatten(1).sum(1) - logdet).mean()

    def predict(self, images: torch.Tensor) -> SimpleNamespace:
        z, _ = self._latent(images)
        m = 0.5 * z.pow(2).mean(1, keepdim=True)
        m = F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
        k = max(1, int(m[0].numel() * 0.03))
        score = m.flatten(1).topk(k, dim=1).values.mean(1)
        return SimpleNamespace(anomaly_map=m, anomaly_map_mul=m, score=score)


def test_stand_in_follows_protocol():
    model = TinyFlowModel(input_size=16)
    x = torch.randn(2, 3, 16, 16)
    loss = model.loss(x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.mu.grad is not None
    pred = model.predict(x)
    assert pred.anomaly_map.shape == (2, 16, 16) and pred.anomaly_map_mul.shape == (2, 16, 16)
    assert pred.score.shape == (2,)
