"""Benchmark harness: timing, device roofline, the fixed CSV schema and Markdown tables.

Times are medians (and 20th/80th percentiles) of CUDA-event timings on a GPU (Triton's
``do_bench``) or ``torch.utils.benchmark`` blocked runs on CPU. Speed-ups are ratios against the
``reference`` and ``compile`` providers measured in the same run.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import torch

CSV_FIELDS = (
    "suite",
    "op",
    "provider",
    "mode",
    "shape",
    "dtype",
    "device",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "gb_per_s",
    "roofline_fraction",
    "speedup_vs_reference",
    "speedup_vs_compile",
    "extra",
    "torch",
    "triton",
    "msflow_fast",
    "date",
)


@dataclass
class Result:
    """One row of the results CSV (see ``CSV_FIELDS``)."""

    suite: str
    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    device: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gb_per_s: float | None = None
    roofline_fraction: float | None = None
    speedup_vs_reference: float | None = None
    speedup_vs_compile: float | None = None
    extra: str = ""
    torch: str = torch.__version__
    triton: str = ""
    msflow_fast: str = ""
    date: str = ""


def versions() -> dict[str, str]:
    """Versions and the device name written beside every table."""
    import msflow_fast

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "msflow_fast": msflow_fast.__version__,
        "date": _dt.date.today().isoformat(),
        "device_name": device,
        "cpu_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, min_run_time: float = 0.5) -> tuple[float, float, float]:
    """``(median, p20, p80)`` in milliseconds of ``fn()`` on ``device``."""
    if device.type == "cuda":
        import triton.testing

        p20, median, p80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=100)
        return float(median), float(p20), float(p80)
    import torch.utils.benchmark as tbench

    fn()  # warm-up (and compilation for torch.compile)
    measurement = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    times = sorted(t * 1e3 for t in measurement.times)
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def copy_bandwidth_gb_per_s(device: torch.device, megabytes: int = 256) -> float:
    """Measured device copy bandwidth (read + write bytes per second), the roofline of memory-bound ops."""
    n = megabytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    median, _, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (median * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 4096) -> float:
    """Measured dense matmul rate in TFLOP/s (``n x n`` by ``n x n``)."""
    if device.type == "cpu":
        n = min(n, 1024)
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    median, _, _ = time_ms(lambda: a @ b, device)
    return 2 * n**3 / (median * 1e-3) / 1e12


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def add_speedups(results: list[Result]) -> None:
    """Fill ``speedup_vs_reference`` and ``speedup_vs_compile`` from rows of the same case.

    The eager baseline is the ``reference`` provider, or ``freia`` where a suite has no reference.
    """
    key = lambda r: (r.suite, r.op, r.mode, r.shape, r.dtype, r.device)  # noqa: E731
    base: dict[tuple, dict[str, float]] = {}
    for r in results:
        base.setdefault(key(r), {})[r.provider] = r.median_ms
    for r in results:
        lines = base[key(r)]
        baseline = lines.get("reference", lines.get("freia"))  # the block suite's eager line is FrEIA 0.2
        if baseline is not None:
            r.speedup_vs_reference = baseline / r.median_ms
        if "compile" in lines:
            r.speedup_vs_compile = lines["compile"] / r.median_ms


def write_csv(results: list[Result], path: str) -> None:
    """Write rows atomically (temporary file + rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerow({k: _fmt(v) for k, v in asdict(r).items()})
    os.replace(tmp, path)


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else value


def markdown_table(results: list[Result], header: dict[str, str]) -> str:
    """A Markdown table of the rows, preceded by device, versions and date."""
    lines = [f"- {k}: {v}" for k, v in header.items()]
    lines += [
        "",
        "| suite | op | mode | shape | dtype | provider | median ms | p20-p80 ms | GB/s | roofline | vs reference | vs compile | notes |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        cells = [
            r.suite,
            r.op,
            r.mode,
            r.shape,
            r.dtype,
            r.provider,
            f"{r.median_ms:.3f}",
            f"{r.p20_ms:.3f}-{r.p80_ms:.3f}",
            "" if r.gb_per_s is None else f"{r.gb_per_s:.1f}",
            "" if r.roofline_fraction is None else f"{100 * r.roofline_fraction:.0f}%",
            "" if r.speedup_vs_reference is None else f"{r.speedup_vs_reference:.2f}x",
            "" if r.speedup_vs_compile is None else f"{r.speedup_vs_compile:.2f}x",
            r.extra,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(text: str, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


assert tuple(f.name for f in fields(Result)) == CSV_FIELDS
