"""CS-Flow's normalizing flow over three scales jointly: blocks of a per-scale channel permutation and
a two-sided affine coupling whose subnets mix the scales (:class:`~msflow_fast.nn.CrossConvolutions`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ...nn import ChannelPermutation, FusionCouplingLayer
from ...nn.subnets import cross_convolutions

SCALES = 3


def block_permutations(channels: int, block: int, scheme: str) -> list[np.ndarray]:
    """The three per-scale channel permutations of coupling block ``block`` (see
    :attr:`~msflow_fast.models.csflow.CSFlowConfig.permutation`)."""
    if scheme == "official":
        rng = np.random.RandomState(block)  # np.random.seed(block), then successive draws
        return [rng.permutation(channels) for _ in range(SCALES)]
    if scheme == "anomalib":
        return [np.random.default_rng(block).permutation(channels) for _ in range(SCALES)]
    raise ValueError(f"unknown permutation scheme {scheme!r}; expected 'official' or 'anomalib'")


class ParallelPermutation(nn.Module):
    """One fixed channel permutation per scale, ``y_k[:, i] = x_k[:, perm_k[i]]``, log-det 0.

    ``state_dict`` keys ``scales.{k}.perm`` / ``scales.{k}.perm_inv``.
    """

    def __init__(self, permutations: Sequence[np.ndarray | torch.Tensor]) -> None:
        super().__init__()
        self.scales = nn.ModuleList(ChannelPermutation(len(p), perm=p) for p in permutations)

    def forward(self, xs: Sequence[torch.Tensor], rev: bool = False) -> list[torch.Tensor]:
        return [perm(x, rev=rev) for perm, x in zip(self.scales, xs)]


class CrossScaleFlow(nn.Module):
    """``coupling_blocks`` x (per-scale permutation, then cross-scale coupling) on ``[x_0, x_1, x_2]``.

    Each coupling (:class:`~msflow_fast.nn.FusionCouplingLayer`, the fused ``atan`` affine coupling
    op) splits every scale's channels in halves ``[a, b]`` and computes, with
    ``sigma(s) = clamp * 0.636 * atan(s / clamp)``::

        [s2, t2] = subnet_2(b);  a' = a * exp(sigma(s2)) + t2
        [s1, t1] = subnet_1(a'); b' = b * exp(sigma(s1)) + t1
        z = clamp([a', b'], -1e6, 1e6)

    with ``log|det J| = sum sigma(s1) + sum sigma(s2)`` over all scales. ``subnet_1`` and ``subnet_2``
    are the official ``s1``/``s2`` and anomalib's ``cross_convolution1``/``cross_convolution2``.

    ``state_dict`` keys: ``permutations.{i}.scales.{k}.{perm, perm_inv}`` and
    ``couplings.{i}.subnet_{1,2}.<CrossConvolutions keys>``.

    Args:
        channels: feature channels (equal at every scale; CS-Flow: 304).
        coupling_blocks, hidden_channels, kernel_sizes, clamp, leaky_slope, use_gamma, permutation:
            as in :class:`~msflow_fast.models.csflow.CSFlowConfig`.
    """

    def __init__(
        self, channels: int, *, coupling_blocks: int = 4, hidden_channels: int = 1024,
        kernel_sizes: Sequence[int] = (3, 3, 3, 5), clamp: float = 3.0, leaky_slope: float = 0.1,
        use_gamma: bool = True, permutation: str = "official",
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"CS-Flow needs at least 2 feature channels to split, got {channels}")
        if len(kernel_sizes) != coupling_blocks:
            raise ValueError(f"kernel_sizes needs one entry per coupling block ({coupling_blocks}), got {list(kernel_sizes)}")
        self.channels = int(channels)
        self.permutations = nn.ModuleList(
            ParallelPermutation(block_permutations(channels, k, permutation)) for k in range(coupling_blocks)
        )
        dims = [(channels, 1, 1)] * SCALES
        self.couplings = nn.ModuleList(
            FusionCouplingLayer(dims, clamp=clamp, subnet_constructor=cross_convolutions(hidden_channels, k, leaky_slope, use_gamma))
            for k in kernel_sizes
        )

    def forward(self, xs: Sequence[torch.Tensor], rev: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``[x_0, x_1, x_2]`` (``[B, C, h_k, w_k]``, each grid half the previous) -> ``(z, logdet [B])``
        in nats; ``rev=True`` inverts it (and negates the log-det)."""
        xs = list(xs)
        if len(xs) != SCALES:
            raise ValueError(f"CS-Flow takes {SCALES} feature maps (one per image scale), got {len(xs)}")
        logdet = None
        order = range(len(self.couplings))
        for i in (reversed(order) if rev else order):
            if not rev:
                xs = self.permutations[i](xs)
            xs, ld = self.couplings[i](xs, rev=rev)
            xs = list(xs)
            if rev:
                xs = self.permutations[i](xs, rev=True)
            logdet = ld if logdet is None else logdet + ld
        return xs, logdet


__all__ = ["CrossScaleFlow", "ParallelPermutation", "SCALES", "block_permutations"]
