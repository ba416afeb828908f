"""FastFlow end to end: msflow_fast's FastFlow against anomalib 2.7's eager ``FastflowModel`` on the same weights.

Providers:
    anomalib      anomalib's ``FastflowModel`` (FrEIA-0.2-style AllInOneBlock copy, permutations as
                  1x1 convolutions, ``nn.LayerNorm``), fp32: the baseline of the speed-ups
    compile       ``torch.compile`` of anomalib's norms + flows (the head stays eager), fp32
    msflow_fast   :class:`msflow_fast.FastFlow` loaded from anomalib's weights, auto backend, fp32

Modes: a training step (backbone, norms, flows, loss, backward, Adam step), inference of norms +
flows + head from precomputed backbone features, and inference with the backbone. CPU: resnet18
(3-3) and wide_resnet50_2 (3-1) at 256 px, batch 8; CUDA: the same at batch 32. ``smoke``: resnet18
at 64 px with two steps, batch 2. Backbones are random (speed does not depend on the weights).

:func:`flow_macs` counts, with torch's FLOP counter, the multiply-adds of both models' flows per
image and preset: the difference is the permutations, 1x1 convolutions in anomalib's block and
channel gathers (no multiply-add) in msflow_fast's.
"""

from __future__ import annotations

import torch

from .harness import Job, Result, throughput_row, time_ms

BACKBONES = (("resnet18", True), ("wide_resnet50_2", False))  # (name, conv3x3_only): the presets


def _settings(device: torch.device, smoke: bool) -> dict:
    if smoke:
        return {"size": 64, "batch": 2, "steps": 2, "backbones": BACKBONES[:1]}
    return {"size": 256, "batch": 32 if device.type == "cuda" else 8, "steps": 8, "backbones": BACKBONES}


def _models(backbone: str, conv3x3_only: bool, size: int, steps: int, device: torch.device):
    from anomalib.models.image.fastflow.torch_model import FastflowModel

    from msflow_fast import FastFlow
    from msflow_fast.models.fastflow import load_anomalib

    torch.manual_seed(0)
    theirs = FastflowModel(input_size=(size, size), backbone=backbone, pre_trained=False, flow_steps=steps, conv3x3_only=conv3x3_only, hidden_ratio=1.0)
    ours = FastFlow(input_size=size, backbone=backbone, pretrained=False, flow_steps=steps, conv3x3_only=conv3x3_only, hidden_ratio=1.0)
    load_anomalib(ours, theirs.state_dict())
    return theirs.to(device), ours.to(device)


def _row(mode: str, provider: str, shape: str, device: torch.device, timing, images: int) -> Result:
    return throughput_row("fastflow", "FastFlow", mode, provider, shape, device, timing, images)


def jobs(device: torch.device, *, with_compile: bool = True, min_run_time: float = 0.5, smoke: bool = False) -> list[Job]:
    """One job per (backbone, provider): training step and the two inference modes."""
    cfg = _settings(device, smoke)
    providers = ["anomalib"] + (["compile"] if with_compile else []) + ["msflow_fast"]
    out: list[Job] = []
    for b, (backbone, conv3x3_only) in enumerate(cfg["backbones"]):
        shape = f"B{cfg['batch']} {cfg['size']}px {backbone} {'3-3' if conv3x3_only else '3-1'}"
        state: dict = {}

        def setup(backbone=backbone, conv3x3_only=conv3x3_only, state=state):
            if not state:
                theirs, ours = _models(backbone, conv3x3_only, cfg["size"], cfg["steps"], device)
                images = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device)
                with torch.no_grad():
                    theirs.eval()
                    features = theirs.feature_extractor(images)
                state.update(theirs=theirs, ours=ours, images=images, features=features, compiled=None)
            return state

        for j, provider in enumerate(providers):
            out.append(
                Job(f"[fastflow] {shape} {provider}", (b, j), lambda p=provider, s=shape, setup=setup: _run(p, s, setup(), device, min_run_time), provider == "compile")
            )
    return out


def _anomalib_flows(theirs, features):
    feats = [norm(f) for norm, f in zip(theirs.norms, features)]
    latents, logdets = [], []
    for block, f in zip(theirs.fast_flow_blocks, feats):
        z, ld = block(f)
        latents.append(z)
        logdets.append(ld)
    return latents, logdets


def _run(provider: str, shape: str, state: dict, device: torch.device, min_run_time: float) -> list[Result]:
    theirs, ours, images, features = state["theirs"], state["ours"], state["images"], state["features"]
    size = tuple(images.shape[-2:])
    if provider == "compile" and state["compiled"] is None:
        state["compiled"] = torch.compile(lambda feats: _anomalib_flows(theirs, feats))
    flows = state["compiled"] if provider == "compile" else (lambda feats: _anomalib_flows(theirs, feats))
    model = ours if provider == "msflow_fast" else theirs
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-5)

    def train_step():
        model.train()
        if provider == "msflow_fast":
            loss = ours.loss(images)
        else:
            with torch.no_grad():
                theirs.feature_extractor.eval()
                feats = theirs.feature_extractor(images)
            latents, logdets = flows(feats)
            loss = sum((0.5 * z.square().sum(dim=(1, 2, 3)) - ld).mean() for z, ld in zip(latents, logdets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def head(latents):
        amap = theirs.anomaly_map_generator(latents)
        return torch.amax(amap, dim=(-2, -1))

    def infer_flows_head():
        with torch.no_grad():
            if provider == "msflow_fast":
                feats = [norm(f) for norm, f in zip(ours.norms, features)]
                latents = [flow(f)[0] for flow, f in zip(ours.flows, feats)]
                return ours.head(latents, size)
            return head(flows(features)[0])

    def infer_full():
        with torch.no_grad():
            if provider == "msflow_fast":
                return ours.predict(images)
            theirs.feature_extractor.eval()
            return head(flows(theirs.feature_extractor(images))[0])

    rows = []
    batch = images.shape[0]
    for mode, fn in (("train step", train_step), ("infer flows+head", infer_flows_head), ("infer with backbone", infer_full)):
        model.eval()
        rows.append(_row(mode, provider, shape, device, time_ms(fn, device, min_run_time=min_run_time), batch))
    return rows


def flow_macs(preset: str) -> tuple[int, int]:
    """``(anomalib's, msflow_fast's)`` multiply-adds of a preset's flows per image, counted with
    ``torch.utils.flop_counter`` (one forward of the flows on features of the preset's shapes; no
    backbone is built). The difference is what the permutations cost as 1x1 convolutions."""
    from torch.utils.flop_counter import FlopCounterMode

    from anomalib.models.image.fastflow.torch_model import create_fast_flow_block

    from msflow_fast.models.fastflow import PRESETS, build_stage_flow

    channels_and_strides = {
        "resnet18": ([64, 128, 256], [4, 8, 16]),
        "wide_resnet50_2": ([256, 512, 1024], [4, 8, 16]),
        "deit": ([768], [16]),
        "cait": ([768], [16]),
    }[preset]
    settings = PRESETS[preset]
    height = settings["input_size"][0]
    theirs_total = ours_total = 0
    for channels, stride in zip(*channels_and_strides):
        grid = height // stride
        theirs = create_fast_flow_block([channels, grid, grid], settings["conv3x3_only"], settings["hidden_ratio"], settings["flow_steps"])
        ours = build_stage_flow(channels, grid, grid, settings["flow_steps"], conv3x3_only=settings["conv3x3_only"], hidden_ratio=settings["hidden_ratio"])
        x = torch.randn(1, channels, grid, grid)
        for flow, which in ((theirs, 0), (ours, 1)):
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                flow(x)
            total = counter.get_total_flops() // 2  # multiply-adds
            if which == 0:
                theirs_total += total
            else:
                ours_total += total
    return theirs_total, ours_total


__all__ = ["flow_macs", "jobs"]
