"""DADF's dual-attention transformer (MODELS_SPEC.md Part B §1.4): per-scale patch embeddings
concatenated into ``N`` tokens of width ``D``, fixed 2-D sin-cos positions, ``N`` learned memory
tokens, ``depth`` dual blocks whose weights the two streams share, and shared per-scale heads that
rebuild every backbone map from each stream (the self and the memory reconstructions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def sincos_positions_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions ``[height * width, dim]`` (float64), tokens in row-major order.

    The first ``dim / 2`` channels encode the column index, the last ``dim / 2`` the row index,
    each as ``[sin(p w_j), cos(p w_j)]`` with ``w_j = 10000^(-j / (dim / 4))``, ``j < dim / 4``
    (the MAE / timm form the official code uses; its zero CLS slot is not kept: no CLS token).
    """
    if dim < 4 or dim % 4:
        raise ValueError(f"dim must be a positive multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")

    def one_d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one_d(cols), one_d(rows)], dim=1)


class DualAttention(nn.Module):
    """Self attention on the feature tokens and memorial attention for the memory tokens, one
    ``qkv`` and one ``proj`` for both (MODELS_SPEC.md Part B §1.4):

    ``a_self = proj(softmax(q_x k_x^T / sqrt(d)) v_x)``, ``a_mem = proj(softmax(q_m k_x^T / sqrt(d)) v_m)``:
    the memory stream's queries and values come from the memory, its keys from the features, so
    before ``proj`` its output at every position is a convex combination of memory values. The
    memory's keys are never used, so they are not computed. Both through
    :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        dim: token width ``D``; ``num_heads`` must divide it.
        num_heads: heads.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.dim, self.num_heads = int(dim), int(num_heads)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.dim // self.num_heads).transpose(1, 2)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = t.shape
        return t.transpose(1, 2).reshape(b, n, self.dim)

    def mixed(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two attention outputs before ``proj``, ``[B, N, D]`` each (the memory's are convex
        combinations of its value rows ``v_m = memory @ W_v^T + b_v``)."""
        if x.shape != memory.shape:
            raise ValueError(f"features {tuple(x.shape)} and memory {tuple(memory.shape)} must both be [B, N, D] (as many memory tokens as feature tokens)")
        q, k, v = self._heads_split(F.linear(x, self.qkv.weight, self.qkv.bias))
        d = self.dim
        w, b = self.qkv.weight, self.qkv.bias
        mem_q = F.linear(memory, w[:d], b[:d])
        mem_v = F.linear(memory, w[2 * d :], b[2 * d :])
        own = F.scaled_dot_product_attention(q, k, v)
        recalled = F.scaled_dot_product_attention(self._heads(mem_q), k, self._heads(mem_v))
        return self._merge(own), self._merge(recalled)

    def _heads_split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.split(self.dim, dim=-1)
        return self._heads(q), self._heads(k), self._heads(v)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [B, N, D], memory [B, N, D]) -> (a_self, a_mem)``, ``[B, N, D]`` each."""
        own, recalled = self.mixed(x, memory)
        return self.proj(own), self.proj(recalled)


class DualBlock(nn.Module):
    """Pre-norm dual block, every weight shared by the two streams:
    ``a_x, a_m = attn(LN1(x), LN1(m))``; ``x += a_x; x += MLP(LN2(x))``; the same for ``m``.
    MLP: ``Linear(D, r D) -> GELU -> Linear(r D, D)``, no dropout, no DropPath."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DualAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a_x, a_m = self.attn(self.norm1(x), self.norm1(memory))
        x = x + a_x
        x = x + self.mlp(self.norm2(x))
        memory = memory + a_m
        memory = memory + self.mlp(self.norm2(memory))
        return x, memory


class Reconstructions(NamedTuple):
    """Output of :class:`DualAttentionTransformer`: per scale ``[B, C_k, h_k, w_k]`` maps, the
    backbone's shape.

    Attributes:
        own: the self (feature-stream) reconstructions.
        memory: the memory-stream reconstructions.
    """

    own: list[torch.Tensor]
    memory: list[torch.Tensor]


class DualAttentionTransformer(nn.Module):
    """Backbone maps ``E_k [B, C_k, h_k, w_k]`` -> :class:`Reconstructions` of them.

    ``E_k`` is embedded by ``Conv2d(C_k, embed_dim, p_k, stride=p_k)`` to the common token grid
    (``p_k = h_k / grid_h``), the scales' tokens concatenated to ``[B, N, D]``, ``D = K * embed_dim``;
    positions added to the tokens and to the learned memory ``[1, N, D]``; ``depth`` dual blocks;
    a shared final LayerNorm; per scale a shared ``Linear(D, p_k^2 C_k)`` head, unpatchified.

    Args:
        channels: ``C_k`` per scale.
        grids: ``(h_k, w_k)`` per scale; each must be a multiple of the coarsest.
        embed_dim, depth, num_heads, mlp_ratio: as :class:`~msflow_fast.models.dadf.DADFConfig`.

    Init (the code's): xavier-uniform Linear weights and flattened patch-embedding kernels, zero
    biases, LayerNorms (1, 0), memory ``N(0, 0.02)``.
    """

    def __init__(self, channels: Sequence[int], grids: Sequence[tuple[int, int]], embed_dim: int = 480, depth: int = 8,
                 num_heads: int = 8, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.grids = [(int(h), int(w)) for h, w in grids]
        if len(self.channels) != len(self.grids) or not self.channels:
            raise ValueError(f"channels {self.channels} and grids {self.grids} must be non-empty and of one length")
        gh, gw = min(h for h, _ in self.grids), min(w for _, w in self.grids)
        self.token_grid = (gh, gw)
        self.patches = []
        for h, w in self.grids:
            if h % gh or w % gw or h // gh != w // gw:
                raise ValueError(f"every scale's grid must be a square-patch multiple of the coarsest {gh}x{gw}, got {self.grids}")
            self.patches.append(h // gh)
        self.dim = len(self.channels) * int(embed_dim)
        self.tokens = gh * gw
        self.embed = nn.ModuleList(nn.Conv2d(c, embed_dim, p, stride=p) for c, p in zip(self.channels, self.patches))
        self.register_buffer("positions", sincos_positions_2d(self.dim, gh, gw).float().unsqueeze(0), persistent=False)
        self.memory = nn.Parameter(torch.zeros(1, self.tokens, self.dim))
        self.blocks = nn.ModuleList(DualBlock(self.dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(self.dim)
        self.heads = nn.ModuleList(nn.Linear(self.dim, p * p * c) for c, p in zip(self.channels, self.patches))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The code's initialisation (see the class docstring)."""
        for conv in self.embed:
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.memory, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def tokens_of(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone maps -> feature tokens ``[B, N, D]`` with positions (row-major token order)."""
        if len(features) != len(self.embed):
            raise ValueError(f"the transformer takes {len(self.embed)} backbone maps, got {len(features)}")
        parts = [embed(f).flatten(2).transpose(1, 2) for embed, f in zip(self.embed, features)]
        return torch.cat(parts, dim=-1) + self.positions.to(parts[0].dtype)

    def unpatchify(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """Head output ``[B, N, p^2 C_k]`` (per token ``(p_row, p_col, c)``) -> ``[B, C_k, h_k, w_k]``."""
        b = tokens.shape[0]
        gh, gw = self.token_grid
        p, c = self.patches[k], self.channels[k]
        return tokens.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, gh * p, gw * p)

    def forward(self, features: Sequence[torch.Tensor]) -> Reconstructions:
        """``[E_k [B, C_k, h_k, w_k]] -> Reconstructions(own, memory)``, the maps' shapes."""
        x = self.tokens_of(features)
        memory = (self.memory.to(x.dtype) + self.positions.to(x.dtype)).expand(x.shape[0], -1, -1)
        for block in self.blocks:
            x, memory = block(x, memory)
        x, memory = self.norm(x), self.norm(memory)
        own = [self.unpatchify(head(x), k) for k, head in enumerate(self.heads)]
        recalled = [self.unpatchify(head(memory), k) for k, head in enumerate(self.heads)]
        return Reconstructions(own, recalled)

    def extra_repr(self) -> str:
        return f"tokens={self.tokens}, dim={self.dim}, patches={self.patches}, grids={self.grids}"


def reconstruction_loss(features: Sequence[torch.Tensor], rec: Reconstructions) -> torch.Tensor:
    """Stage-1 loss: ``sum_k [MSE(R^mem_k, E_k) + MSE(R^self_k, E_k)]``, each the mean over all
    elements (the code's token-space MSE: patchify is a permutation), raw targets, weights 1."""
    total = None
    for target, own, recalled in zip(features, rec.own, rec.memory):
        target = target.to(own.dtype)
        term = F.mse_loss(recalled, target) + F.mse_loss(own, target)
        total = term if total is None else total + term
    return total


__all__ = ["DualAttention", "DualAttentionTransformer", "DualBlock", "Reconstructions", "reconstruction_loss", "sincos_positions_2d"]
