"""models.complexity: parameter counts and FLOPs per image, checked against independent counts and
hand formulas, the fast paths (which the counter would miss) switched off and restored, and the
``models --flops`` table of the command line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from msflow_fast import FastFlow, MSFlow, cli
from msflow_fast.models import complexity
from msflow_fast.nn import enable_fast_paths
from test_engine_protocol import TinyFlowModel

SIZE = 64


def _flops(function, *args) -> int:
    """An independent count: torch's counter as it is, over one call."""
    with FlopCounterMode(display=False) as counter:
        function(*args)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def tiny_msflow() -> MSFlow:
    torch.manual_seed(0)
    return MSFlow(input_size=SIZE, backbone="resnet18", pretrained=False, parallel_blocks=(1, 1, 1))


@pytest.fixture(scope="module")
def tiny_fastflow() -> FastFlow:
    torch.manual_seed(0)
    return FastFlow(input_size=SIZE, backbone="resnet18", pretrained=False, flow_steps=2)


class OneConv(nn.Module):
    """A backbone of one convolution: ``[B, 3, H, W] -> [[B, 64, H / 4, W / 4]]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, kernel_size=4, stride=4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.conv(x)]


@pytest.mark.parametrize("name", ["tiny_msflow", "tiny_fastflow"])
def test_parameters_are_split_by_requires_grad(name, request):
    model = request.getfixturevalue(name)
    report = complexity.measure(model, train_step=False)
    params = list(model.parameters())
    assert report.parameters == sum(p.numel() for p in params)
    assert report.trainable_parameters == sum(p.numel() for p in params if p.requires_grad) > 0
    assert report.frozen_parameters == sum(p.numel() for p in params if not p.requires_grad)
    assert report.frozen_parameters == sum(p.numel() for p in model.extractor.parameters())
    assert report.model == model.name and report.input_size == (SIZE, SIZE)


@pytest.mark.parametrize("name", ["tiny_msflow", "tiny_fastflow"])
def test_whole_model_is_backbone_plus_flows_and_head(name, request):
    model = request.getfixturevalue(name)
    report = complexity.measure(model, batch=2, train_step=False)
    images = torch.randn(2, 3, SIZE, SIZE)
    backbone = _flops(model.extractor, images) / 2  # pooling (MSFlow) and the stage norms (FastFlow) count 0
    assert report.frozen_flops == backbone > 0
    # The rest counted on its own, on the plain modules: the flows and the head of the frozen features.
    enable_fast_paths(model, False)
    try:
        model.eval()
        with torch.no_grad():
            features = model.frozen_features(images)
            if isinstance(model, MSFlow):
                rest = _flops(lambda: model.head(model.flows(features).latents, (SIZE, SIZE))) / 2
            else:
                rest = _flops(lambda: model.head(model.flows_of(model.normalize(features)).latents, (SIZE, SIZE))) / 2
            whole = _flops(model.predict, images) / 2
    finally:
        enable_fast_paths(model, True)
    assert report.rest_flops == rest > 0
    assert report.predict_flops == whole == backbone + rest
    assert report.to_dict()["rest_flops"] == rest


def test_hand_count_of_a_one_conv_backbone_and_two_flow_steps():
    """Every count from a formula: 2 x multiply-adds = 2 * C_out * C_in * k * k * H_out * W_out per conv."""
    model = FastFlow(input_size=SIZE, backbone=OneConv(), flow_steps=2, conv3x3_only=True)
    grid = SIZE // 4  # 16 x 16 features, 64 channels
    backbone = 2 * 64 * 3 * 4 * 4 * grid * grid
    half = 64 // 2  # each step: Conv3x3(32 -> 32), ReLU, Conv3x3(32 -> 64)
    step = 2 * 3 * 3 * (half * half + half * 64) * grid * grid
    report = complexity.measure(model)
    assert report.frozen_flops == backbone
    assert report.rest_flops == 2 * step  # the norms and the map head count 0
    # Backward: the gradients of each conv's input and weight (the trainable norms come first) cost
    # one forward each.
    assert report.train_step_flops == 3 * 2 * step
    # With the fast paths on, CPU inference runs these convs by Winograd in a custom op torch's
    # counter does not see: counting predict as it runs would miss them.
    with torch.no_grad():
        as_it_runs = _flops(model.predict, torch.randn(1, 3, SIZE, SIZE))
    assert as_it_runs < backbone + 2 * step
    assert "msflow_fast::conv3x3_winograd_fwd" not in report.uncounted_ops
    assert "msflow_fast::coupling_affine_permute_fwd" in report.uncounted_ops  # a fused elementwise op: 0


def test_the_model_is_left_as_it_was(tiny_msflow):
    model = tiny_msflow
    cached = [m for m in model.modules() if hasattr(m, "fast_paths")]
    assert len(cached) > 3
    # A mixed pattern: on, off, and the class default (no instance attribute).
    for i, module in enumerate(cached):
        if i % 3 == 0:
            module.fast_paths = True
        elif i % 3 == 1:
            module.fast_paths = False
        else:
            module.__dict__.pop("fast_paths", None)
    flags = [(m, dict(m.__dict__).get("fast_paths", "unset")) for m in cached]
    model.train()
    model.fusion_flow.eval()
    modes = [(m, m.training) for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    try:
        complexity.measure(model, batch=2)
        assert [dict(m.__dict__).get("fast_paths", "unset") for m, _ in flags] == [f for _, f in flags]
        assert all(m.training == training for m, training in modes)
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        enable_fast_paths(model, True)
        model.eval()


def test_a_model_without_a_frozen_part_is_all_rest():
    model = TinyFlowModel(input_size=16)
    report = complexity.measure(model, batch=2)
    # The fixed 3x3 colour mix, an einsum over every pixel: 2 * 3 * 3 * 16 * 16 per image.
    assert report.frozen_flops is None
    assert report.predict_flops == report.rest_flops == 2 * 3 * 3 * 16 * 16
    assert report.train_step_flops == 2 * 3 * 3 * 16 * 16  # the mix runs without autograd: no backward FLOPs
    assert report.parameters == report.trainable_parameters == 6 and report.frozen_parameters == 0


def test_cpu_attention_is_counted_like_its_matrix_products():
    q, k, v = (torch.randn(2, 4, 64, 32, requires_grad=True) for _ in range(3))
    manual = _flops(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v)
    assert _flops(F.scaled_dot_product_attention, q, k, v) == 0  # what torch's counter alone gives on the CPU
    assert complexity.count_flops(F.scaled_dot_product_attention, q, k, v).flops == manual
    with_backward = complexity.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()).flops
    assert with_backward == manual + 2 * 64 * 64 * 8 * (3 * 32 + 2 * 32)


def test_bad_arguments_name_the_problem(tiny_fastflow):
    with pytest.raises(TypeError, match="AnomalyModel"):
        complexity.measure(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="batch must be >= 1"):
        complexity.measure(tiny_fastflow, batch=0)
    with pytest.raises(ValueError, match="images must be 64x64"):  # [C, H, W] norms are built for one size
        complexity.measure(tiny_fastflow, 128)


def test_cli_prints_the_table(capsys):
    assert cli.main(["models", "--flops", "--model", "fastflow", "tiny_flow", "--input-size", str(SIZE)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "parameters (M)" in lines[0] and "GFLOPs per image" in lines[0]
    assert lines[1].split() == ["model", "input", "total", "trainable", "model", "backbone", "flows+head", "train", "step"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:4]}
    model = FastFlow(input_size=SIZE, pretrained=False)
    report = complexity.measure(model)
    expected = [f"{SIZE}x{SIZE}", f"{report.parameters / 1e6:.2f}", f"{report.trainable_parameters / 1e6:.2f}"] + [
        f"{value / 1e9:.2f}" for value in (report.predict_flops, report.frozen_flops, report.rest_flops, report.train_step_flops)
    ]
    assert rows["fastflow"] == expected
    assert rows["tiny_flow"][0] == f"{SIZE}x{SIZE}" and rows["tiny_flow"][4] == "-"  # no frozen part
    assert any("2 x the multiply-adds" in line for line in lines[4:])


def test_cli_errors_are_one_line_with_status_2(capsys):
    assert cli.main(["models", "--flops", "--model", "fastflw"]) == 2
    captured = capsys.readouterr()
    assert "unknown model 'fastflw'" in captured.err and captured.out == ""
    assert cli.main(["models", "--flops", "--model", "fastflow", "--input-size", "50"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("msflow-fast models: error: fastflow: input_size") and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert cli.main(["models", "--input-size", "64"]) == 2
    assert "add --flops" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli.main(["models", "--flops", "--input-size", "0"])
    assert stop.value.code == 2
