"""Kernel microbenchmarks at MSFlow's (and FastFlow's) real shapes: one registry, every provider, every mode.

Providers: ``reference`` (eager ``ops.reference``), ``compile`` (``torch.compile`` of the
reference), ``triton`` and ``cpp`` (through the public ops with ``backend=``). Modes: ``fwd``,
``fwd+bwd`` (forward then backward of a random cotangent), ``inverse``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from msflow_fast import ops
from msflow_fast.ops import reference

from .harness import Job, Result, tensor_bytes, time_ms

# (channels, grid) per scale for a 512-px input (MSFLOW_SPEC.md §1.3)
MSFLOW_SCALES = ((256, 64), (512, 32), (1024, 16))
# ``--smoke``: the same ops at toy shapes (seconds on a 2-core CPU; checks the code paths, not speed)
SMOKE_SCALES = ((16, 8),)
# FastFlow's inputs for a 256-px image: (channels, grid) of the three backbone stages it normalises
# (per-sample LayerNorm over [C, H, W]) and flows; its anomaly map upsamples the three grids to 256x256.
FASTFLOW_FEATURES = {"resnet18": ((64, 64), (128, 32), (256, 16)), "wide_resnet50_2": ((256, 64), (512, 32), (1024, 16))}
FASTFLOW_MAP = ((64, 32, 16), 256)
SMOKE_FASTFLOW_FEATURES = {"toy": ((16, 8),)}
SMOKE_FASTFLOW_MAP = ((16, 8, 4), 64)


@dataclass
class Case:
    """One op at one shape: ``make()`` returns (inputs that need grad, other args as kwargs)."""

    op: str
    shape: str
    make: Callable[[torch.device, torch.dtype], tuple[list[torch.Tensor], dict]]
    run: Callable[..., tuple]  # run(fn_kind, *tensors, **kwargs) -> outputs
    modes: tuple[str, ...] = ("fwd", "fwd+bwd", "inverse")
    memory_bound: bool = True  # GB/s (and the roofline fraction) are reported for memory-bound ops only


def _coupling_case(batch: int, channels: int, grid: int) -> Case:
    active = channels // 2

    def make(device, dtype):
        x = torch.randn(batch, active, grid, grid, device=device, dtype=dtype)
        a = 3 * torch.randn(batch, 2 * active, grid, grid, device=device, dtype=dtype)
        return [x, a], {"clamp": 1.9, "clamp_form": "tanh"}

    return Case("affine_coupling", f"B{batch} C{active} {grid}x{grid}", make, _call("affine_coupling"))


def _block_tail_case(batch: int, channels: int, grid: int) -> Case:
    def make(device, dtype):
        x = torch.randn(batch, channels, grid, grid, device=device, dtype=dtype)
        a = 3 * torch.randn(batch, 2 * (channels // 2), grid, grid, device=device, dtype=dtype)
        gamma = torch.full((channels,), 9.9865, device=device, dtype=dtype) + 0.1 * torch.randn(channels, device=device, dtype=dtype)
        offset = 0.1 * torch.randn(channels, device=device, dtype=dtype)
        perm = torch.randperm(channels, device=device)
        return [x, a, gamma, offset], {"perm": perm, "clamp": 1.9}

    return Case(
        "coupling_affine_permute",
        f"B{batch} C{channels} {grid}x{grid}",
        make,
        _call("coupling_affine_permute", perm_positional=True),
        modes=("fwd", "fwd+bwd"),
    )


def _global_affine_case(batch: int, channels: int, grid: int) -> Case:
    def make(device, dtype):
        x = torch.randn(batch, channels, grid, grid, device=device, dtype=dtype)
        gamma = torch.full((channels,), 9.9865, device=device, dtype=dtype)
        offset = 0.1 * torch.randn(channels, device=device, dtype=dtype)
        return [x, gamma, offset], {"perm": torch.randperm(channels, device=device)}

    return Case(
        "global_affine_permute", f"B{batch} C{channels} {grid}x{grid}", make, _call("global_affine_permute", perm_positional=True)
    )


def _nll_case(batch: int, channels: int, grid: int) -> Case:
    def make(device, dtype):
        z = torch.randn(batch, channels, grid, grid, device=device, dtype=dtype)
        return [z, torch.randn(batch, device=device, dtype=dtype)], {}

    return Case("gaussian_nll", f"B{batch} C{channels} {grid}x{grid}", make, _call("gaussian_nll"), modes=("fwd", "fwd+bwd"))


def _subnet_norm_case(batch: int, channels: int, grid: int, cond_channels: int = 64) -> Case:
    # The coupling subnet's LayerNorm + ReLU on conv1's output (width C/2 + c_cond), with the
    # positional condition's conv share as a batch-constant addend.
    hidden = channels // 2 + cond_channels

    def make(device, dtype):
        x = torch.randn(batch, hidden, grid, grid, device=device, dtype=dtype)
        weight = 1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)
        bias = 0.1 * torch.randn(hidden, device=device, dtype=dtype)
        addend = torch.randn(1, hidden, grid, grid, device=device, dtype=dtype)
        return [x, weight, bias, addend], {}

    return Case(
        "channel_layer_norm_relu",
        f"B{batch} C{hidden} {grid}x{grid}",
        make,
        _call("channel_layer_norm_relu"),
        modes=("fwd", "fwd+bwd"),
    )


def _subnet_conv_case(batch: int, channels: int, grid: int, cond_channels: int = 64) -> Case:
    # The coupling subnet's second 3x3 conv (hidden width C/2 + c_cond -> C), at inference: the
    # ``cpp`` line is Winograd F(4x4, 3x3) on CPU (F.conv2d on CUDA); its weight transform is made
    # once, outside the timing, as the modules cache it.
    hidden = channels // 2 + cond_channels

    def make(device, dtype):
        x = torch.randn(batch, hidden, grid, grid, device=device, dtype=dtype)
        weight = torch.randn(channels, hidden, 3, 3, device=device, dtype=dtype) / (9 * hidden) ** 0.5
        bias = 0.1 * torch.randn(channels, device=device, dtype=dtype)
        return [x, weight, bias], {"weight_winograd": ops.conv3x3_winograd_weight(weight)}

    def run(kind, backend, x, weight, bias, weight_winograd):
        if kind in ("reference", "compile"):
            return _impl("conv3x3", kind, backend)(x, weight, bias)
        return ops.conv3x3(x, weight, bias, weight_winograd=weight_winograd, backend=backend)

    return Case("conv3x3", f"B{batch} C{hidden}->{channels} {grid}x{grid}", make, run, modes=("fwd",), memory_bound=False)


def _aggregate_case(batch: int, size: int) -> Case:
    def make(device, dtype):
        maps = [-5 * torch.rand(batch, g // (512 // size), g // (512 // size), device=device, dtype=dtype) for _, g in MSFLOW_SCALES]
        return [], {"maps": maps}

    def run(kind, backend, maps):
        fn = _impl("aggregate_anomaly_maps", kind, backend)
        return fn(maps, (size, size), top_k=0.03)

    return Case("aggregate_anomaly_maps", f"B{batch} {size}x{size}", make, run, modes=("fwd",))


def _sample_norm_case(batch: int, channels: int, grid: int, backbone: str) -> Case:
    # FastFlow's nn.LayerNorm([C, H, W]) on a backbone stage, element-wise affine, before its flows.
    def make(device, dtype):
        x = 2 * torch.randn(batch, channels, grid, grid, device=device, dtype=dtype) + 1
        weight = 1 + 0.1 * torch.randn(channels, grid, grid, device=device, dtype=dtype)
        bias = 0.1 * torch.randn(channels, grid, grid, device=device, dtype=dtype)
        return [x, weight, bias], {}

    return Case(
        "sample_layer_norm", f"B{batch} C{channels} {grid}x{grid} {backbone}", make, _call("sample_layer_norm"), modes=("fwd", "fwd+bwd")
    )


def _fastflow_map_case(batch: int, grids: Sequence[int], size: int, log_space_score: bool) -> Case:
    # FastFlow's post-processing of the per-stage log-likelihood maps (aggregate_anomaly_maps, mode="fastflow").
    def make(device, dtype):
        return [], {"maps": [-5 * torch.rand(batch, g, g, device=device, dtype=dtype) for g in grids]}

    def run(kind, backend, maps):
        if kind in ("reference", "compile"):
            return _impl("fastflow_anomaly_map", kind, backend)(maps, (size, size), log_space_score=log_space_score)
        return ops.aggregate_anomaly_maps(maps, (size, size), mode="fastflow", log_space_score=log_space_score, backend=backend)

    scales = "/".join(f"{g}^2" for g in grids)
    shape = f"B{batch} {scales} -> {size}x{size}" + (" +log-space score" if log_space_score else "")
    return Case("fastflow_anomaly_map", shape, make, run, modes=("fwd",))


def fastflow_cases(batch: int = 8, head_batch: int = 32, *, smoke: bool = False) -> list[Case]:
    """FastFlow's fused ops: the per-sample LayerNorm at every resnet18 / wide_resnet50_2 stage (batch
    ``batch``) and the anomaly map of its three stages (batch ``head_batch``), with and without the
    log-space score; toy shapes with ``smoke``."""
    features = SMOKE_FASTFLOW_FEATURES if smoke else FASTFLOW_FEATURES
    grids, size = SMOKE_FASTFLOW_MAP if smoke else FASTFLOW_MAP
    out = [_sample_norm_case(batch, c, g, name) for name, stages in features.items() for c, g in stages]
    out += [_fastflow_map_case(head_batch, grids, size, log_space) for log_space in (False, True)]
    return out


_compiled: dict[str, Callable] = {}


def _impl(op: str, kind: str, backend: str | None) -> Callable:
    if kind == "reference":
        return getattr(reference, op)
    if kind == "compile":
        if op not in _compiled:
            _compiled[op] = torch.compile(getattr(reference, op), dynamic=False)
        return _compiled[op]
    public = getattr(ops, op)
    return lambda *args, **kwargs: public(*args, backend=backend, **kwargs)


def _call(op: str, *, perm_positional: bool = False) -> Callable:
    def run(kind, backend, *tensors, perm=None, **kwargs):
        fn = _impl(op, kind, backend)
        if perm_positional:
            return fn(*tensors, perm, **kwargs)
        return fn(*tensors, **kwargs)

    return run


def cases(
    batch: int = 8,
    head_batch: int = 32,
    head_size: int = 512,
    scales: Sequence[tuple[int, int]] = MSFLOW_SCALES,
    *,
    fastflow: bool | None = None,
) -> list[Case]:
    """The flow-block ops at each ``(channels, grid)`` of ``scales``, then the anomaly-map head, then
    (``fastflow``; default: unless ``scales`` are the ``--smoke`` ones, whose op list is fixed)
    :func:`fastflow_cases`.

    The head's maps are MSFlow's 64/32/16 grids scaled by ``head_size / 512`` (``head_size <= 512``).
    """
    out: list[Case] = []
    for channels, grid in scales:
        out += [
            _coupling_case(batch, channels, grid),
            _global_affine_case(batch, channels, grid),
            _block_tail_case(batch, channels, grid),
            _subnet_norm_case(batch, channels, grid),
            _subnet_conv_case(batch, channels, grid),
            _nll_case(batch, channels, grid),
        ]
    out.append(_aggregate_case(head_batch, head_size))
    if fastflow if fastflow is not None else tuple(scales) != tuple(SMOKE_SCALES):
        out += fastflow_cases(batch, head_batch, smoke=tuple(scales) == tuple(SMOKE_SCALES))
    return out


def _providers(device: torch.device, op: str, with_compile: bool) -> list[str]:
    providers = ["reference"] + (["compile"] if with_compile else [])
    for backend in ("triton", "cpp"):
        if backend in ops.available_backends(device, op) and not (backend == "triton" and device.type == "cpu"):
            providers.append(backend)
    return providers


def _as_tuple(outs: object) -> tuple:
    return outs if isinstance(outs, tuple) else (outs,)


def _timed_fn(case: Case, provider: str, mode: str, tensors: list[torch.Tensor], kwargs: dict) -> Callable[[], object]:
    backend = provider if provider in ("triton", "cpp") else None
    if mode == "fwd+bwd":
        leaves = [t.detach().requires_grad_(True) for t in tensors]
        cotangents = [torch.randn_like(o) for o in _as_tuple(case.run(provider, backend, *leaves, **kwargs))]

        def forward_backward():
            for leaf in leaves:
                leaf.grad = None
            torch.autograd.backward(_as_tuple(case.run(provider, backend, *leaves, **kwargs)), cotangents)

        return forward_backward
    call_kwargs = {**kwargs, "reverse": True} if mode == "inverse" else kwargs

    def no_grad_call():
        with torch.no_grad():
            return case.run(provider, backend, *tensors, **call_kwargs)

    return no_grad_call


def run_case(
    case: Case,
    device: torch.device,
    dtype: torch.dtype,
    *,
    with_compile: bool = True,
    min_run_time: float = 0.5,
    providers: Collection[str] | None = None,
) -> list[Result]:
    """Time every provider (or only those in ``providers``) and mode of ``case``.

    GB/s counts the minimal memory traffic: inputs read and outputs written once (``fwd``,
    ``inverse``); for ``fwd+bwd`` twice that plus the gradients written.
    """
    tensors, kwargs = case.make(device, dtype)
    inputs = tensors + list(kwargs.get("maps", []))
    results = []
    for provider in _providers(device, case.op, with_compile):
        if providers is not None and provider not in providers:
            continue
        if provider == "compile":
            # Fresh dynamo caches per case: each op's compiled function is shared by every shape and
            # mode (a recompile each), and past torch._dynamo's recompile limit (8) it would run the
            # eager reference while its rows said "compile" (the third scale's inverse, before this).
            torch._dynamo.reset()
        for mode in case.modes:
            fn = _timed_fn(case, provider, mode, tensors, kwargs)
            with torch.no_grad():
                outs = _as_tuple(case.run(provider, None if provider in ("reference", "compile") else provider, *tensors, **kwargs))
            moved = tensor_bytes(inputs) + tensor_bytes(outs)
            if mode == "fwd+bwd":
                moved = 2 * moved + tensor_bytes(tensors)
            median, p20, p80 = time_ms(fn, device, min_run_time=min_run_time)
            results.append(
                Result(
                    suite="kernels",
                    op=case.op,
                    provider=provider,
                    mode=mode,
                    shape=case.shape,
                    dtype=str(dtype).replace("torch.", ""),
                    device=device.type,
                    median_ms=median,
                    p20_ms=p20,
                    p80_ms=p80,
                    gb_per_s=moved / (median * 1e-3) / 1e9 if case.memory_bound else None,
                )
            )
    return results


def jobs(
    case_list: Sequence[Case], device: torch.device, dtype: torch.dtype, *, with_compile: bool = True, min_run_time: float = 0.5
) -> list[Job]:
    """One job per (case, provider); the ``compile`` jobs are deferred (see :class:`harness.Job`)."""
    out = []
    for i, case in enumerate(case_list):
        for j, provider in enumerate(_providers(device, case.op, with_compile)):

            def run(case=case, provider=provider) -> list[Result]:
                return run_case(case, device, dtype, with_compile=with_compile, min_run_time=min_run_time, providers=(provider,))

            out.append(Job(f"[kernels] {case.op} {case.shape} {provider}", (i, j), run, deferred=provider == "compile"))
    return out
