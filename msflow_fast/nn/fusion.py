"""Cross-scale blocks: a fixed channel permutation and the two-sided coupling across all scales jointly
(MSFlow's fusion layer; MSFlow composes them in ``msflow_fast.models.msflow.flows.FusionFlow``).

See MSFLOW_SPEC.md §1.7. Two deliberate differences from the official code: the reverse returns
the NEGATED log-det (FrEIA's contract; the official layer returns ``+J`` in both directions), and
the permutations are keyed by scale index (``permutations.{k}``) instead of by the unstable
topological order of a FrEIA ``GraphINN``. Odd channel counts are supported (the official layer
needs even ones).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .. import ops
from .subnets import FusionSTNets

_OUTPUT_BOUND = 1e6
"""Outputs are clamped to ``[-1e6, 1e6]`` as in the official layer (a no-op for sane inputs)."""


def _as_list(xs: object, n: int, name: str) -> list[torch.Tensor]:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"{name} must be a list of {n} tensors [B, C_k, H_k, W_k], got {type(xs).__name__}")
    if len(xs) != n:
        raise ValueError(f"{name} must hold {n} tensors (one per scale), got {len(xs)}")
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name}[{i}] must be a 4-D tensor [B, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    return list(xs)


class ChannelPermutation(nn.Module):
    """Fixed random channel permutation (FrEIA ``PermuteRandom``): ``y[:, i] = x[:, perm[i]]``, log-det 0.

    ``state_dict`` keys ``perm`` and ``perm_inv`` (int64 ``[C]``), as FrEIA. The permutation is
    ``perm`` when given, else drawn with ``np.random.permutation`` (seed with ``np.random.seed`` or
    pass ``seed``).
    """

    def __init__(self, channels: int, seed: int | None = None, perm: torch.Tensor | np.ndarray | None = None) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if perm is None:
            rng = np.random if seed is None else np.random.RandomState(seed)
            perm = rng.permutation(channels)
        perm = torch.as_tensor(perm, dtype=torch.int64).flatten()
        if perm.numel() != channels or not torch.equal(torch.sort(perm).values, torch.arange(channels)):
            raise ValueError(f"perm must be a permutation of 0..{channels - 1}, got {perm.tolist()[:8]}...")
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", ops.reference.invert_permutation(perm))

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        return torch.index_select(x, 1, self.perm_inv if rev else self.perm)


class FusionCouplingLayer(nn.Module):
    """Two-sided affine coupling across all scales jointly (MSFlow's fusion layer).

    Per scale ``k``: ``x_k = [x_k^a (C_k // 2 ch), x_k^b (C_k - C_k // 2 ch)]``. With the soft
    clamp ``sigma(s) = alpha * 0.636 * atan(s / alpha)``:

    1. ``[s2_k, t2_k] = subnet_2({x^b})``; ``y_k^a = x_k^a * exp(sigma(s2_k)) + t2_k``.
    2. ``[s1_k, t1_k] = subnet_1({y^a})``; ``y_k^b = x_k^b * exp(sigma(s1_k)) + t1_k``.
    3. ``z_k = clamp(concat(y_k^a, y_k^b), -1e6, 1e6)``.

    ``logdet = sum_k (sum sigma(s1_k) + sum sigma(s2_k))``, one ``[B]`` tensor; negated for ``rev=True``.
    Each coupling is :func:`msflow_fast.ops.affine_coupling` with ``clamp_form="atan"``.

    Args:
        dims_in: ``[(C_k, 1, 1), ...]`` per scale, finest first; the LAST is the coarsest grid
            (the subnets pool every scale to it).
        dims_c: conditions are not supported (MSFlow does not use them); must be empty.
        clamp: ``alpha > 0`` (MSFlow: 1.9; the official default is 5).
        subnet_constructor: ``f(in_channels_list, out_channels_list) -> module`` mapping a list
            of ``[B, in_k, h_k, w_k]`` to a list of ``[B, 2 * out_k, h_k, w_k]`` (``[s, t]``).
            Default :class:`~msflow_fast.nn.subnets.FusionSTNets`.
    """

    def __init__(
        self,
        dims_in: Sequence[Sequence[int]],
        dims_c: Sequence[Sequence[int]] | None = None,
        clamp: float = 5.0,
        subnet_constructor: Callable[[list[int], list[int]], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if dims_c:
            raise NotImplementedError("FusionCouplingLayer does not support conditions (dims_c); MSFlow uses none")
        channels = [int(shape[0]) for shape in dims_in]
        if not channels or min(channels) < 2:
            raise ValueError(f"every scale needs at least 2 channels to split, got dims_in={list(dims_in)}")
        if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not clamp > 0:
            raise ValueError(f"clamp must be a float > 0, got {clamp!r}")
        self.dims_in = [tuple(shape) for shape in dims_in]
        self.channels = channels
        self.split1 = [c // 2 for c in channels]
        self.split2 = [c - c // 2 for c in channels]
        self.clamp = float(clamp)
        make = subnet_constructor if subnet_constructor is not None else FusionSTNets
        self.subnet_1 = make(self.split1, self.split2)
        self.subnet_2 = make(self.split2, self.split1)

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return input_dims

    def _couple(
        self, xs: list[torch.Tensor], sts: list[torch.Tensor], reverse: bool
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        out, logdet = [], None
        for x, st in zip(xs, sts):
            y, ld = ops.affine_coupling(x, st.to(x.dtype), clamp=self.clamp, clamp_form="atan", reverse=reverse)
            out.append(y)
            logdet = ld if logdet is None else logdet + ld
        return out, logdet

    def forward(
        self,
        x: Sequence[torch.Tensor],
        c: Sequence[torch.Tensor] | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """``[x_1, ..., x_K] -> ((z_1, ..., z_K), logdet [B])`` (or the inverse with ``rev=True``)."""
        if c:
            raise NotImplementedError("FusionCouplingLayer does not support conditions; pass c=None")
        xs = _as_list(x, len(self.channels), "x")
        for k, (t, ch) in enumerate(zip(xs, self.channels)):
            if t.shape[1] != ch:
                raise ValueError(f"x[{k}] must have {ch} channels (dims_in={self.dims_in}), got {tuple(t.shape)}")
        part_a = [t[:, :s] for t, s in zip(xs, self.split1)]
        part_b = [t[:, s:] for t, s in zip(xs, self.split1)]
        if not rev:
            out_a, logdet_a = self._couple(part_a, self.subnet_2(part_b), reverse=False)
            out_b, logdet_b = self._couple(part_b, self.subnet_1(out_a), reverse=False)
        else:
            out_b, logdet_b = self._couple(part_b, self.subnet_1(part_a), reverse=True)
            out_a, logdet_a = self._couple(part_a, self.subnet_2(out_b), reverse=True)
        outs = tuple(torch.cat([a, b], dim=1).clamp_(-_OUTPUT_BOUND, _OUTPUT_BOUND) for a, b in zip(out_a, out_b))
        return outs, logdet_a + logdet_b


__all__ = ["ChannelPermutation", "FusionCouplingLayer"]
