"""CS-Flow end to end: msflow_fast's CSFlow against anomalib 2.7's eager ``CrossScaleFlow`` on the same weights.

Providers:
    anomalib      anomalib's ``CrossScaleFlow`` (a FrEIA ``GraphINN`` of ``ParallelPermute`` and
                  ``ParallelGlowCouplingLayer`` with ``CrossConvolutions``), its ``CsFlowLoss``, its
                  anomaly-map generator (product over scales) and score, fp32: the baseline
    compile       ``torch.compile`` of anomalib's flow (loss and head eager), fp32
    msflow_fast   :class:`msflow_fast.models.csflow.CSFlow` loaded from anomalib's weights
                  (``permutation="anomalib"``, ``anomaly_map="product"``), auto backend, fp32

Modes: a training step on extracted features (flow, loss, backward, Adam step: CS-Flow trains on
features extracted once), inference of flow + head from features, and inference with the backbone
(EfficientNet-B5 stage 6, timm, on the image at three scales; the same extractor for every provider,
since anomalib's builds torchvision's pretrained network). CPU: the default CS-Flow (304 channels,
hidden 1024, kernels 3-3-3-5) at 256 px batch 8 and 512 px batch 4; CUDA: 768 px batch 16.
``smoke``: hidden 32, 128 px, batch 2, a one-conv stand-in backbone (anomalib's graph is built
for 304 channels, so every setting has them). Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import torch

from .harness import Job, Result, throughput_row, time_ms


def _settings(device: torch.device, smoke: bool) -> list[dict]:
    if smoke:
        return [{"size": 128, "batch": 2, "hidden": 32, "channels": 304, "backbone": None}]
    if device.type == "cuda":
        return [{"size": 768, "batch": 16, "hidden": 1024, "channels": 304, "backbone": "tf_efficientnet_b5"}]
    return [
        {"size": 256, "batch": 8, "hidden": 1024, "channels": 304, "backbone": "tf_efficientnet_b5"},
        {"size": 512, "batch": 4, "hidden": 1024, "channels": 304, "backbone": "tf_efficientnet_b5"},
    ]


def _models(cfg: dict, device: torch.device):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from anomalib.models.image.csflow.torch_model import CrossScaleFlow

    from msflow_fast.models.csflow import CSFlow, load_anomalib

    torch.manual_seed(0)
    size = cfg["size"]
    theirs = CrossScaleFlow(input_dims=(3, size, size), n_coupling_blocks=4, clamp=3, cross_conv_hidden_channels=cfg["hidden"])
    with torch.no_grad():
        for p in theirs.parameters():
            if p.numel() == 1:
                p.fill_(0.1)  # the gammas: at 0 every coupling would be the identity
    backbone = cfg["backbone"] or torch.nn.Conv2d(3, cfg["channels"], 32, stride=32)
    ours = CSFlow(input_size=size, backbone=backbone, pretrained=False, hidden_channels=cfg["hidden"], permutation="anomalib", anomaly_map="product")
    load_anomalib(ours, theirs.state_dict())
    return theirs.to(device), ours.to(device)


def _row(mode: str, provider: str, shape: str, device: torch.device, timing, images: int) -> Result:
    return throughput_row("csflow", "CS-Flow", mode, provider, shape, device, timing, images)


def jobs(device: torch.device, *, with_compile: bool = True, min_run_time: float = 0.5, smoke: bool = False) -> list[Job]:
    """One job per (setting, provider): training step and the two inference modes."""
    providers = ["anomalib"] + (["compile"] if with_compile else []) + ["msflow_fast"]
    out: list[Job] = []
    for b, cfg in enumerate(_settings(device, smoke)):
        shape = f"B{cfg['batch']} {cfg['size']}px hidden {cfg['hidden']}"
        state: dict = {}

        def setup(cfg=cfg, state=state):
            if not state:
                theirs, ours = _models(cfg, device)
                images = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device)
                ours.eval()
                features = ours.frozen_features(images)
                state.update(theirs=theirs, ours=ours, images=images, features=features, compiled=None)
            return state

        for j, provider in enumerate(providers):
            out.append(Job(f"[csflow] {shape} {provider}", (b, j), lambda p=provider, s=shape, setup=setup: _run(p, s, setup(), device, min_run_time), provider == "compile"))
    return out


def _run(provider: str, shape: str, state: dict, device: torch.device, min_run_time: float) -> list[Result]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from anomalib.models.image.csflow.anomaly_map import AnomalyMapGenerator, AnomalyMapMode
        from anomalib.models.image.csflow.loss import CsFlowLoss
        from anomalib.models.image.csflow.torch_model import CsFlowModel

    from msflow_fast.models.csflow.head import predict_from_latents

    theirs, ours, images, features = state["theirs"], state["ours"], state["images"], state["features"]
    size = tuple(images.shape[-2:])
    if provider == "compile" and state["compiled"] is None:
        state["compiled"] = torch.compile(theirs)
    flow = state["compiled"] if provider == "compile" else theirs
    model = ours if provider == "msflow_fast" else theirs
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, eps=1e-4, weight_decay=1e-5)
    their_loss = CsFlowLoss()
    their_maps = AnomalyMapGenerator((3, *size), AnomalyMapMode.ALL)

    def train_step():
        model.train()
        if provider == "msflow_fast":
            loss = ours.loss({"features": features})
        else:
            latents, jac = flow(features)
            loss = their_loss(latents, jac)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def head(feats):
        if provider == "msflow_fast":
            latents, _ = ours.flow(feats)
            return predict_from_latents(latents, size, "product")
        latents, _ = flow(feats)
        return their_maps(latents), CsFlowModel._compute_anomaly_scores(latents)

    def infer_flows_head():
        with torch.no_grad():
            return head(features)

    def infer_full():
        with torch.no_grad():
            if provider == "msflow_fast":
                return ours.predict(images)
            return head(ours.frozen_features(images))

    rows = []
    batch = images.shape[0]
    for mode, fn in (("train step", train_step), ("infer flows+head", infer_flows_head), ("infer with backbone", infer_full)):
        model.eval()
        rows.append(_row(mode, provider, shape, device, time_ms(fn, device, min_run_time=min_run_time), batch))
    return rows


__all__ = ["jobs"]
