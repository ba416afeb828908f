"""End-to-end MSFlow: a training step and inference throughput, eager reference vs compile vs fused.

Providers:
    reference         the eager composition: the ``reference`` ops, and the positional condition
                      concatenated to every subnet input as the official model does, fp32
    compile           ``torch.compile`` of that composition (flows; the head stays eager), fp32
    msflow_fast       the auto backend (fused kernels), fp32
    msflow_fast-bf16  the auto backend under bf16 autocast (GPU only)

On a GPU: 512-px input, wide_resnet50_2 (random weights: speed does not depend on them), training
batch 8, inference batch 32 and 1. On CPU: 256-px input and resnet18 so the suite runs in minutes.
The backbone is frozen in every provider; "flows+head" rows time everything after the backbone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from msflow_fast import MSFlow, ops

from .harness import Result, time_ms


def _settings(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"backbone": "wide_resnet50_2", "size": 512, "train_batch": 8, "infer_batches": (32, 1)}
    return {"backbone": "resnet18", "size": 256, "train_batch": 4, "infer_batches": (8,)}


def _context(provider: str, device: torch.device) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    if provider in ("reference", "compile"):
        stack.enter_context(ops.use_backend("reference"))
    if provider.endswith("bf16"):
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


def _providers(device: torch.device, with_compile: bool) -> list[str]:
    providers = ["reference"] + (["compile"] if with_compile else []) + ["msflow_fast"]
    if device.type == "cuda":
        providers.append("msflow_fast-bf16")
    return providers


def _peak_memory_mb(device: torch.device, fn: Callable[[], object]) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _row(mode: str, provider: str, shape: str, device: torch.device, timing, images: int, peak: float | None) -> Result:
    median, p20, p80 = timing
    extra = f"{images / (median * 1e-3):.1f} img/s"
    if peak is not None:
        extra += f", peak {peak:.0f} MiB"
    return Result(
        suite="e2e",
        op="MSFlow",
        provider=provider,
        mode=mode,
        shape=shape,
        dtype="bfloat16" if provider.endswith("bf16") else "float32",
        device=device.type,
        median_ms=median,
        p20_ms=p20,
        p80_ms=p80,
        extra=extra,
    )


def run(device: torch.device, *, with_compile: bool = True, min_run_time: float = 0.5) -> list[Result]:
    cfg = _settings(device)
    torch.manual_seed(0)
    model = MSFlow(backbone=cfg["backbone"], pretrained=False, input_size=cfg["size"]).to(device)
    flow_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(flow_params, lr=1e-4)
    size = cfg["size"]
    results: list[Result] = []

    def eager_flows(features: list[torch.Tensor]):
        # The official composition: positional conditions materialised per sample and
        # concatenated to each subnet input (no batch-constant conv1 split), on whatever ops
        # the caller's backend context selects.
        conds = [model.positional(f.shape[0], f.shape[2], f.shape[3], f.device, f.dtype).contiguous() for f in features]
        outs, logdets = model.parallel_flows(features, conds)
        latents, logdet_fusion = model.fusion_flow(outs)
        return latents, sum(logdets) + logdet_fusion

    compiled_flows = torch.compile(eager_flows) if with_compile else None

    def flows_for(provider: str):
        if provider == "compile":
            return compiled_flows
        return eager_flows if provider == "reference" else model.flows

    # ---- training step: features (frozen backbone) + flows + loss + backward + clip + Adam
    batch = cfg["train_batch"]
    images = torch.randn(batch, 3, size, size, device=device)
    for provider in _providers(device, with_compile):

        def train_step(provider=provider):
            with _context(provider, device):
                latents, logdet = flows_for(provider)(model.features(images))
                nll = ops.gaussian_nll(latents[0], logdet)
                for z in latents[1:]:
                    nll = nll + ops.gaussian_nll(z, torch.zeros_like(logdet))
                loss = nll.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow_params, 2.0)
            optimizer.step()

        timing = time_ms(train_step, device, min_run_time=min_run_time)
        peak = _peak_memory_mb(device, train_step)
        results.append(_row("train step", provider, f"B{batch} {size}px {cfg['backbone']}", device, timing, batch, peak))

    # ---- inference: predict with and without the backbone
    model.eval()
    for infer_batch in cfg["infer_batches"]:
        images = torch.randn(infer_batch, 3, size, size, device=device)
        with torch.no_grad():
            features = model.features(images)
        for provider in _providers(device, with_compile):

            def flows_head(provider=provider):
                with torch.no_grad(), _context(provider, device):
                    latents, _ = flows_for(provider)(features)
                    return model.head(latents, (size, size))

            def full(provider=provider):
                with torch.no_grad(), _context(provider, device):
                    latents, _ = flows_for(provider)(model.features(images))
                    return model.head(latents, (size, size))

            for mode, fn in (("infer flows+head", flows_head), ("infer with backbone", full)):
                timing = time_ms(fn, device, min_run_time=min_run_time)
                peak = _peak_memory_mb(device, fn)
                results.append(_row(mode, provider, f"B{infer_batch} {size}px {cfg['backbone']}", device, timing, infer_batch, peak))
    return results
