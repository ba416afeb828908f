"""FastFlow's flow per feature stage (MODELS_SPEC.md Part A §1.3.2): ``flow_steps`` AllInOneBlocks on
``(C, H, W)``, clamp 2.0 in the FrEIA-0.2 form, Conv-ReLU-Conv subnets whose kernel alternates 3x3 / 1x1."""

from __future__ import annotations

from ...nn import AllInOneBlock, SequenceFlow, subnet_conv_relu
from ..stage_flow import step_kernel


def build_stage_flow(
    channels: int,
    height: int,
    width: int,
    flow_steps: int,
    *,
    conv3x3_only: bool,
    hidden_ratio: float,
    clamp: float = 2.0,
    clamp_form: str = "tanh",
) -> SequenceFlow:
    """One stage's flow: the structure and ``state_dict`` keys (``module_list.{i}.subnet.{0,2}.*``) of
    anomalib's ``create_fast_flow_block`` / gathierry's ``nf_fast_flow`` (FrEIA ``SequenceINN``)."""
    flow = SequenceFlow(channels, height, width)
    for step in range(flow_steps):
        flow.append(
            AllInOneBlock,
            subnet_constructor=subnet_conv_relu(step_kernel(step, conv3x3_only), hidden_ratio),
            affine_clamping=clamp,
            permute_soft=False,
            clamp_form=clamp_form,
        )
    return flow


__all__ = ["build_stage_flow", "step_kernel"]
