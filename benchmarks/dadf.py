"""DADF end to end: msflow_fast's :class:`~msflow_fast.models.dadf.DADF` against the eager composition
of the same maths on the same weights.

Providers:
    reference     :class:`EagerDADF`: the dual blocks as two ``torch.nn.MultiheadAttention`` calls each
                  (self: ``mha(x, x, x)``; memorial: ``mha(m, x, m)``, so the features' keys are
                  projected twice: six projections per block, as the code's, which projects the
                  memory's unused keys), FrEIA 0.2 ``SequenceINN`` flows of FrEIA's
                  ``AllInOneBlock`` (permutations as 1x1 convolutions), ``nn.LayerNorm``
                  over [3C, H, W] and the map in plain PyTorch; fp32: the baseline
    msflow_fast   :class:`msflow_fast.models.dadf.DADF`, fp32: one shared key projection, the memory's
                  keys skipped, ``scaled_dot_product_attention``, the fused flow blocks and head op
    msflow_fast-bf16  the same with ``transformer_precision="bfloat16"`` (the transformer under bf16
                  autocast, flows float32): stage-1 step and inference only (stage 2 does not run
                  the transformer); compared with the float32 reference

Modes: a stage-1 step (transformer forward on cached backbone maps, the six MSEs, backward, AdamW
step), a stage-2 step on cached stage-1 outputs (norms, flows, loss, backward, Adam step) and
inference with the backbone (``predict``; the same frozen extractor for all). The providers
are timed in alternation, call by call (see :func:`_interleaved`), so their ratio holds on a shared
machine whose load changes during the run (there, ``--threads 1`` is far steadier than two). CPU:
resnet18 at 128 px, tokens of 3 x 160 = 480, 8 dual blocks, 8 heads, 8 flow steps per scale, batch 4 (the code's
1440-d WRN50 transformer costs about 210 GFLOP per image forward, minutes per step on a small
CPU); CUDA: the code's defaults (WRN50, 256 px, 1440-d), batch 8. ``smoke``: 64 px, 16-d tokens
per scale, one block, two flow steps, batch 2. Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .harness import Job, Result, throughput_row


class _EagerBlock(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        dim, heads = block.attn.dim, block.attn.num_heads
        self.norm1, self.norm2, self.mlp = copy.deepcopy(block.norm1), copy.deepcopy(block.norm2), copy.deepcopy(block.mlp)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True).to(block.attn.qkv.weight.dtype)
        with torch.no_grad():
            self.attn.in_proj_weight.copy_(block.attn.qkv.weight)
            self.attn.in_proj_bias.copy_(block.attn.qkv.bias)
            self.attn.out_proj.weight.copy_(block.attn.proj.weight)
            self.attn.out_proj.bias.copy_(block.attn.proj.bias)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nx, nm = self.norm1(x), self.norm1(memory)
        a_x = self.attn(nx, nx, nx, need_weights=False)[0]
        a_m = self.attn(nm, nx, nm, need_weights=False)[0]
        x = x + a_x
        x = x + self.mlp(self.norm2(x))
        memory = memory + a_m
        return x, memory + self.mlp(self.norm2(memory))


class EagerDADF(nn.Module):
    """The eager composition of a :class:`~msflow_fast.models.dadf.DADF`'s maths on copies of its
    weights (see the module docstring), for tests and benchmarks. ``reconstruct(maps) -> (own,
    memory)``, ``flows_of(fused) -> (latents, logdets)``, ``loss_reconstruction``, ``loss_flow``
    and ``predict(images) -> (anomaly_map [B, H, W], score [B])``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        import FrEIA.framework as Ff
        from FrEIA.modules import AllInOneBlock as FrEIABlock

        t = model.transformer
        self.extractor = model.extractor  # frozen and shared: the same backbone for both providers
        self.embed = copy.deepcopy(t.embed)
        self.memory = nn.Parameter(t.memory.detach().clone())
        self.register_buffer("positions", t.positions.clone(), persistent=False)
        self.blocks = nn.ModuleList(_EagerBlock(b) for b in t.blocks)
        self.norm, self.heads = copy.deepcopy(t.norm), copy.deepcopy(t.heads)
        self.token_grid, self.patches, self.channels = t.token_grid, list(t.patches), list(t.channels)
        self.norms = nn.ModuleList()
        for norm in model.norms:
            ln = nn.LayerNorm(list(norm.shape), eps=norm.eps).to(norm.weight.dtype)
            ln.load_state_dict({"weight": norm.weight.detach(), "bias": norm.bias.detach()})
            self.norms.append(ln)
        self.flows = nn.ModuleList()
        for flow in model.flows:
            dtype = flow[0].global_scale.dtype
            seq = Ff.SequenceINN(*flow.shapes[0])
            for block in flow:
                seq.append(FrEIABlock, subnet_constructor=lambda c_in, c_out, sub=block.subnet: copy.deepcopy(sub),
                           affine_clamping=block.clamp, permute_soft=False)
                seq.module_list[-1].to(dtype).load_state_dict(block.state_dict(), strict=True)
            self.flows.append(seq)
        # Everything but the shared extractor and FrEIA's fixed permutations trains, whatever stage the
        # copied model was in (copies inherit requires_grad=False from a frozen transformer or flows).
        for name, param in self.named_parameters():
            if not name.startswith("extractor.") and not name.endswith(("w_perm", "w_perm_inv")):
                param.requires_grad_(True)

    def _unpatchify(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        b = tokens.shape[0]
        gh, gw = self.token_grid
        p, c = self.patches[k], self.channels[k]
        return torch.einsum("nhwpqc->nchpwq", tokens.reshape(b, gh, gw, p, p, c)).reshape(b, c, gh * p, gw * p)

    def reconstruct(self, maps: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x = torch.cat([e(f).flatten(2).transpose(1, 2) for e, f in zip(self.embed, maps)], -1) + self.positions
        memory = (self.memory + self.positions).expand(x.shape[0], -1, -1)
        for block in self.blocks:
            x, memory = block(x, memory)
        x, memory = self.norm(x), self.norm(memory)
        return ([self._unpatchify(h(x), k) for k, h in enumerate(self.heads)],
                [self._unpatchify(h(memory), k) for k, h in enumerate(self.heads)])

    def loss_reconstruction(self, maps: list[torch.Tensor]) -> torch.Tensor:
        own, memory = self.reconstruct(maps)
        return sum(F.mse_loss(m, e) + F.mse_loss(o, e) for e, o, m in zip(maps, own, memory))

    def fuse(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        own, memory = self.reconstruct(maps)
        return [torch.cat([e, o, m], 1) for e, o, m in zip(maps, own, memory)]

    def flows_of(self, fused: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        latents, logdets = [], []
        for norm, flow, x in zip(self.norms, self.flows, fused):
            z, logdet = flow(norm(x))
            latents.append(z)
            logdets.append(logdet)
        return latents, logdets

    def loss_flow(self, fused: list[torch.Tensor]) -> torch.Tensor:
        latents, logdets = self.flows_of(fused)
        return sum((0.5 * z.square().flatten(1).sum(1) - ld).mean() for z, ld in zip(latents, logdets))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents, _ = self.flows_of(self.fuse(self.extractor(images)))
        size = tuple(images.shape[-2:])
        ups = [F.interpolate(-torch.exp(1 - 0.5 * z.square().mean(1, keepdim=True)), size=size, mode="bilinear", align_corners=False)
               for z in latents]
        amap = torch.cat(ups, 1).mean(1)
        return amap, amap.flatten(1).amax(1)


def _settings(device: torch.device, smoke: bool) -> list[dict]:
    if smoke:
        return [{"size": 64, "batch": 2, "backbone": "resnet18", "embed": 16, "depth": 1, "heads": 2, "steps": 2}]
    if device.type == "cuda":
        return [{"size": 256, "batch": 8, "backbone": "wide_resnet50_2", "embed": 480, "depth": 8, "heads": 8, "steps": 8}]
    return [{"size": 128, "batch": 4, "backbone": "resnet18", "embed": 160, "depth": 8, "heads": 8, "steps": 8}]


def _row(mode: str, provider: str, shape: str, device: torch.device, timing, images: int, paired: float | None = None) -> Result:
    return throughput_row("dadf", "DADF", mode, provider, shape, device, timing, images,
                          note="" if paired is None else f"; paired {paired:.2f}x",
                          dtype="bfloat16" if provider.endswith("-bf16") else "float32")


def jobs(device: torch.device, *, min_run_time: float = 0.5, smoke: bool = False) -> list[Job]:
    """One job per setting: the two training steps and inference, both providers timed in alternation."""
    from msflow_fast.models.dadf import DADF

    out: list[Job] = []
    for b, cfg in enumerate(_settings(device, smoke)):
        shape = f"B{cfg['batch']} {cfg['size']}px {cfg['backbone']} D{3 * cfg['embed']} L{cfg['depth']} K{cfg['steps']}"
        state: dict = {}

        def setup(cfg=cfg, state=state):
            if not state:
                torch.manual_seed(0)
                model = DADF(input_size=cfg["size"], backbone=cfg["backbone"], pretrained=False, embed_dim=cfg["embed"],
                             depth=cfg["depth"], num_heads=cfg["heads"], flow_steps=cfg["steps"]).to(device).eval()
                images = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device)
                model.set_stage("reconstruction")
                prior = model.frozen_features(images)
                model.set_stage("flow")
                fused = model.frozen_features(images)
                bf16 = DADF(model.config.replace(transformer_precision="bfloat16")).to(device).eval()
                bf16.load_state_dict(model.state_dict())
                state.update(model=model, bf16=bf16, eager=EagerDADF(model).to(device), images=images, prior=prior, fused=fused)
            return state

        out.append(Job(f"[dadf] {shape} reference + msflow_fast (+ bf16)", (b, 0), lambda s=shape, setup=setup: _run(s, setup(), device, min_run_time)))
    return out


PROVIDERS = ("reference", "msflow_fast", "msflow_fast-bf16")


def _interleaved(fns: dict, device: torch.device, min_run_time: float) -> tuple[dict, dict]:
    """``(provider -> (median, p20, p80) ms, provider -> paired speed-up)``: the providers timed in
    alternation (one call each per round, after a warm-up call each), so a load that changes during
    the run (a shared machine) reaches both alike; the paired speed-up is the median over rounds of
    the first provider's time over this one's in the same round. Rounds: ``min_run_time`` over the
    time of one round, at least 3, at most 50."""
    import statistics
    import time

    def once(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - started) * 1e3

    warm = {name: once(fn) for name, fn in fns.items()}
    rounds = max(3, min(50, int(min_run_time * 1e3 / max(1e-3, sum(warm.values())))))
    samples: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(once(fn))
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=10, method="inclusive")
        out[name] = (statistics.median(values), q[1], q[7])
    first = next(iter(fns))
    paired = {name: statistics.median(a / b for a, b in zip(samples[first], values)) for name, values in samples.items()}
    return out, paired


def _run(shape: str, state: dict, device: torch.device, min_run_time: float) -> list[Result]:
    model, bf16, eager = state["model"], state["bf16"], state["eager"]
    images, prior, fused = state["images"], state["prior"], state["fused"]
    rec_params = {"msflow_fast": list(model.transformer.parameters()), "msflow_fast-bf16": list(bf16.transformer.parameters()),
                  "reference": [*eager.embed.parameters(), eager.memory, *eager.blocks.parameters(), *eager.norm.parameters(),
                                *eager.heads.parameters()]}
    flow_params = {"msflow_fast": [*model.norms.parameters(), *model.flows.parameters()],
                   "reference": [*eager.norms.parameters(), *[p for p in eager.flows.parameters() if p.requires_grad]]}
    adamw = {k: torch.optim.AdamW(v, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01) for k, v in rec_params.items()}
    adam = {k: torch.optim.Adam(v, lr=1e-3, weight_decay=1e-5) for k, v in flow_params.items()}

    def step(optimizer, loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    modes = {
        "stage-1 step": ("reconstruction", {
            "reference": lambda: step(adamw["reference"], eager.loss_reconstruction(prior)),
            "msflow_fast": lambda: step(adamw["msflow_fast"], model.loss({"features": prior})),
            "msflow_fast-bf16": lambda: step(adamw["msflow_fast-bf16"], bf16.loss({"features": prior})),
        }),
        "stage-2 step (cached)": ("flow", {
            "reference": lambda: step(adam["reference"], eager.loss_flow(fused)),
            "msflow_fast": lambda: step(adam["msflow_fast"], model.loss({"features": fused})),
        }),
        "inference": ("flow", {"reference": lambda: eager.predict(images), "msflow_fast": lambda: model.predict(images),
                               "msflow_fast-bf16": lambda: bf16.predict(images)}),
    }
    rows = {p: [] for p in PROVIDERS}
    batch = images.shape[0]
    for mode, (stage, fns) in modes.items():
        model.set_stage(stage)
        bf16.set_stage(stage)
        timings, paired = _interleaved(fns, device, min_run_time)
        for provider, timing in timings.items():
            rows[provider].append(_row(mode, provider, shape, device, timing, batch, paired[provider] if provider != "reference" else None))
    return [r for p in PROVIDERS for r in rows[p]]


__all__ = ["EagerDADF", "jobs"]
