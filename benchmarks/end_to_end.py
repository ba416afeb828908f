"""End-to-end MSFlow: a training step and inference throughput, eager reference vs compile vs fused.

Providers:
    reference         the eager composition: the ``reference`` ops, the blocks as plain modules
                      (no fast paths: LayerNorm modules, separate scale/shift convs, F.conv2d) and
                      the positional condition concatenated to every subnet input as the official
                      model does, fp32
    compile           ``torch.compile`` of that composition (flows; the head stays eager), fp32
    msflow_fast       the auto backend (fused kernels), fp32
    msflow_fast-bf16  the auto backend under bf16 autocast (GPU only)

On a GPU: 512-px input, wide_resnet50_2 (random weights: speed does not depend on them), training
batch 8, inference batch 32 and 1. On CPU: 256-px input and resnet18 so the suite runs in minutes.
``smoke``: 64-px input, resnet18, one flow block per scale, batch 2 (checks the code paths only).
The backbone is frozen in every provider; "flows+head" rows time everything after the backbone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from msflow_fast import MSFlow, ops
from msflow_fast.nn import enable_fast_paths

from .harness import Job, Result, throughput_row, time_ms


def _settings(device: torch.device, smoke: bool = False) -> dict:
    if smoke:  # the code paths in seconds on a 2-core CPU: resnet18 at 64 px, one block per scale
        return {"backbone": "resnet18", "size": 64, "train_batch": 2, "infer_batches": (2,), "overrides": {"parallel_blocks": (1, 1, 1)}}
    if device.type == "cuda":
        return {"backbone": "wide_resnet50_2", "size": 512, "train_batch": 8, "infer_batches": (32, 1), "overrides": {}}
    return {"backbone": "resnet18", "size": 256, "train_batch": 4, "infer_batches": (8,), "overrides": {}}


@contextlib.contextmanager
def _fast_paths(model: torch.nn.Module, provider: str):
    """The eager lines run the blocks as plain modules; msflow_fast lines with the model's fast paths."""
    eager = provider in ("reference", "compile")
    if eager:
        enable_fast_paths(model, False)
    try:
        yield
    finally:
        if eager:
            enable_fast_paths(model, True)


def _context(provider: str, device: torch.device) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    if provider in ("reference", "compile"):
        stack.enter_context(ops.use_backend("reference"))
    if provider.endswith("bf16"):
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


def _providers(device: torch.device, with_compile: bool, bf16: bool | None = None) -> list[str]:
    """The providers in table order; ``bf16`` (default: on CUDA only) adds the autocast line."""
    providers = ["reference"] + (["compile"] if with_compile else []) + ["msflow_fast"]
    if bf16 is None:
        bf16 = device.type == "cuda"
    if bf16:
        providers.append("msflow_fast-bf16")
    return providers


def _peak_memory_mb(device: torch.device, fn: Callable[[], object]) -> float | None:
    """Peak memory allocated during one ``fn()`` call, in MiB, counting what was resident before it
    (model, optimizer state, inputs): the footprint of the step, not its increment. CUDA only."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _row(mode: str, provider: str, shape: str, device: torch.device, timing, images: int, peak: float | None) -> Result:
    return throughput_row("e2e", "MSFlow", mode, provider, shape, device, timing, images,
                          note="" if peak is None else f", peak {peak:.0f} MiB",
                          dtype="bfloat16" if provider.endswith("bf16") else "float32")


def run(
    device: torch.device, *, with_compile: bool = True, min_run_time: float = 0.5, smoke: bool = False, bf16: bool | None = None
) -> list[Result]:
    """Every job of :func:`jobs`, rows in table order."""
    results: list[tuple[tuple, int, Result]] = []
    for job in jobs(device, with_compile=with_compile, min_run_time=min_run_time, smoke=smoke, bf16=bf16):
        results += [(job.order, k, r) for k, r in enumerate(job.run())]
    return [r for *_, r in sorted(results, key=lambda item: item[:2])]


def jobs(
    device: torch.device, *, with_compile: bool = True, min_run_time: float = 0.5, smoke: bool = False, bf16: bool | None = None
) -> list[Job]:
    """One job per (phase, provider): the training step, then inference at each batch size.

    The jobs share one model (and the optimizer the training step updates); each sets train or eval
    mode itself, so they can run in any order (``harness.run_jobs`` runs the deferred
    ``compile`` jobs last). ``smoke`` shrinks the model and the images (see ``_settings``); ``bf16``
    adds the bf16-autocast line (default: on CUDA only).
    """
    cfg = _settings(device, smoke)
    torch.manual_seed(0)
    model = MSFlow(backbone=cfg["backbone"], pretrained=False, input_size=cfg["size"], **cfg["overrides"]).to(device)
    flow_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(flow_params, lr=1e-4)
    size = cfg["size"]
    providers = _providers(device, with_compile, bf16)
    out: list[Job] = []

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

    # One input batch resident at a time (peak memory counts what is resident), made on first use.
    resident: dict[tuple[str, int], tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def inputs_for(phase: str, batch: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images (and, for inference, their features), the same for every provider of a phase."""
        if (phase, batch) not in resident:
            resident.clear()
            images = torch.randn(batch, 3, size, size, device=device)
            with torch.no_grad():
                resident[phase, batch] = images, model.features(images) if phase == "infer" else []
        return resident[phase, batch]

    # ---- training step: features (frozen backbone) + flows + loss + backward + clip + Adam
    batch = cfg["train_batch"]
    train_shape = f"B{batch} {size}px {cfg['backbone']}"

    def train_job(provider: str) -> list[Result]:
        model.train()
        train_images, _ = inputs_for("train", batch)

        def train_step():
            with _context(provider, device):
                latents, logdet = flows_for(provider)(model.features(train_images))
                nll = ops.gaussian_nll(latents[0], logdet)
                for z in latents[1:]:
                    nll = nll + ops.gaussian_nll(z, torch.zeros_like(logdet))
                loss = nll.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow_params, 2.0)
            optimizer.step()

        with _fast_paths(model, provider):
            timing = time_ms(train_step, device, min_run_time=min_run_time)
            peak = _peak_memory_mb(device, train_step)
        return [_row("train step", provider, train_shape, device, timing, batch, peak)]

    for j, provider in enumerate(providers):
        out.append(Job(f"[e2e] train step {train_shape} {provider}", (0, j), lambda p=provider: train_job(p), provider == "compile"))

    # ---- inference: predict with and without the backbone
    def infer_job(infer_batch: int, provider: str) -> list[Result]:
        model.eval()
        images, features = inputs_for("infer", infer_batch)

        def flows_head():
            with torch.no_grad(), _context(provider, device):
                latents, _ = flows_for(provider)(features)
                return model.head(latents, (size, size))

        def full():
            with torch.no_grad(), _context(provider, device):
                latents, _ = flows_for(provider)(model.features(images))
                return model.head(latents, (size, size))

        rows = []
        shape = f"B{infer_batch} {size}px {cfg['backbone']}"
        for mode, fn in (("infer flows+head", flows_head), ("infer with backbone", full)):
            with _fast_paths(model, provider):
                timing = time_ms(fn, device, min_run_time=min_run_time)
                peak = _peak_memory_mb(device, fn)
            rows.append(_row(mode, provider, shape, device, timing, infer_batch, peak))
        return rows

    for i, infer_batch in enumerate(cfg["infer_batches"], start=1):
        for j, provider in enumerate(providers):
            out.append(
                Job(
                    f"[e2e] infer B{infer_batch} {size}px {cfg['backbone']} {provider}",
                    (i, j),
                    lambda b=infer_batch, p=provider: infer_job(b, p),
                    provider == "compile",
                )
            )
    return out
