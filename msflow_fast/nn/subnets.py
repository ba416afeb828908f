"""Coupling subnetworks: MSFlow's parallel-flow ``subnet_conv_ln`` and fusion ``FusionSTNets``,
FastFlow's Conv-ReLU-Conv ``SubnetConvReLU`` and CS-Flow's three-scale ``CrossConvolutions``.

Parameter names follow the authors' checkpoints so their weights load directly:
``conv1``/``ln``/``conv2`` for :class:`SubnetConvLN` and ``cross_convs.{conv1,norm,conv2}``,
``conv_s.{k}``/``conv_t.{k}`` for :class:`FusionSTNets` (MSFLOW_SPEC.md §1.14); ``0``/``2`` for
:class:`SubnetConvReLU` (an ``nn.Sequential`` of conv, ReLU, conv, as anomalib 2.7 and
gathierry/FastFlow store it); ``conv_scale{k}_{0,1}``, ``up_conv10``, ``up_conv21``,
``down_conv01``, ``down_conv12`` and ``gamma{k}`` for :class:`CrossConvolutions` (CS-Flow's and
anomalib 2.7's names).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._inference_cache import InferenceCachedModule


def _layer_norm_relu(module: InferenceCachedModule, x: torch.Tensor, norm: nn.LayerNorm, addend: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(norm(x + addend))`` with ``norm`` over the channels of ``[B, C, H, W]``: the fused op
    with ``module``'s fast paths, else a call of the ``norm`` module."""
    if module.fast_paths:
        return ops.channel_layer_norm_relu(x, norm.weight, norm.bias, addend, eps=norm.eps)
    if addend is not None:
        x = x + addend
    return F.relu(norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class SubnetConvLN(InferenceCachedModule):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, dim_in, H, W] -> [B, dim_out, H, W]``.

        With :attr:`fast_paths` (see :func:`~msflow_fast.nn.enable_fast_paths`), LayerNorm + ReLU
        run as one fused op and, at CPU inference (``torch.no_grad()``), wide convolutions by
        Winograd (see :func:`msflow_fast.ops.conv3x3`), without calling ``ln``/``conv1``/``conv2``.
        """
        hidden = self._conv_module("conv1", x, self.conv1)
        return self._conv_module("conv2", _layer_norm_relu(self, hidden, self.ln), self.conv2)

    def forward_split(self, x: torch.Tensor, conditions: Sequence[torch.Tensor]) -> torch.Tensor:
        """``forward(concat([x, *conditions]))``, without the concatenation when :attr:`fast_paths` is on.

        ``conv1`` is linear in its input channels, so it splits into a part on ``x`` and a part on
        the conditions. Conditions that are the same for every sample (a batch stride of 0, as
        the positional encoding that MSFlow passes as an expanded view) go through their part
        of ``conv1`` once, on one sample, and are added inside the fused LayerNorm: exact up to
        rounding, and it saves that share of ``conv1`` (a third of it at MSFlow's first scale).
        Under ``torch.no_grad()`` that share and the contiguous ``x`` slice of conv1's weight are
        cached until the condition or the weights change (in place or replaced); nothing is cached
        with autograd on, in inference mode or while torch.compile traces.

        Args:
            x: passive half ``[B, C_x, H, W]``.
            conditions: ``[B, C_c, H, W]`` tensors with ``C_x + sum C_c == dim_in``.
        """
        shared = conditions and all(c.stride(0) == 0 or c.shape[0] == 1 for c in conditions)
        if not self.fast_paths or not shared or x.shape[0] == 1:
            return self.forward(torch.cat([x, *conditions], dim=1) if conditions else x)
        c_x = x.shape[1]
        weight, bias = self.conv1.weight, self.conv1.bias
        x_weight = self._inference_cache.get("x_weight", (weight,), lambda: weight[:, :c_x].contiguous(), c_x)
        hidden = self._conv3x3("conv1_x", x, x_weight, None)
        conditions = [c[:1] for c in conditions]

        def condition_term() -> torch.Tensor:
            # conv1 of the batch-constant conditions (bias included), [1, dim_in, H, W].
            return F.conv2d(torch.cat(conditions, dim=1), weight[:, c_x:], bias, padding=1).to(hidden.dtype)

        # The output dtype is part of the key: autocast on or off.
        constant = self._inference_cache.get("condition", (*conditions, weight, bias), condition_term, (c_x, hidden.dtype))
        return self._conv_module("conv2", _layer_norm_relu(self, hidden, self.ln, constant), self.conv2)


def subnet_conv_ln(dim_in: int, dim_out: int) -> SubnetConvLN:
    """Subnet constructor with MSFlow's official name; returns :class:`SubnetConvLN`."""
    return SubnetConvLN(dim_in, dim_out)


class FusionCrossConvs(InferenceCachedModule):
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
        mixed = self._conv_module("conv1", torch.cat(pooled, dim=1), self.conv1)
        mixed = F.relu(self._conv_module("conv2", _layer_norm_relu(self, mixed, self.norm), self.conv2))
        out = []
        for x, part in zip(xs, torch.split(mixed, self.split_channels, dim=1)):
            if part.shape[-2:] != x.shape[-2:]:
                part = F.interpolate(part, size=x.shape[-2:], mode="bilinear", align_corners=True)
            out.append(x + part)
        return out


class FusionSTNets(InferenceCachedModule):
    """Scale/shift subnet of :class:`~msflow_fast.nn.FusionCouplingLayer` (the official ``FusionSTNets``).

    Cross-scale mixing (:class:`FusionCrossConvs`), then per scale one 3x3 conv for the log-scale
    and one for the shift; each output is ``[s_k, t_k]`` channel-concatenated, ready for the
    ``atan`` coupling op. With :attr:`fast_paths` the two are one conv with concatenated weights
    (cached under ``torch.no_grad()`` while the convs' weights are unchanged).

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
        if not self.fast_paths:
            return [torch.cat([conv_s(r), conv_t(r)], dim=1) for r, conv_s, conv_t in zip(mixed, self.conv_s, self.conv_t)]
        out = []
        for k, (r, conv_s, conv_t) in enumerate(zip(mixed, self.conv_s, self.conv_t)):
            weight, bias = self._inference_cache.get(
                f"st_{k}", (conv_s.weight, conv_t.weight, conv_s.bias, conv_t.bias), lambda s=conv_s, t=conv_t: _stacked(s, t)
            )
            out.append(self._conv3x3(f"st_{k}_conv", r, weight, bias))
        return out


class SubnetConvReLU(InferenceCachedModule):
    """``Conv(k, c_in -> hidden) -> ReLU -> Conv(k, hidden -> c_out)`` with "same" zero padding and no
    normalisation (FastFlow's subnet), ``hidden = int(c_in * hidden_ratio)``.

    ``state_dict`` keys ``0.*`` and ``2.*`` (the two convs), as an ``nn.Sequential`` of conv, ReLU,
    conv. With :attr:`fast_paths`, a 1x1 subnet runs as two batched GEMMs over the pixels of each
    sample (bias and ReLU fused into the first), reading a channel slice of an NCHW tensor in
    place; a 3x3 subnet's convolutions run by Winograd at CPU inference (see
    :func:`msflow_fast.ops.conv3x3`). The conv modules are then not called.

    Args:
        dim_in: input channels.
        dim_out: output channels (``2 * (C // 2)`` in an AllInOneBlock).
        kernel_size: 3 or 1.
        hidden_ratio: hidden width as a fraction of ``dim_in`` (FastFlow: 1.0 for CNNs, 0.16 for ViTs).
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3, hidden_ratio: float = 1.0) -> None:
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size!r}")
        hidden = int(dim_in * hidden_ratio)
        if dim_in < 1 or dim_out < 1 or hidden < 1:
            raise ValueError(f"SubnetConvReLU needs dim_in, dim_out and int(dim_in * hidden_ratio) >= 1, got {dim_in}, {dim_out}, {hidden}")
        self.kernel_size = kernel_size
        self.add_module("0", nn.Conv2d(dim_in, hidden, kernel_size, padding=kernel_size // 2))
        self.add_module("1", nn.ReLU())
        self.add_module("2", nn.Conv2d(hidden, dim_out, kernel_size, padding=kernel_size // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, dim_in, H, W] -> [B, dim_out, H, W]``."""
        first, act, second = self._modules["0"], self._modules["1"], self._modules["2"]
        if self.fast_paths and self.kernel_size == 1 and x.dtype == first.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return _pixel_gemms(x, first, second)
        if self.kernel_size == 3:
            return self._conv_module("2", F.relu(self._conv_module("0", x, first)), second)
        return second(act(first(x)))


def _pixel_gemms(x: torch.Tensor, first: nn.Conv2d, second: nn.Conv2d) -> torch.Tensor:
    """Two 1x1 convolutions with a ReLU between, as batched GEMMs ``W [C_out, C_in] @ x_b [C_in, H*W]``."""
    b, c, h, w = x.shape
    if x.stride(1) != h * w or x.stride(2) != w or x.stride(3) != 1:
        x = x.contiguous()
    pixels = x.reshape(b, c, h * w)  # a channel slice of an NCHW tensor stays a view
    hidden = torch.baddbmm(first.bias.view(1, -1, 1), first.weight.view(1, -1, c).expand(b, -1, -1), pixels).relu_()
    out = torch.baddbmm(second.bias.view(1, -1, 1), second.weight.view(1, second.out_channels, -1).expand(b, -1, -1), hidden)
    return out.view(b, -1, h, w)


def subnet_conv_relu(kernel_size: int, hidden_ratio: float):
    """A subnet constructor ``f(c_in, c_out)`` building :class:`SubnetConvReLU` (FastFlow's ``subnet_conv_func``)."""

    def make(dim_in: int, dim_out: int) -> SubnetConvReLU:
        return SubnetConvReLU(dim_in, dim_out, kernel_size, hidden_ratio)

    return make


class CrossConvolutions(InferenceCachedModule):
    """CS-Flow's subnet over three scales at once (Rudolph et al., WACV 2022): per scale a conv,
    LeakyReLU and a second conv, plus cross-scale terms from the neighbouring scales.

    With ``h_k = LeakyReLU(conv_scale{k}_0(x_k))`` (scale 0 the finest, each next one half its size):

    - ``o_0 = conv_scale0_1(h_0) + up_conv10(Up(h_1))``
    - ``o_1 = conv_scale1_1(h_1) + down_conv01(h_0) + up_conv21(Up(h_2))``
    - ``o_2 = conv_scale2_1(h_2) + down_conv12(h_1)``

    then ``o_k *= gamma_k`` (learnable scalars initialised to 0, so a coupling built on this subnet
    starts as the identity). ``Up`` is bilinear x2 (``align_corners=False``), ``down_conv*`` have
    stride 2; every conv has ``kernel_size``, zero "same" padding and a bias. With :attr:`fast_paths`
    the stride-1 3x3 convolutions run by Winograd at CPU inference (:func:`msflow_fast.ops.conv3x3`).

    Args:
        in_channels: channels of every input scale.
        channels: output channels per scale (``2 * C_half`` for an affine coupling: scale, shift).
        channels_hidden: hidden width (CS-Flow: 1024).
        kernel_size: odd kernel size (CS-Flow: 3, and 5 in its last block).
        leaky_slope: LeakyReLU slope (0.1).
        use_gamma: multiply the outputs by the learnable ``gamma_k``.
    """

    def __init__(
        self, in_channels: int, channels: int, channels_hidden: int = 512, kernel_size: int = 3,
        leaky_slope: float = 0.1, use_gamma: bool = True,
    ) -> None:
        super().__init__()
        if min(in_channels, channels, channels_hidden) < 1:
            raise ValueError(f"CrossConvolutions needs positive widths, got in={in_channels}, out={channels}, hidden={channels_hidden}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size!r}")
        pad = kernel_size // 2
        self.kernel_size = int(kernel_size)
        self.leaky_slope = float(leaky_slope)
        self.use_gamma = bool(use_gamma)
        for k in range(3):
            self.register_parameter(f"gamma{k}", nn.Parameter(torch.zeros(1)))
        for k in range(3):
            self.add_module(f"conv_scale{k}_0", nn.Conv2d(in_channels, channels_hidden, kernel_size, padding=pad))
        for k in range(3):
            self.add_module(f"conv_scale{k}_1", nn.Conv2d(channels_hidden, channels, kernel_size, padding=pad))
        self.up_conv10 = nn.Conv2d(channels_hidden, channels, kernel_size, padding=pad)
        self.up_conv21 = nn.Conv2d(channels_hidden, channels, kernel_size, padding=pad)
        self.down_conv01 = nn.Conv2d(channels_hidden, channels, kernel_size, padding=pad, stride=2)
        self.down_conv12 = nn.Conv2d(channels_hidden, channels, kernel_size, padding=pad, stride=2)

    def _conv(self, name: str, x: torch.Tensor) -> torch.Tensor:
        conv = getattr(self, name)
        return self._conv_module(name, x, conv) if self.kernel_size == 3 else conv(x)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[x_0, x_1, x_2]`` (``[B, in, H / 2^k, W / 2^k]``) -> ``[o_0, o_1, o_2]`` (``[B, channels, ...]``)."""
        if len(xs) != 3:
            raise ValueError(f"CrossConvolutions takes 3 scales, got {len(xs)}")
        hidden = [F.leaky_relu(self._conv(f"conv_scale{k}_0", x), self.leaky_slope) for k, x in enumerate(xs)]
        up = [F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False) for h in hidden[1:]]
        out0 = self._conv("conv_scale0_1", hidden[0]) + self._conv("up_conv10", up[0])
        out1 = self._conv("conv_scale1_1", hidden[1]) + self.down_conv01(hidden[0]) + self._conv("up_conv21", up[1])
        out2 = self._conv("conv_scale2_1", hidden[2]) + self.down_conv12(hidden[1])
        outs = [out0, out1, out2]
        if self.use_gamma:
            outs = [o * g for o, g in zip(outs, (self.gamma0, self.gamma1, self.gamma2))]
        return outs


def cross_convolutions(channels_hidden: int, kernel_size: int, leaky_slope: float = 0.1, use_gamma: bool = True):
    """A subnet constructor ``f(in_channels_list, out_channels_list)`` for
    :class:`~msflow_fast.nn.FusionCouplingLayer` building :class:`CrossConvolutions` (CS-Flow's
    coupling: every scale has the same widths; the constructor is given ``[in] * 3`` and ``[out] * 3``
    and makes ``2 * out`` output channels, scale then shift)."""

    def make(in_channels_list: Sequence[int], out_channels_list: Sequence[int]) -> CrossConvolutions:
        ins, outs = set(int(c) for c in in_channels_list), set(int(c) for c in out_channels_list)
        if len(in_channels_list) != 3 or len(ins) != 1 or len(outs) != 1:
            raise ValueError(
                f"CrossConvolutions needs 3 scales of equal width, got in={list(in_channels_list)}, out={list(out_channels_list)}"
            )
        return CrossConvolutions(ins.pop(), 2 * outs.pop(), channels_hidden, kernel_size, leaky_slope, use_gamma)

    return make


def _stacked(conv_s: nn.Conv2d, conv_t: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one conv computing ``[conv_s(x), conv_t(x)]``."""
    return torch.cat([conv_s.weight, conv_t.weight], dim=0), torch.cat([conv_s.bias, conv_t.bias], dim=0)


__all__ = ["CrossConvolutions", "FusionCrossConvs", "FusionSTNets", "SubnetConvLN", "SubnetConvReLU", "cross_convolutions", "subnet_conv_ln", "subnet_conv_relu"]
