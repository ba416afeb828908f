"""MSFlow's flows (MSFLOW_SPEC.md §1.5-1.7): parallel flows of conditioned AllInOneBlocks, one per
scale, then the fusion flow (per-scale permutations and one cross-scale coupling)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ...nn import AllInOneBlock, ChannelPermutation, FusionCouplingLayer, ParallelFlows, SequenceFlow, subnet_conv_ln


def build_parallel_flow(
    channels: int,
    n_blocks: int,
    cond_channels: int,
    clamp: float,
    *,
    clamp_form: str = "tanh",
    subnet_constructor: Callable[[int, int], nn.Module] = subnet_conv_ln,
    block_class: Callable[..., nn.Module] = AllInOneBlock,
) -> SequenceFlow:
    """One MSFlow parallel flow: ``n_blocks`` conditioned AllInOneBlocks on ``(channels, 1, 1)``.

    Same structure, RNG consumption and ``state_dict`` keys as the official
    ``SequenceINN(C, 1, 1)`` with ``append(AllInOneBlock, cond=0, cond_shape=(c_cond, 1, 1),
    subnet_constructor=subnet_conv_ln, affine_clamping=clamp, global_affine_type='SOFTPLUS')``.
    """
    flow = SequenceFlow(channels, 1, 1)
    extra = {} if block_class is not AllInOneBlock else {"clamp_form": clamp_form}
    for _ in range(n_blocks):
        flow.append(
            block_class,
            cond=0,
            cond_shape=(cond_channels, 1, 1),
            subnet_constructor=subnet_constructor,
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
            **extra,
        )
    return flow


def build_parallel_flows(
    channels: Sequence[int],
    n_blocks: Sequence[int],
    cond_channels: int,
    clamp: float,
    *,
    clamp_form: str = "tanh",
    subnet_constructor: Callable[[int, int], nn.Module] = subnet_conv_ln,
) -> ParallelFlows:
    """MSFlow's parallel flows: :func:`build_parallel_flow` per scale, in a :class:`~msflow_fast.nn.ParallelFlows`.

    ``state_dict`` keys ``flows.{k}.module_list.{i}.*``; ``flows[k].state_dict()`` equals the
    official ``parallel_flows[k]`` checkpoint entry.

    Args:
        channels: feature channels per scale ``C_k``.
        n_blocks: blocks per scale (MSFlow: ``(2, 5, 8)``).
        cond_channels: positional-condition channels (MSFlow: 64).
        clamp: soft clamp alpha (MSFlow: 1.9).
        clamp_form: ``"tanh"`` (FrEIA 0.2) or ``"tanh_scaled"``.
        subnet_constructor: ``f(c_in, c_out)`` (MSFlow: ``subnet_conv_ln``).
    """
    if len(channels) != len(n_blocks):
        raise ValueError(f"channels ({len(channels)} scales) and n_blocks ({len(n_blocks)}) must have the same length")
    if any(n < 1 for n in n_blocks):
        raise ValueError(f"n_blocks must all be >= 1, got {tuple(n_blocks)}")
    return ParallelFlows(
        [
            build_parallel_flow(c, n, cond_channels, clamp, clamp_form=clamp_form, subnet_constructor=subnet_constructor)
            for c, n in zip(channels, n_blocks)
        ]
    )


class FusionFlow(nn.Module):
    """MSFlow's fusion flow: one :class:`~msflow_fast.nn.ChannelPermutation` per scale, then a
    :class:`~msflow_fast.nn.FusionCouplingLayer` across all scales.

    ``state_dict`` keys: ``permutations.{k}.perm`` / ``.perm_inv`` (keyed by scale ``k``) and
    ``coupling.subnet_{1,2}.*`` (the official checkpoint's ``module_list.{K}.*``).

    Args:
        channels: ``C_k`` per scale, finest first.
        clamp: the coupling's soft clamp (MSFlow: 1.9).
    """

    def __init__(self, channels: Sequence[int], clamp: float = 1.9) -> None:
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.permutations = nn.ModuleList(ChannelPermutation(c) for c in self.channels)
        self.coupling = FusionCouplingLayer([(c, 1, 1) for c in self.channels], clamp=clamp)

    def forward(self, features: Sequence[torch.Tensor], rev: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``[y_1..y_K] -> ([z_1..z_K], logdet [B])``; with ``rev=True`` the inverse (log-det negated)."""
        if isinstance(features, torch.Tensor) or not isinstance(features, (list, tuple)) or len(features) != len(self.channels):
            raise ValueError(f"features must be a list of {len(self.channels)} tensors [B, C_k, H_k, W_k], one per scale")
        if not rev:
            permuted = [p(x) for p, x in zip(self.permutations, features)]
            outs, logdet = self.coupling(permuted)
            return list(outs), logdet
        outs, logdet = self.coupling(list(features), rev=True)
        return [p(z, rev=True) for p, z in zip(self.permutations, outs)], logdet


__all__ = ["FusionFlow", "build_parallel_flow", "build_parallel_flows"]
