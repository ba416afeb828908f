"""A full flow block (subnet convs included), fused vs FrEIA 0.2's AllInOneBlock, fwd+bwd.

Both blocks hold the same weights (ours loads FrEIA's ``state_dict``); MSFlow's block arguments
(clamp 1.9, SOFTPLUS, conv-LayerNorm-ReLU-conv subnet, 64-channel positional condition).
Providers: ``freia`` (FrEIA 0.2, the baseline of the speed-ups here), ``msflow_fast`` (auto
backend) and ``msflow_fast-reference`` (our block forced onto the reference ops).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from msflow_fast import ops
from msflow_fast.nn import AllInOneBlock, enable_fast_paths
from msflow_fast.nn.subnets import subnet_conv_ln

from .harness import Job, Result, time_ms
from .kernels import MSFLOW_SCALES

CONDITION_CHANNELS = 64


def _blocks(channels: int, device: torch.device, dtype: torch.dtype):
    import FrEIA.modules as Fm

    freia = Fm.AllInOneBlock(
        [(channels, 1, 1)],
        dims_c=[(CONDITION_CHANNELS, 1, 1)],
        subnet_constructor=subnet_conv_ln,
        affine_clamping=1.9,
        global_affine_type="SOFTPLUS",
    )
    ours = AllInOneBlock(
        [(channels, 1, 1)],
        dims_c=[(CONDITION_CHANNELS, 1, 1)],
        subnet_constructor=subnet_conv_ln,
        affine_clamping=1.9,
        global_affine_type="SOFTPLUS",
    )
    ours.load_state_dict(freia.state_dict())
    enable_fast_paths(ours)  # FrEIA's block keeps a plain subnet
    return freia.to(device, dtype), ours.to(device, dtype)


def run(
    device: torch.device,
    *,
    batch: int = 8,
    dtype: torch.dtype = torch.float32,
    min_run_time: float = 0.5,
    scales: Sequence[tuple[int, int]] = MSFLOW_SCALES,
) -> list[Result]:
    """Time the three providers at each ``(channels, grid)`` of ``scales`` (needs FrEIA 0.2)."""
    results = []
    for channels, grid in scales:
        freia, ours = _blocks(channels, device, dtype)
        x = torch.randn(batch, channels, grid, grid, device=device, dtype=dtype, requires_grad=True)
        cond = torch.randn(batch, CONDITION_CHANNELS, grid, grid, device=device, dtype=dtype)
        cot = torch.randn_like(x.detach())

        def step(block, backend=None):
            def fn():
                x.grad = None
                block.zero_grad(set_to_none=True)
                if backend is None:
                    (y,), logdet = block([x], c=[cond])
                else:
                    with ops.use_backend(backend):
                        (y,), logdet = block([x], c=[cond])
                torch.autograd.backward((y, logdet), (cot, torch.ones_like(logdet)))

            return fn

        for provider, fn in (
            ("freia", step(freia)),
            ("msflow_fast-reference", step(ours, "reference")),
            ("msflow_fast", step(ours)),
        ):
            median, p20, p80 = time_ms(fn, device, min_run_time=min_run_time)
            results.append(
                Result(
                    suite="block",
                    op="AllInOneBlock+subnet",
                    provider=provider,
                    mode="fwd+bwd",
                    shape=f"B{batch} C{channels} {grid}x{grid}",
                    dtype=str(dtype).replace("torch.", ""),
                    device=device.type,
                    median_ms=median,
                    p20_ms=p20,
                    p80_ms=p80,
                )
            )
    return results


def jobs(
    device: torch.device,
    *,
    batch: int = 8,
    dtype: torch.dtype = torch.float32,
    min_run_time: float = 0.5,
    scales: Sequence[tuple[int, int]] = MSFLOW_SCALES,
) -> list[Job]:
    """One job per scale (each times all three providers)."""
    return [
        Job(
            f"[block] AllInOneBlock vs FrEIA 0.2, C{channels} {grid}x{grid}",
            (i,),
            lambda scale=(channels, grid): run(device, batch=batch, dtype=dtype, min_run_time=min_run_time, scales=(scale,)),
        )
        for i, (channels, grid) in enumerate(scales)
    ]
