"""Coupling subnetworks of MSFlow: the parallel-flow ``subnet_conv_ln`` and the fusion ``FusionSTNets``.

Parameter names follow the official checkpoints (MSFLOW_SPEC.md §1.14) so their weights load
directly: ``conv1``/``ln``/``conv2`` for :class:`SubnetConvLN`; ``cross_convs.{conv1,norm,conv2}``
and ``conv_s.{k}``/``conv_t.{k}`` for :class:`FusionSTNets`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


def _layer_norm_relu(x: torch.Tensor, norm: nn.LayerNorm, addend: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(norm(x + addend))`` with ``norm`` over the channels of ``[B, C, H, W]`` (fused op)."""
    return ops.channel_layer_norm_relu(x, norm.weight, norm.bias, addend, eps=norm.eps)


class SubnetConvLN(nn.Module):
    """``Conv3x3(c_in -> c_in) -> LayerNorm(channels) -> ReLU -> Conv3x3(c_in -> c_out)`` (MSFlow's ``subnet_conv_ln``).

    Hidden width equals the input width; default PyTorch initialisation (the last conv is not
    zeroed). Called as ``subnet_constructor(c_in, c_out)`` by :class:`~msflow_fast.nn.AllInOneBlock`.

    Args:
        dim_in: input channels (passive half plus condition channels).
        dim_out: output channels (``2 * (C // 2)``: scale half then shift half).
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        if dim_in < 1 or dim_out < 1:
            raise ValueError(f"SubnetConvLN needs dim_in >= 1 and dim_out >= 1, got dim_in={dim_in}, dim_out={dim_out}")
        self.conv1 = nn.Conv2d(dim_in, dim_in, 3, 1, 1)
        self.ln = nn.LayerNorm(dim_in)
        self.conv2 = nn.Conv2d(dim_in, dim_out, 3, 1, 1)
        self._condition_cache: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, dim_in, H, W] -> [B, dim_out, H, W]``."""
        return self.conv2(_layer_norm_relu(self.conv1(x), self.ln))

    def forward_split(self, x: torch.Tensor, conditions: Sequence[torch.Tensor]) -> torch.Tensor:
        """``forward(concat([x, *conditions]))`` without the concatenation.

        ``conv1`` is linear in its input channels, so it splits into a part on ``x`` and a part on
        the conditions. Conditions that are the same for every sample (a batch stride of 0, as
        the positional encoding that MSFlow passes as an expanded view) go through their part
        of ``conv1`` once, on one sample, and are added inside the fused LayerNorm: exact up to
        rounding, and it saves that share of ``conv1`` (a third of it at MSFlow's first scale).
        Without autograd (inference) that share is also cached until the condition or the
        weights change.

        Args:
            x: passive half ``[B, C_x, H, W]``.
            conditions: ``[B, C_c, H, W]`` tensors with ``C_x + sum C_c == dim_in``.
        """
        shared = conditions and all(c.stride(0) == 0 or c.shape[0] == 1 for c in conditions)
        if not shared or x.shape[0] == 1:
            return self.forward(torch.cat([x, *conditions], dim=1) if conditions else x)
        c_x = x.shape[1]
        hidden = F.conv2d(x, self.conv1.weight[:, :c_x], None, padding=1)
        constant = self._condition_term([c[:1] for c in conditions], c_x, hidden.dtype)
        return self.conv2(_layer_norm_relu(hidden, self.ln, constant))

    def _condition_term(self, conditions: list[torch.Tensor], c_x: int, dtype: torch.dtype) -> torch.Tensor:
        """``conv1`` of the batch-constant conditions (bias included), ``[1, dim_in, H, W]`` in ``dtype``.

        Under ``torch.no_grad()`` the result is cached until a condition or conv1's weights change
        (in place or replaced). Nothing is cached with autograd on, in inference mode (its tensors
        carry no version counter and cannot join autograd later) or while torch.compile traces.
        """
        weight, bias = self.conv1.weight, self.conv1.bias
        sources = (*conditions, weight, bias)
        cacheable = not (
            torch.is_grad_enabled() or torch.is_inference_mode_enabled() or torch.compiler.is_compiling()
        ) and not any(t.is_inference() for t in sources)
        if cacheable:
            # A hit needs the same storage, layout and version of every source, and the same output
            # dtype (autocast on or off); the cache keeps the sources alive, so their storage cannot
            # be reused by new tensors while it holds them.
            key = tuple((t.data_ptr(), t._version, t.shape, t.stride(), t.dtype) for t in sources) + (c_x, dtype)
            cached = self._condition_cache
            if cached is not None and cached[0] == key:
                return cached[2]
        constant = F.conv2d(torch.cat(conditions, dim=1), weight[:, c_x:], bias, padding=1).to(dtype)
        if cacheable:
            self._condition_cache = (key, [t.detach() for t in sources], constant)
        return constant

    def _apply(self, *args, **kwargs):
        # .to() / .half() / .cuda() replace the weights: drop the cache (and the old storage it holds).
        self._condition_cache = None
        return super()._apply(*args, **kwargs)

    def __getstate__(self) -> dict:
        # Pickling and deepcopy leave the cache behind.
        state = self.__dict__.copy()
        state["_condition_cache"] = None
        return state


def subnet_conv_ln(dim_in: int, dim_out: int) -> SubnetConvLN:
    """Subnet constructor with MSFlow's official name; returns :class:`SubnetConvLN`."""
    return SubnetConvLN(dim_in, dim_out)


class FusionCrossConvs(nn.Module):
    """Cross-scale mixing of the fusion subnet (the official ``FusionNet`` with ``add=True``).

    Every input ``u_k [B, m_k, h_k, w_k]`` is average-pooled to the grid of the LAST (coarsest)
    input, the pooled maps are concatenated (``M = sum m_k`` channels) and passed through
    ``Conv3x3(M -> M // 4) -> LayerNorm -> ReLU -> Conv3x3(M // 4 -> M) -> ReLU``; the result is
    split back per scale, upsampled bilinearly (``align_corners=True``) to each input's grid and
    added to that input.
    """

    def __init__(self, in_channels_list: Sequence[int]) -> None:
        super().__init__()
        self.split_channels = [int(c) for c in in_channels_list]
        total = sum(self.split_channels)
        mid = total // 4
        if mid < 1:
            raise ValueError(
                f"FusionCrossConvs needs at least 4 channels over all scales (mid width = sum // 4), got {self.split_channels}"
            )
        self.conv1 = nn.Conv2d(total, mid, 3, 1, 1)
        self.norm = nn.LayerNorm(mid)
        self.conv2 = nn.Conv2d(mid, total, 3, 1, 1)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        size = xs[-1].shape[-2:]
        pooled = [x if x.shape[-2:] == size else F.adaptive_avg_pool2d(x, size) for x in xs]
        mixed = self.conv1(torch.cat(pooled, dim=1))
        mixed = F.relu(self.conv2(_layer_norm_relu(mixed, self.norm)))
        out = []
        for x, part in zip(xs, torch.split(mixed, self.split_channels, dim=1)):
            if part.shape[-2:] != x.shape[-2:]:
                part = F.interpolate(part, size=x.shape[-2:], mode="bilinear", align_corners=True)
            out.append(x + part)
        return out


class FusionSTNets(nn.Module):
    """Scale/shift subnet of :class:`~msflow_fast.nn.FusionCouplingLayer` (the official ``FusionSTNets``).

    Cross-scale mixing (:class:`FusionCrossConvs`), then per scale one 3x3 conv for the log-scale
    and one for the shift. The two are evaluated as a single conv with concatenated weights, so
    each output is ``[s_k, t_k]`` channel-concatenated, ready for the ``atan`` coupling op.

    Args:
        in_channels_list: input channels ``m_k`` per scale.
        out_channels_list: output channels per scale of each of ``s_k`` and ``t_k`` (default:
            ``in_channels_list``, the official even-channel case).
    """

    def __init__(self, in_channels_list: Sequence[int], out_channels_list: Sequence[int] | None = None) -> None:
        super().__init__()
        ins = [int(c) for c in in_channels_list]
        outs = ins if out_channels_list is None else [int(c) for c in out_channels_list]
        if len(outs) != len(ins):
            raise ValueError(f"out_channels_list has {len(outs)} entries but in_channels_list has {len(ins)}")
        self.cross_convs = FusionCrossConvs(ins)
        self.conv_s = nn.ModuleList([nn.Conv2d(i, o, 3, 1, 1) for i, o in zip(ins, outs)])
        self.conv_t = nn.ModuleList([nn.Conv2d(i, o, 3, 1, 1) for i, o in zip(ins, outs)])

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per scale ``[B, m_k, h_k, w_k] -> [B, 2 * out_k, h_k, w_k]`` (``[s_k, t_k]``)."""
        mixed = self.cross_convs(xs)
        out = []
        for r, conv_s, conv_t in zip(mixed, self.conv_s, self.conv_t):
            weight = torch.cat([conv_s.weight, conv_t.weight], dim=0)
            bias = torch.cat([conv_s.bias, conv_t.bias], dim=0)
            out.append(F.conv2d(r, weight, bias, padding=1))
        return out


__all__ = ["FusionCrossConvs", "FusionSTNets", "SubnetConvLN", "subnet_conv_ln"]
