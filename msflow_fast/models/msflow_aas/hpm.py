"""The hierarchical perception module (HPM): ``msflow_aas``'s coupling subnet, a Res2Net-style
split-and-cascade block. An INTERPRETATION of the abstract's "hierarchical perception module"
(MODELS_SPEC.md Part A §4.3), not the authors' code."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...nn._inference_cache import InferenceCachedModule


class HierarchicalPerceptionModule(InferenceCachedModule):
    """Res2Net-style subnet ``[B, dim_in, H, W] -> [B, dim_out, H, W]`` (INTERPRETATION).

    With ``w = mid / groups``::

        h = ReLU(Conv1x1(dim_in -> mid)(u))
        [g_1, ..., g_s] = split(h, w)                      (s = groups, along channels)
        y_1 = g_1;  y_i = ReLU(Conv3x3(w -> w)(g_i + y_{i-1}))  for i = 2..s
        out = Conv1x1(mid -> dim_out)(concat(y_1, ..., y_s))

    so group ``i`` sees a ``2i - 1`` pixel receptive field (1, 3, 5, 7 for ``s = 4``): features of
    several granularities, fused group by group. Every conv has a bias; the 3x3 convs zero "same"
    padding. Multiply-adds per pixel: ``dim_in * mid + (s - 1) * 9 * w^2 + mid * dim_out``.

    Default PyTorch initialisation, the output conv included (as MSFlow's and FastFlow's subnets on
    :class:`~msflow_fast.nn.AllInOneBlock`): the block's ``alpha * tanh(0.1 a)`` and ``0.1 a``
    already start every coupling close to the identity.

    With :attr:`fast_paths` (see :func:`~msflow_fast.nn.enable_fast_paths`), the 3x3 convs run by
    Winograd at CPU inference (:func:`msflow_fast.ops.conv3x3`), without calling the conv modules.

    ``state_dict`` keys: ``conv_in.*``, ``convs.{i}.*`` (``i = 0..s-2``, the conv of group ``i + 2``),
    ``conv_out.*``.

    Args:
        dim_in: input channels (the coupling's passive half plus any condition channels).
        dim_out: output channels (``2 * (C // 2)`` in an AllInOneBlock: scale half, then shift half).
        mid: hidden width, a multiple of ``groups``.
        groups: ``s >= 1``; ``1`` gives ``Conv1x1 -> ReLU -> Conv1x1``.
    """

    def __init__(self, dim_in: int, dim_out: int, mid: int = 704, groups: int = 4) -> None:
        super().__init__()
        if min(dim_in, dim_out, mid, groups) < 1:
            raise ValueError(f"HierarchicalPerceptionModule needs positive sizes, got dim_in={dim_in}, dim_out={dim_out}, mid={mid}, groups={groups}")
        if mid % groups:
            raise ValueError(f"mid ({mid}) must be a multiple of groups ({groups}) to split the hidden channels into equal groups")
        self.mid, self.groups, self.width = int(mid), int(groups), int(mid) // int(groups)
        self.conv_in = nn.Conv2d(dim_in, mid, 1)
        self.convs = nn.ModuleList(nn.Conv2d(self.width, self.width, 3, padding=1) for _ in range(groups - 1))
        self.conv_out = nn.Conv2d(mid, dim_out, 1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``u [B, dim_in, H, W] -> [B, dim_out, H, W]`` (see the class docstring)."""
        parts = torch.split(F.relu(self.conv_in(u)), self.width, dim=1)
        ys = [parts[0]]
        for i, conv in enumerate(self.convs):
            ys.append(F.relu(self._conv_module(f"convs.{i}", parts[i + 1] + ys[-1], conv)))
        return self.conv_out(torch.cat(ys, dim=1) if len(ys) > 1 else ys[0])

    def extra_repr(self) -> str:
        return f"mid={self.mid}, groups={self.groups}"


def hpm_subnet(mid: int, groups: int) -> Callable[[int, int], HierarchicalPerceptionModule]:
    """A subnet constructor ``f(dim_in, dim_out)`` for :class:`~msflow_fast.nn.AllInOneBlock`
    building :class:`HierarchicalPerceptionModule` with ``mid`` and ``groups``."""

    def make(dim_in: int, dim_out: int) -> HierarchicalPerceptionModule:
        return HierarchicalPerceptionModule(dim_in, dim_out, mid, groups)

    return make


__all__ = ["HierarchicalPerceptionModule", "hpm_subnet"]
