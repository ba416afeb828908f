"""msflow_aas end to end: msflow_fast's MSFlowAAS against the eager composition of the same maths
(FrEIA 0.2 ``SequenceINN`` levels of FrEIA's ``AllInOneBlock`` with plain-PyTorch HPM subnets) on the
same weights, with CS-Flow (msflow_fast's) beside it for the cost the interpretation sets out to cut.

Providers:
    freia         :func:`freia_composition`: the same level wiring, FrEIA 0.2's AllInOneBlock (its
                  permutations 1x1 convolutions), the HPMs without fast paths, fp32: the baseline
    compile       ``torch.compile`` of the FrEIA composition (loss and head eager), fp32
    msflow_fast   :class:`msflow_fast.models.msflow_aas.MSFlowAAS`, auto backend, fp32
    csflow        :class:`msflow_fast.models.csflow.CSFlow` (msflow_fast's, default widths) on the
                  same features: not a provider of the same maths, the model MS-Flow compares itself to

Modes: a training step on extracted features (flow, loss, backward, clipping at 1, Adam step), inference
of flow + head from features, and inference with the backbone (EfficientNet-B5 stage 6 on the image at
three scales, the same extractor for every provider). CPU: default widths (304 channels, 8 blocks per
level, HPM width 704, 4 groups) at 256 px batch 8 and 512 px batch 4; CUDA: 768 px batch 16.
``smoke``: 2 blocks per level, HPM width 16, 128 px, batch 2, a one-conv stand-in backbone.
Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .harness import Job, Result, throughput_row, time_ms


def freia_composition(flow: nn.Module) -> nn.Module:
    """A copy of a :class:`~msflow_fast.models.msflow_aas.HierarchicalFlow` whose levels are FrEIA 0.2
    ``SequenceINN`` s of FrEIA's ``AllInOneBlock`` (same arguments, same weights, same keys) and whose
    HPM subnets run without fast paths: the eager composition of the same maths, for tests and
    benchmarks. Conditions are concatenated to the subnet input as FrEIA does; FrEIA needs the
    condition's full shape, so the copy is built for ``flow``'s channels and takes any grid whose
    levels halve (its condition shapes are set per call)."""
    from FrEIA.modules import AllInOneBlock as FrEIABlock

    from msflow_fast.nn import enable_fast_paths

    eager = copy.deepcopy(flow)
    enable_fast_paths(eager, False)
    levels = nn.ModuleList()
    for level in eager.levels:
        seq = _GridFreeSequence(level[0].in_channels)
        for block in level:
            freia_block = FrEIABlock(
                [(block.in_channels, 1, 1)],
                dims_c=[(block.condition_channels, 1, 1)] if block.condition_channels else [],
                subnet_constructor=lambda dim_in, dim_out, sub=block.subnet: sub,
                affine_clamping=block.clamp,
                global_affine_type="SOFTPLUS",
                permute_soft=False,
            ).to(block.global_scale.dtype)  # before loading: FrEIA builds float32 and would round the weights
            freia_block.load_state_dict(block.state_dict(), strict=True)
            seq.module_list.append(freia_block)
        levels.append(seq)
    eager.levels = levels
    return eager.to(next(flow.parameters()).device)


class _GridFreeSequence(nn.Module):
    """FrEIA ``SequenceINN.forward`` for blocks built for a ``[C, 1, 1]`` grid (FrEIA's AllInOneBlock
    only reads the channel count and the rank from its dims; the grid is free): the blocks in order
    (reversed with ``rev``), the condition given to each, log-dets summed."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.module_list = nn.ModuleList()

    def forward(self, x: torch.Tensor, c=None, rev: bool = False, jac: bool = True):
        blocks = reversed(self.module_list) if rev else self.module_list
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for block in blocks:
            (x,), ld = block([x], c=c or [], rev=rev, jac=jac)
            logdet = logdet + ld
        return x, logdet


def _settings(device: torch.device, smoke: bool) -> list[dict]:
    if smoke:
        return [{"size": 128, "batch": 2, "blocks": 2, "mid": 16, "backbone": None}]
    if device.type == "cuda":
        return [{"size": 768, "batch": 16, "blocks": 8, "mid": 704, "backbone": "tf_efficientnet_b5"}]
    return [
        {"size": 256, "batch": 8, "blocks": 8, "mid": 704, "backbone": "tf_efficientnet_b5"},
        {"size": 512, "batch": 4, "blocks": 8, "mid": 704, "backbone": "tf_efficientnet_b5"},
    ]


def _models(cfg: dict, device: torch.device):
    from msflow_fast.models.csflow import CSFlow
    from msflow_fast.models.msflow_aas import MSFlowAAS

    torch.manual_seed(0)
    backbone = cfg["backbone"] or nn.Conv2d(3, 304, 32, stride=32)
    ours = MSFlowAAS(input_size=cfg["size"], backbone=backbone, pretrained=False, blocks_per_level=cfg["blocks"], hpm_mid=cfg["mid"])
    eager = freia_composition(ours.flow)
    cs = CSFlow(input_size=cfg["size"], backbone=copy.deepcopy(ours.extractor.backbone), hidden_channels=32 if cfg["backbone"] is None else 1024)
    with torch.no_grad():
        for p in cs.flow.parameters():
            if p.numel() == 1:
                p.fill_(0.1)  # the gammas: at 0 every coupling would be the identity
    return ours.to(device), eager.to(device), cs.to(device)


def _row(mode: str, provider: str, shape: str, device: torch.device, timing, images: int) -> Result:
    return throughput_row("msflow_aas", "MS-Flow (AAS), interpretation", mode, provider, shape, device, timing, images)


def jobs(device: torch.device, *, with_compile: bool = True, min_run_time: float = 0.5, smoke: bool = False) -> list[Job]:
    """One job per (setting, provider): training step and the two inference modes."""
    providers = ["freia"] + (["compile"] if with_compile else []) + ["msflow_fast", "csflow"]
    out: list[Job] = []
    for b, cfg in enumerate(_settings(device, smoke)):
        shape = f"B{cfg['batch']} {cfg['size']}px K{cfg['blocks']} mid {cfg['mid']}"
        state: dict = {}

        def setup(cfg=cfg, state=state):
            if not state:
                ours, eager, cs = _models(cfg, device)
                images = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device)
                ours.eval()
                state.update(ours=ours, eager=eager, cs=cs, images=images, features=ours.frozen_features(images), compiled=None)
            return state

        for j, provider in enumerate(providers):
            out.append(Job(f"[msflow_aas] {shape} {provider}", (b, j), lambda p=provider, s=shape, setup=setup: _run(p, s, setup(), device, min_run_time), provider == "compile"))
    return out


def _run(provider: str, shape: str, state: dict, device: torch.device, min_run_time: float) -> list[Result]:
    from msflow_fast.models.image_pyramid import per_dimension_nll
    from msflow_fast.models.msflow_aas.head import predict_from_latents

    ours, eager, cs, images, features = state["ours"], state["eager"], state["cs"], state["images"], state["features"]
    size = tuple(images.shape[-2:])
    if provider == "compile" and state["compiled"] is None:
        state["compiled"] = torch.compile(eager)
    flow = state["compiled"] if provider == "compile" else eager
    model = {"msflow_fast": ours, "csflow": cs}.get(provider, eager)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=2e-4, eps=1e-4, weight_decay=1e-5)

    def train_step():
        model.train()
        if provider in ("msflow_fast", "csflow"):
            loss = model.loss({"features": features})
        else:
            loss = per_dimension_nll(*flow(features))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    def infer_flows_head():
        with torch.no_grad():
            if provider == "csflow":
                from msflow_fast.models.csflow.head import predict_from_latents as cs_head

                return cs_head(cs.flow(features)[0], size, "largest_scale")
            latents, _ = (ours.flow if provider == "msflow_fast" else flow)(features)
            return predict_from_latents(latents, size)

    def infer_full():
        with torch.no_grad():
            if provider in ("msflow_fast", "csflow"):
                return model.predict(images)
            return predict_from_latents(flow(ours.frozen_features(images))[0], size)

    rows = []
    batch = images.shape[0]
    for mode, fn in (("train step", train_step), ("infer flows+head", infer_flows_head), ("infer with backbone", infer_full)):
        model.eval()
        rows.append(_row(mode, provider, shape, device, time_ms(fn, device, min_run_time=min_run_time), batch))
    return rows


__all__ = ["freia_composition", "jobs"]
