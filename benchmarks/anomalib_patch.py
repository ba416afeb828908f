"""anomalib's flow models, stock against patched (:func:`msflow_fast.integrations.anomalib.patched`) on the same weights.

Providers:
    anomalib      the stock model (anomalib 2.7's own AllInOneBlock copy: permutations as 1x1 convolutions), fp32: the baseline
    msflow_fast   the same model built inside ``patched()`` (msflow_fast's fused block), its weights loaded from the stock one

Modes: a training step as anomalib's Lightning module runs it (forward in train mode, anomalib's loss,
backward, Adam step; CFlow: its per-fiber-batch loop over every fiber of the image batch, one
optimizer step per fiber batch, loss ``-logsigmoid(log p / C)``), and inference (``model.eval()(images)``,
backbone included). CPU: FastFlow resnet18 (flow steps 8, 3-1 subnets) at 256 px batch 8; CFlow
resnet18 layers 2-3 (8 coupling blocks, fibers of 64, condition 128) at 256 px batch 2; U-Flow
resnet18 (4 flow steps) at 256 px batch 4. CUDA: the same at larger batches. ``smoke``: 64 px,
batch 2, two flow steps. Backbones are random (``pre_trained=False``; U-Flow's extractor, which
always asks timm for pretrained weights, is built with ``pretrained=False``).

Fiber blocks: one CFlow decoder block (anomalib's ``cflow_head`` block: condition 128, clamp 1.9,
SOFTPLUS global affine, ``subnet_fc``) on fibers ``[N, C]``, forward in train mode and forward +
backward, stock against patched (auto backend: the C++ op on CPU) and patched on the reference
backend (``use_backend("reference")``, the pure-PyTorch maths). CPU: N 64 (CFlow's fiber batch)
and 256, C 128/256 (resnet18 layers 2-3) and 1024 (wide_resnet50 layer 3); ``smoke``: N 64, C 33.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from .harness import Job, Result, throughput_row, time_ms


def _settings(device: torch.device, smoke: bool) -> list[dict]:
    scale = 4 if device.type == "cuda" else 1
    if smoke:
        return [
            {"model": "fastflow", "size": 64, "batch": 2, "steps": 2},
            {"model": "cflow", "size": 64, "batch": 2, "steps": 2},
            {"model": "uflow", "size": 64, "batch": 2, "steps": 2},
        ]
    return [
        {"model": "fastflow", "size": 256, "batch": 8 * scale, "steps": 8},
        {"model": "cflow", "size": 256, "batch": 2 * scale, "steps": 8},
        {"model": "uflow", "size": 256, "batch": 4 * scale, "steps": 4},
    ]


@contextlib.contextmanager
def _no_pretrained_download():
    import timm

    create = timm.create_model
    timm.create_model = lambda *a, **k: create(*a, **{**k, "pretrained": False})
    try:
        yield
    finally:
        timm.create_model = create


def _build(cfg: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import anomalib.models.image.cflow.torch_model as cflow_torch
        import anomalib.models.image.fastflow.torch_model as fastflow_torch
        import anomalib.models.image.uflow.torch_model as uflow_torch
    size, steps = cfg["size"], cfg["steps"]
    if cfg["model"] == "fastflow":
        return fastflow_torch.FastflowModel(input_size=(size, size), backbone="resnet18", pre_trained=False, flow_steps=steps, conv3x3_only=False)
    if cfg["model"] == "cflow":
        return cflow_torch.CflowModel(backbone="resnet18", layers=["layer2", "layer3"], pre_trained=False, fiber_batch_size=64, coupling_blocks=steps)
    with _no_pretrained_download():
        return uflow_torch.UflowModel(input_size=(size, size), flow_steps=steps, backbone="resnet18")


def _fiber_settings(device: torch.device, smoke: bool) -> list[tuple[int, int]]:
    if smoke:
        return [(64, 33)]
    scale = 4 if device.type == "cuda" else 1
    return [(64 * scale, 128), (64 * scale, 256), (64 * scale, 1024), (256 * scale, 128), (256 * scale, 1024)]


def _fiber_blocks(channels: int, device: torch.device):
    """A stock CFlow decoder block and the patched one with its weights."""
    from anomalib.models.components.flow import AllInOneBlock as StockBlock
    from anomalib.models.image.cflow.utils import subnet_fc

    from msflow_fast.integrations.anomalib import AnomalibAllInOneBlock

    kwargs = dict(subnet_constructor=subnet_fc, affine_clamping=1.9, global_affine_type="SOFTPLUS")
    torch.manual_seed(0)
    stock = StockBlock([(channels,)], dims_c=[(128,)], **kwargs)
    fused = AnomalibAllInOneBlock([(channels,)], dims_c=[(128,)], **kwargs)
    fused.load_state_dict(stock.state_dict(), strict=True)
    return stock.to(device).train(), fused.to(device).train()


def _fiber_jobs(device: torch.device, min_run_time: float, smoke: bool, first: int) -> list[Job]:
    from msflow_fast.ops import use_backend

    out: list[Job] = []
    for b, (n, channels) in enumerate(_fiber_settings(device, smoke)):
        shape = f"N{n} C{channels} cond 128"
        state: dict = {}

        def setup(n=n, channels=channels, state=state):
            if not state:
                stock, fused = _fiber_blocks(channels, device)
                x = torch.randn(n, channels, device=device, requires_grad=True)
                cond = torch.randn(n, 128, device=device)
                state.update(stock=stock, fused=fused, x=x, cond=cond, grad=torch.randn(n, channels, device=device))
            return state

        def run(provider: str, shape: str = shape, setup=setup) -> list[Result]:
            state = setup()
            block = state["stock"] if provider == "anomalib" else state["fused"]
            x, cond, grad = state["x"], state["cond"], state["grad"]
            backend = use_backend("reference") if provider == "msflow_fast (reference)" else contextlib.nullcontext()

            def forward():
                with torch.no_grad():
                    return block([x], c=[cond])

            def forward_backward():
                (z,), logdet = block([x], c=[cond])
                torch.autograd.backward((z, logdet), (grad, torch.ones_like(logdet)))
                x.grad = None
                for p in block.parameters():
                    p.grad = None

            with backend:
                return [
                    _row("block forward", provider, shape, device, time_ms(forward, device, min_run_time=min_run_time), n, "CFlow fiber block", unit="fibers/s"),
                    _row("block fwd+bwd", provider, shape, device, time_ms(forward_backward, device, min_run_time=min_run_time), n, "CFlow fiber block", unit="fibers/s"),
                ]

        for j, provider in enumerate(("anomalib", "msflow_fast", "msflow_fast (reference)")):
            out.append(Job(f"[anomalib_patch] fiber block {shape} {provider}", (first + b, j), lambda p=provider, run=run: run(p)))
    return out


def _models(cfg: dict, device: torch.device):
    from msflow_fast.integrations.anomalib import patched

    torch.manual_seed(0)
    stock = _build(cfg)
    with patched():
        fused = _build(cfg)
    fused.load_state_dict(stock.state_dict(), strict=True)
    return stock.to(device), fused.to(device)


def _loss(name: str, model, images: torch.Tensor, optimizer) -> None:
    """One training step as anomalib's Lightning module computes it."""
    from anomalib.models.image.cflow.utils import get_logp, positional_encoding_2d
    from anomalib.models.image.fastflow.loss import FastflowLoss
    from anomalib.models.image.uflow.loss import UFlowLoss

    model.train()
    if name == "fastflow":
        optimizer.zero_grad(set_to_none=True)
        FastflowLoss()(*model(images)).backward()
        optimizer.step()
    elif name == "uflow":
        optimizer.zero_grad(set_to_none=True)
        UFlowLoss()(*model(images)).backward()
        optimizer.step()
    else:
        with torch.no_grad():
            activation = model.encoder(images)
        for layer_idx, layer in enumerate(model.pool_layers):
            feats = activation[layer].detach()
            batch, channels, height, width = feats.shape
            cond = positional_encoding_2d(model.condition_vector, height, width).to(images.device)
            c_r = cond.unsqueeze(0).expand(batch, -1, -1, -1).permute(0, 2, 3, 1).reshape(-1, model.condition_vector)
            e_r = feats.permute(0, 2, 3, 1).reshape(-1, channels)
            n = model.fiber_batch_size
            decoder = model.decoders[layer_idx]
            for start in range(0, e_r.shape[0] - n + 1, n):
                optimizer.zero_grad(set_to_none=True)
                p_u, log_jac_det = decoder(e_r[start : start + n], [c_r[start : start + n]])
                loss = -F.logsigmoid(get_logp(channels, p_u, log_jac_det) / channels)
                loss.mean().backward()
                optimizer.step()


def _row(mode: str, provider: str, shape: str, device: torch.device, timing, items: int, op: str, unit: str = "img/s") -> Result:
    return throughput_row("anomalib_patch", op, mode, provider, shape, device, timing, items, unit)


def jobs(device: torch.device, *, min_run_time: float = 0.5, smoke: bool = False) -> list[Job]:
    """One job per (model, provider): the training step and inference; then the fiber blocks."""
    out: list[Job] = []
    settings = _settings(device, smoke)
    for b, cfg in enumerate(settings):
        shape = f"B{cfg['batch']} {cfg['size']}px resnet18 {cfg['steps']} steps"
        state: dict = {}

        def setup(cfg=cfg, state=state):
            if not state:
                stock, fused = _models(cfg, device)
                state.update(stock=stock, fused=fused, images=torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device))
            return state

        for j, provider in enumerate(("anomalib", "msflow_fast")):
            out.append(Job(f"[anomalib_patch] {cfg['model']} {shape} {provider}", (b, j),
                           lambda p=provider, s=shape, cfg=cfg, setup=setup: _run(p, s, cfg, setup(), device, min_run_time)))
    return out + _fiber_jobs(device, min_run_time, smoke, first=len(settings))


def _run(provider: str, shape: str, cfg: dict, state: dict, device: torch.device, min_run_time: float) -> list[Result]:
    model = state["fused"] if provider == "msflow_fast" else state["stock"]
    images = state["images"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    name = cfg["model"]

    def infer():
        model.eval()
        with torch.no_grad():
            return model(images)

    op = {"fastflow": "FastFlow", "cflow": "CFlow", "uflow": "U-Flow"}[name]
    batch = images.shape[0]
    return [
        _row("train step", provider, shape, device, time_ms(lambda: _loss(name, model, images, optimizer), device, min_run_time=min_run_time), batch, op),
        _row("inference", provider, shape, device, time_ms(infer, device, min_run_time=min_run_time), batch, op),
    ]


__all__ = ["jobs"]
