"""The trainable parts of ``mlff`` (an INTERPRETATION, see the package docstring): the denoising
student, the multi-level fusion of teacher-student discrepancies and the segmentation head.

Shapes are for ResNet-18 taps layer1-3 at 256 px: levels ``[B, 64, 64, 64]``, ``[B, 128, 32, 32]``,
``[B, 256, 16, 16]``; the segmentation map is ``[B, 1, 64, 64]`` (the finest level's grid).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ASPP", "BasicBlock", "MultiLevelFusion", "NORMS", "SegmentationHead", "StudentNet", "discrepancy", "make_norm", "up_to"]


def up_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``[B, C, h, w]`` to ``size`` (align_corners=False); unchanged when equal."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def discrepancy(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``D = -T̂ ⊙ Ŝ`` ``[B, C, h, w]``, with ``^`` the L2 normalisation over channels (DeSTSeg's input
    of the segmentation network; ``-sum_c D`` is the cosine similarity)."""
    return -F.normalize(teacher, dim=1) * F.normalize(student, dim=1)


NORMS = ("batch", "group")


def make_norm(kind: str, channels: int) -> nn.Module:
    """``"batch"``: ``BatchNorm2d``; ``"group"``: ``GroupNorm`` with 8 groups (1 when ``channels``
    is not a multiple of 8), the same in training and evaluation."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1, norm: str = "batch") -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False), make_norm(norm, cout), nn.ReLU(inplace=True))


class StudentNet(nn.Module):
    """Encoder-decoder student: a randomly initialised timm CNN's deepest stage (stride 32), then one
    decoder block per teacher level, coarsest first: bilinear resize to the level's grid,
    ``(conv3x3 + BN + ReLU) x 2`` to the level's channels. No skip connections (a choice here: the
    student must rebuild the clean features from the corrupted image's deepest code).

    ``forward(images [B, 3, H, W]) -> [S_1 .. S_L]``, ``S_k [B, C_k, h_k, w_k]`` as the teacher's levels.
    """

    def __init__(self, encoder: nn.Module, encoder_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.channels = [int(c) for c in channels]
        blocks, cin = [], int(encoder_channels)
        for c in reversed(self.channels):
            blocks.append(nn.Sequential(_conv_bn_relu(cin, c), _conv_bn_relu(c, c)))
            cin = c
        self.decoder = nn.ModuleList(blocks)  # coarsest level first

    def forward(self, images: torch.Tensor, grids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The student's levels for ``images``; ``grids``: the teacher's ``(h_k, w_k)``, finest first."""
        out = self.encoder(images)
        x = out[-1] if isinstance(out, (list, tuple)) else out
        levels = []
        for block, grid in zip(self.decoder, reversed(list(grids))):
            x = block(up_to(x, grid))
            levels.append(x)
        return levels[::-1]


class MultiLevelFusion(nn.Module):
    """Fuses the per-level discrepancies ``D_1..D_L`` (finest first) into one map at ``D_1``'s grid.

    ``"fpn"``: ``P_L = conv1x1(D_L)``, ``P_k = conv1x1(D_k) + Up(P_{k+1})``;
    ``Z = concat(P_1, Up(P_2) .. Up(P_L), D_1, Up(D_2) .. Up(D_L))``, ``L * fpn_channels + sum C_k``
    channels. ``"concat"``: ``Z = concat(D_1, Up(D_2) .. Up(D_L))``, ``sum C_k`` channels.
    """

    def __init__(self, channels: Sequence[int], mode: str = "fpn", fpn_channels: int = 128) -> None:
        super().__init__()
        if mode not in ("fpn", "concat"):
            raise ValueError(f"fusion must be 'fpn' or 'concat', got {mode!r}")
        self.mode = mode
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_channels, 1) for c in channels) if mode == "fpn" else nn.ModuleList()
        self.out_channels = sum(channels) + (len(channels) * fpn_channels if mode == "fpn" else 0)

    def forward(self, discrepancies: Sequence[torch.Tensor]) -> torch.Tensor:
        grid = discrepancies[0].shape[-2:]
        parts = [up_to(d, grid) for d in discrepancies]
        if self.mode == "fpn":
            pyramid: list[torch.Tensor] = []
            top = None
            for d, lateral in zip(reversed(discrepancies), reversed(self.lateral)):
                p = lateral(d) if top is None else lateral(d) + up_to(top, d.shape[-2:])
                pyramid.append(p)
                top = p
            parts = [up_to(p, grid) for p in reversed(pyramid)] + parts
        return torch.cat(parts, dim=1)


class BasicBlock(nn.Module):
    """ResNet basic block ``cin -> cout`` (a 1x1 conv + norm shortcut when the widths differ);
    ``norm``: see :func:`make_norm`."""

    def __init__(self, cin: int, cout: int, norm: str = "batch") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), make_norm(norm, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), make_norm(norm, cout),
        )
        self.shortcut = nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), make_norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one dilated 3x3 branch per rate and an image-pool
    branch (each conv + BN + ReLU), concatenated and projected back to ``channels`` by a 1x1 conv + BN + ReLU."""

    def __init__(self, channels: int, rates: Sequence[int], norm: str = "batch") -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(channels, channels, 1, norm=norm)] + [_conv_bn_relu(channels, channels, 3, r, norm=norm) for r in rates]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1, bias=False), nn.ReLU(inplace=True))
        self.project = _conv_bn_relu(channels * (len(rates) + 2), channels, 1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class SegmentationHead(nn.Module):
    """``Z [B, C, h, w] -> Ŷ [B, 1, h, w]`` in [0, 1]: 2 x BasicBlock(C -> width), ASPP(width, rates),
    conv3x3 + BN + ReLU, conv1x1 to one channel, sigmoid (DeSTSeg's head); ``norm="group"`` puts
    GroupNorm in place of every BatchNorm (:func:`make_norm`)."""

    def __init__(self, cin: int, width: int = 256, rates: Sequence[int] = (6, 12, 18), norm: str = "batch") -> None:
        super().__init__()
        self.blocks = nn.Sequential(BasicBlock(cin, width, norm), BasicBlock(width, width, norm))
        self.aspp = ASPP(width, rates, norm)
        self.out = nn.Sequential(_conv_bn_relu(width, width, norm=norm), nn.Conv2d(width, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(self.aspp(self.blocks(z))))
