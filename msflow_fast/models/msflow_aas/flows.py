"""``msflow_aas``'s normalizing flow: a coarse-to-fine cascade of three levels, each ``K``
AllInOneBlock couplings with :class:`~.hpm.HierarchicalPerceptionModule` subnets, joined either
by conditioning on the coarser level's latent or by a Glow-style split. An INTERPRETATION of the
abstract's "hierarchical multi-scale architecture inside the normalizing flow" (MODELS_SPEC.md
Part A §4.3), not the authors' code."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...nn import AllInOneBlock, SequenceFlow, compat
from ..image_pyramid import LEVELS
from .config import WIRINGS
from .hpm import hpm_subnet


def carried_channels(channels: int) -> int:
    """``c_r = 4 * floor(C / 8)``: the channels a level hands to the next finer one with
    ``wiring="split"`` (about half of ``C``, a multiple of 4 for the depth-to-space)."""
    return 4 * (int(channels) // 8)


def up2(z: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling (``align_corners=False``) of ``z [B, C, h, w]`` to ``[B, C, *size]``
    (``size = (2h, 2w)`` in the flow): the condition of the next finer level."""
    return F.interpolate(z, size=tuple(size), mode="bilinear", align_corners=False)


def _seed_permutation(block: AllInOneBlock, seed: Sequence[int]) -> None:
    """Give ``block`` the channel permutation ``np.random.default_rng(seed).permutation(C)``, so
    that a model's permutations do not depend on NumPy's global state (checkpoints store them)."""
    perm = torch.as_tensor(np.random.default_rng(list(seed)).permutation(block.in_channels))
    matrix = compat.permutation_matrix(perm, block.w_perm.dim() - 2, block.w_perm.dtype)
    with torch.no_grad():
        block.w_perm.copy_(matrix)
        block.w_perm_inv.copy_(matrix.transpose(0, 1))
    block.refresh_permutation()


class HierarchicalFlow(nn.Module):
    """Three flow levels on ``[x_0, x_1, x_2]`` (``x_l [B, C, h_l, w_l]``, each grid half the
    previous; level 0 the finest), run coarse to fine (INTERPRETATION, see the module docstring).

    Each level ``F_l`` is ``blocks_per_level`` :class:`~msflow_fast.nn.AllInOneBlock` couplings
    (affine coupling with soft clamp ``clamp * tanh(0.1 a)``, SOFTPLUS global affine, a fixed
    channel permutation drawn from ``np.random.default_rng([l, k])``) whose subnets are
    :class:`~msflow_fast.models.msflow_aas.hpm.HierarchicalPerceptionModule` s.

    ``wiring="conditional"``: ``Up`` is :func:`up2`::

        z_2 = F_2(x_2)
        z_1 = F_1(x_1 | Up(z_2))        the condition joins the passive half at every coupling
        z_0 = F_0(x_0 | Up(z_1))

    The Jacobian is block-triangular (a level depends on coarser *outputs* only), so
    ``log|det J| = sum_l log|det J_l|``; the inverse runs level 2 first, then level 1 given
    ``Up(z_2)``, then level 0 given ``Up(z_1)``. Latents ``z_l [B, C, h_l, w_l]``.

    ``wiring="split"`` (Glow-style factor-out and concatenate, coarse to fine), with
    ``c_r = carried_channels(C)`` and ``D = pixel_shuffle(2)`` (depth-to-space, a coordinate
    permutation, log-det 0)::

        [z_2, r_2] = F_2(x_2)                   r_2: the last c_r channels
        [z_1, r_1] = F_1(concat(x_1, D(r_2)))   C + c_r / 4 channels at level 1
        z_0        = F_0(concat(x_0, D(r_1)))   C + c_r / 4 channels at level 0

    Latents ``z_2 [B, C - c_r, h_2, w_2]``, ``z_1 [B, C + c_r / 4 - c_r, h_1, w_1]``,
    ``z_0 [B, C + c_r / 4, h_0, w_0]``: as many dimensions as the input. The inverse runs level 0
    first (``x_0`` and ``D(r_1)`` from ``F_0^{-1}(z_0)``), then 1, then 2, with
    ``D^{-1} = pixel_unshuffle(2)``; again ``log|det J| = sum_l log|det J_l|``.

    ``state_dict`` keys: ``levels.{l}.module_list.{k}.{global_scale, global_offset, w_perm,
    w_perm_inv, subnet.*}``.

    Args:
        channels: feature channels ``C`` of every level (CS-Flow's features: 304).
        blocks_per_level, hpm_mid, hpm_groups, clamp, wiring: as in
            :class:`~msflow_fast.models.msflow_aas.MSFlowAASConfig`.
    """

    def __init__(
        self, channels: int, *, blocks_per_level: int = 8, hpm_mid: int = 704, hpm_groups: int = 4,
        clamp: float = 1.9, wiring: str = "conditional",
    ) -> None:
        super().__init__()
        if wiring not in WIRINGS:
            raise ValueError(f"wiring must be one of {WIRINGS}, got {wiring!r}")
        channels = int(channels)
        if channels < (8 if wiring == "split" else 2):
            raise ValueError(
                f"msflow_aas needs at least {8 if wiring == 'split' else 2} feature channels with wiring={wiring!r}, got {channels}"
            )
        self.channels, self.wiring = channels, wiring
        self.carried = carried_channels(channels) if wiring == "split" else 0
        width = channels + self.carried // 4
        self.level_channels = [width, width, channels] if wiring == "split" else [channels] * LEVELS
        subnet = hpm_subnet(hpm_mid, hpm_groups)
        self.levels = nn.ModuleList()
        for level, c in enumerate(self.level_channels):
            flow = SequenceFlow(c, 1, 1)
            conditioned = wiring == "conditional" and level < LEVELS - 1
            for k in range(blocks_per_level):
                flow.append(
                    AllInOneBlock, cond=0 if conditioned else None, cond_shape=(channels, 1, 1) if conditioned else None,
                    subnet_constructor=subnet, affine_clamping=clamp, clamp_form="tanh",
                )
                _seed_permutation(flow[k], (level, k))
            self.levels.append(flow)

    def latent_channels(self) -> list[int]:
        """Channels of ``z_0, z_1, z_2``."""
        if self.wiring == "conditional":
            return [self.channels] * LEVELS
        c, r = self.level_channels, self.carried
        return [c[0], c[1] - r, c[2] - r]

    def _check(self, xs: Sequence[torch.Tensor], channels: Sequence[int], what: str) -> list[torch.Tensor]:
        xs = list(xs)
        if len(xs) != LEVELS:
            raise ValueError(f"msflow_aas's flow takes {LEVELS} {what} (one per level), got {len(xs)}")
        for level, (x, c) in enumerate(zip(xs, channels)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != c:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{what} {level} must be [B, {c}, h, w], got {got}")
        for level in range(LEVELS - 1):
            fine, coarse = xs[level].shape[-2:], xs[level + 1].shape[-2:]
            if fine[0] != 2 * coarse[0] or fine[1] != 2 * coarse[1]:
                raise ValueError(
                    f"each level's grid must be twice the next one's, got {tuple(fine)} at level {level} and {tuple(coarse)} at "
                    f"level {level + 1}; use image sizes that are multiples of 4 x the backbone's stride"
                )
        return xs

    def forward(self, xs: Sequence[torch.Tensor], rev: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``[x_0, x_1, x_2]`` -> ``([z_0, z_1, z_2], logdet [B])`` in nats; ``rev=True`` maps
        latents back to features and returns the log-det of the inverse (the forward's, negated)."""
        if rev:
            return self._reverse(self._check(xs, self.latent_channels(), "latents"))
        xs = self._check(xs, [self.channels] * LEVELS, "feature maps")
        zs: list[torch.Tensor | None] = [None] * LEVELS
        logdet = None
        carry = None
        for level in reversed(range(LEVELS)):
            x = xs[level]
            if self.wiring == "conditional":
                cond = None if level == LEVELS - 1 else [up2(zs[level + 1], x.shape[-2:])]
                h, ld = self.levels[level](x, c=cond)
            else:
                h, ld = self.levels[level](x if carry is None else torch.cat([x, carry], dim=1))
                if level > 0:
                    h, r = h[:, : h.shape[1] - self.carried], h[:, h.shape[1] - self.carried :]
                    carry = F.pixel_shuffle(r, 2)
            zs[level] = h
            logdet = ld if logdet is None else logdet + ld
        return zs, logdet

    def _reverse(self, zs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        xs: list[torch.Tensor | None] = [None] * LEVELS
        logdet = None
        if self.wiring == "conditional":
            for level in reversed(range(LEVELS)):
                cond = None if level == LEVELS - 1 else [up2(zs[level + 1], zs[level].shape[-2:])]
                xs[level], ld = self.levels[level](zs[level], c=cond, rev=True)
                logdet = ld if logdet is None else logdet + ld
            return xs, logdet
        carry = None
        for level in range(LEVELS):
            h = zs[level] if carry is None else torch.cat([zs[level], carry], dim=1)
            u, ld = self.levels[level](h, rev=True)
            logdet = ld if logdet is None else logdet + ld
            xs[level] = u[:, : self.channels]
            if level < LEVELS - 1:
                carry = F.pixel_unshuffle(u[:, self.channels :], 2)
        return xs, logdet

    def extra_repr(self) -> str:
        return f"channels={self.channels}, wiring={self.wiring!r}, level_channels={self.level_channels}"


__all__ = ["HierarchicalFlow", "carried_channels", "up2"]
