"""2-D sinusoidal positional encoding (MSFlow / CFlow-AD ``positionalencoding2d``), cached per size."""

from __future__ import annotations

import math

import torch
from torch import nn


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """Encoding ``[channels, height, width]`` (float32).

    With ``d = channels // 2`` and ``w_j = exp(-2j * ln(10^4) / d)``, ``j = 0 .. d/2 - 1``:
    channels ``2j`` / ``2j + 1`` hold ``sin(x w_j)`` / ``cos(x w_j)`` of the column index ``x``;
    channels ``d + 2j`` / ``d + 2j + 1`` the same of the row index ``y``.

    Raises:
        ValueError: ``channels`` is not a positive multiple of 4.
    """
    if channels < 4 or channels % 4:
        raise ValueError(f"channels must be a positive multiple of 4, got {channels}")
    half = channels // 2
    freq = torch.exp(torch.arange(0.0, half, 2) * -(math.log(10000.0) / half))
    cols = torch.arange(0.0, width).unsqueeze(1) * freq  # [W, half/2]
    rows = torch.arange(0.0, height).unsqueeze(1) * freq  # [H, half/2]
    pe = torch.zeros(channels, height, width)
    pe[0:half:2] = torch.sin(cols).t().unsqueeze(1).expand(-1, height, -1)
    pe[1:half:2] = torch.cos(cols).t().unsqueeze(1).expand(-1, height, -1)
    pe[half::2] = torch.sin(rows).t().unsqueeze(2).expand(-1, -1, width)
    pe[half + 1 :: 2] = torch.cos(rows).t().unsqueeze(2).expand(-1, -1, width)
    return pe


class PositionalEncoding2d(nn.Module):
    """Module returning the encoding for a batch, cached per ``(height, width, device, dtype)``.

    ``forward(batch, height, width, device, dtype) -> [batch, channels, height, width]`` as an
    expanded view of the cached tensor (no per-batch copy). The cache is not part of the
    ``state_dict``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        positional_encoding_2d(channels, 1, 1)  # validates
        self.channels = int(channels)
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (int(height), int(width), torch.device(device), dtype)
        pe = self._cache.get(key)
        if pe is None:
            pe = positional_encoding_2d(self.channels, height, width).to(device=device, dtype=dtype)
            self._cache[key] = pe
        return pe.unsqueeze(0).expand(batch, -1, -1, -1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


__all__ = ["PositionalEncoding2d", "positional_encoding_2d"]
