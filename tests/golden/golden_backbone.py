"""The backbone and config of the MSFlow golden fixture (never change them: the fixture pins them)."""

from __future__ import annotations

import torch
from torch import nn

# 16 / 32 / 64 channels at strides 4 / 8 / 16: at 96 px the second scale's subnets (32 input
# channels, 16 tiles over a batch of 4) take the CPU Winograd path in predict.
GOLDEN_CONFIG = dict(input_size=96, c_cond=16, parallel_blocks=(1, 2, 1), pretrained=False, clamp_alpha=1.9)


class GoldenBackbone(nn.Module):
    """Three feature maps ``[B, 16|32|64, H/4|H/8|H/16, W/..]``; batch norm in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 4, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.stem(x)
        b = self.layer2(a)
        return [a, b, self.layer3(b)]
