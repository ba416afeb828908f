"""DADF's discriminative flow per scale (MODELS_SPEC.md Part B §1.6): ``flow_steps`` AllInOneBlocks
on ``(3C, H, W)``, clamp 2.0 in the FrEIA-0.2 form, "light" subnets
``depthwise Conv k x k -> LeakyReLU(0.1) -> Conv 1x1`` whose kernel alternates 3 / 1."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ...nn import AllInOneBlock, SequenceFlow
from ..stage_flow import step_kernel


def subnet_depthwise(kernel: int) -> Callable[[int, int], nn.Sequential]:
    """Subnet constructor ``f(c_in, c_out)``: ``Conv2d(c_in, c_in, kernel, padding="same", groups=c_in)
    -> LeakyReLU(0.1) -> Conv2d(c_in, c_out, 1)`` (keys ``0.*`` and ``2.*``; the code's
    ``subnet_conv_func``, whose ``hidden_ratio`` it ignores)."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be an odd int >= 1, got {kernel}")

    def make(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_in, kernel, padding="same", groups=c_in), nn.LeakyReLU(0.1), nn.Conv2d(c_in, c_out, 1))

    return make


def build_scale_flow(channels: int, height: int, width: int, flow_steps: int, *, conv3x3_only: bool = False,
                     clamp: float = 2.0) -> SequenceFlow:
    """One scale's flow (``module_list.{i}.subnet.{0,2}.*``, FrEIA ``SequenceINN`` keys): FrEIA's
    defaults otherwise (SOFTPLUS global affine at 1.0, hard permutations, no GIN, no Householder)."""
    flow = SequenceFlow(channels, height, width)
    for step in range(flow_steps):
        flow.append(AllInOneBlock, subnet_constructor=subnet_depthwise(step_kernel(step, conv3x3_only)), affine_clamping=clamp,
                    permute_soft=False)
    return flow


__all__ = ["build_scale_flow", "subnet_depthwise"]
