"""Per-sample LayerNorm over [C, H, W] (FastFlow's feature norm): a drop-in for ``nn.LayerNorm([C, H, W])``
and a size-agnostic variant with a per-channel affine."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import ops

AFFINES = ("element", "channel", "none")


class SampleLayerNorm(nn.Module):
    """``LayerNorm`` over every non-batch dimension of each sample, by :func:`msflow_fast.ops.sample_layer_norm`.

    With ``affine="element"`` it is ``nn.LayerNorm(shape)`` for ``shape = (C, H, W)``: the same
    maths and the same ``state_dict`` keys (``weight``, ``bias`` of that shape), so it loads
    FastFlow's checkpoints, and it ties the model to one input size. ``affine="channel"``
    normalises the same way but learns one scale and shift per channel (``weight``, ``bias`` of
    shape ``[C, 1, 1]``, broadcast over any trailing dims): any size. ``affine="none"`` has no
    parameters.

    Args:
        shape: ``(C, H, W)`` (``"element"``), or ``(C, ...)`` (``"channel"``: only C is used).
        affine: ``"element"``, ``"channel"`` or ``"none"``.
        eps: variance epsilon.
    """

    def __init__(self, shape: Sequence[int], affine: str = "element", eps: float = 1e-5) -> None:
        super().__init__()
        if affine not in AFFINES:
            raise ValueError(f"affine must be one of {AFFINES}, got {affine!r}")
        shape = tuple(int(d) for d in shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"shape must be positive dims (C, H, W), got {shape}")
        self.shape, self.affine, self.eps = shape, affine, float(eps)
        if affine == "element":
            self.weight = nn.Parameter(torch.ones(shape))
            self.bias = nn.Parameter(torch.zeros(shape))
        elif affine == "channel":
            self.weight = nn.Parameter(torch.ones(shape[0], 1, 1))
            self.bias = nn.Parameter(torch.zeros(shape[0], 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *shape] -> [B, *shape]`` (``"element"``) or ``[B, C, ...]`` of any size (else)."""
        if self.affine == "element":
            if tuple(x.shape[1:]) != self.shape:
                raise ValueError(
                    f"SampleLayerNorm({self.shape}) got input {tuple(x.shape)}: its element-wise affine fixes the "
                    "input size (build the model for this size, or use affine='channel')"
                )
            return ops.sample_layer_norm(x, self.weight, self.bias, eps=self.eps)
        normed = ops.sample_layer_norm(x, eps=self.eps)
        if self.affine == "none":
            return normed
        if x.dim() < 2 or x.shape[1] != self.shape[0]:
            raise ValueError(f"SampleLayerNorm with a channel affine of {self.shape[0]} channels got input {tuple(x.shape)}")
        per_channel = (self.shape[0],) + (1,) * (x.dim() - 2)  # [C, 1, ...] broadcast over the rest
        return torch.addcmul(self.bias.view(per_channel).to(normed.dtype), normed, self.weight.view(per_channel).to(normed.dtype))

    def extra_repr(self) -> str:
        return f"{self.shape}, affine={self.affine!r}, eps={self.eps}"


__all__ = ["AFFINES", "SampleLayerNorm"]
