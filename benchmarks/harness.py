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
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

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


def throughput_row(suite: str, op: str, mode: str, provider: str, shape: str, device: torch.device,
                   timing: tuple[float, float, float], items: int, unit: str = "img/s", note: str = "",
                   dtype: str = "float32") -> Result:
    """A row of a model-level suite from ``timing = (median, p20, p80)`` ms (:func:`time_ms`), with
    ``items / median`` per second (in ``unit``) and ``note`` in the notes column."""
    median, p20, p80 = timing
    return Result(
        suite=suite, op=op, provider=provider, mode=mode, shape=shape, dtype=dtype, device=device.type,
        median_ms=median, p20_ms=p20, p80_ms=p80, extra=f"{items / (median * 1e-3):.1f} {unit}" + note,
    )


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
    """``(median, p20, p80)`` in milliseconds of ``fn()`` on ``device``.

    CUDA: Triton's ``do_bench`` (CUDA events, L2 flushed before each run) over ``rep`` = 100 ms of
    runs, or about 5 runs of a step slower than 20 ms (``do_bench`` runs ``max(1, rep // estimate)``,
    so 100 ms would give one run, and equal quantiles, for an end-to-end step).
    """
    if device.type == "cuda":
        import triton.testing

        fn()  # warm-up (and compilation for torch.compile)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        once_ms = (time.perf_counter() - start) * 1e3
        rep = max(100.0, min(5.0 * once_ms, 2000.0))
        p20, median, p80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=rep)
        return float(median), float(p20), float(p80)
    import torch.utils.benchmark as tbench

    # Warm-up (and compilation for torch.compile) for as long as the measurement: one call is not
    # enough on CPU, where the C allocator takes a few seconds of a new allocation pattern to stop
    # handing back freshly mapped (page-faulting) memory; an end-to-end step measured right after
    # another workload read up to 1.5x slow without this.
    start = time.perf_counter()
    calls = 0
    while calls < 3 or time.perf_counter() - start < min_run_time:
        fn()
        calls += 1
    measurement = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    times = sorted(t * 1e3 for t in measurement.times)
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def copy_bandwidth_gb_per_s(device: torch.device, megabytes: int = 256, *, min_run_time: float = 0.5) -> float:
    """Measured device copy bandwidth (read + write bytes per second), the roofline of memory-bound ops."""
    n = megabytes * 2**20 // 4
    src = torch.ones(n, device=device)  # the values do not matter; randn of 256 MiB costs ~1 s on a small CPU
    dst = torch.empty_like(src)
    median, _, _ = time_ms(lambda: dst.copy_(src), device, min_run_time=min_run_time)
    return 2 * src.numel() * src.element_size() / (median * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 4096, *, min_run_time: float = 0.5) -> float:
    """Measured dense matmul rate in TFLOP/s (``n x n`` by ``n x n``; float32 and ``n <= 1024`` on CPU)."""
    if device.type == "cpu":
        n = min(n, 1024)
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    median, _, _ = time_ms(lambda: a @ b, device, min_run_time=min_run_time)
    return 2 * n**3 / (median * 1e-3) / 1e12


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def add_speedups(results: list[Result]) -> None:
    """Fill ``speedup_vs_reference`` and ``speedup_vs_compile`` from rows of the same case.

    The eager baseline is the ``reference`` provider, or ``freia`` / ``anomalib`` (the authors'
    eager code) where a suite has no reference.
    A row whose dtype has no baseline of its own (the end-to-end ``msflow_fast-bf16`` line, measured
    beside float32 baselines) is compared with the float32 baselines of the same case.
    """
    key = lambda r: (r.suite, r.op, r.mode, r.shape, r.dtype, r.device)  # noqa: E731
    base: dict[tuple, dict[str, float]] = {}
    for r in results:
        base.setdefault(key(r), {})[r.provider] = r.median_ms

    def lookup(lines: dict[str, float], provider: str) -> float | None:
        if provider == "reference":
            # the block suite's eager line is FrEIA 0.2; the fastflow suite's is anomalib's model
            return lines.get("reference", lines.get("freia", lines.get("anomalib")))
        return lines.get(provider)

    for r in results:
        lines = base[key(r)]
        fp32 = base.get((r.suite, r.op, r.mode, r.shape, "float32", r.device), {})
        for provider, attr in (("reference", "speedup_vs_reference"), ("compile", "speedup_vs_compile")):
            baseline = lookup(lines, provider)
            if baseline is None:
                baseline = lookup(fp32, provider)
            setattr(r, attr, None if baseline is None else baseline / r.median_ms)


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
    """Write ``text`` atomically (temporary file + rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class Job:
    """One unit of a suite: ``run()`` measures and returns rows.

    ``order`` sorts the rows of all jobs into the table's order, whatever order the jobs ran in;
    ``deferred`` jobs (the ``torch.compile`` provider, whose compilations can take minutes) run
    after every other job, so a time budget that runs out costs the compile rows first.
    """

    label: str
    order: tuple
    run: Callable[[], list[Result]]
    deferred: bool = False


@dataclass
class JobReport:
    """What :func:`run_jobs` did: rows in table order, failed jobs (label, error), skipped labels."""

    results: list[Result] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    interrupted: bool = False


def run_jobs(
    jobs: Sequence[Job],
    *,
    deadline: float | None = None,
    on_progress: Callable[[JobReport], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> JobReport:
    """Run ``jobs`` (deferred ones last), keep going past a failing job, stop starting jobs after ``deadline``.

    ``deadline`` is a ``time.monotonic()`` value. ``on_progress(report)`` is called after every job
    (to write partial tables). An exception in a job is recorded in ``report.errors`` with its
    traceback printed through ``log``; ``KeyboardInterrupt`` (also what ``timeout -s INT`` sends)
    stops the run and sets ``report.interrupted``.
    """
    report = JobReport()
    ordered = [j for j in jobs if not j.deferred] + [j for j in jobs if j.deferred]
    keyed: list[tuple[tuple, int, Result]] = []
    for i, job in enumerate(ordered):
        if deadline is not None and time.monotonic() > deadline:
            report.skipped += [j.label for j in ordered[i:]]
            break
        if log is not None:
            log(f"{job.label}")
        try:
            rows = job.run()
        except KeyboardInterrupt:
            report.interrupted = True
            report.skipped += [j.label for j in ordered[i:]]
            break
        except Exception as exc:  # keep going: one failing case must not cost the rest of the table
            report.errors.append((job.label, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
            if log is not None:
                log(traceback.format_exc())
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            rows = []
        keyed += [(job.order, k, r) for k, r in enumerate(rows)]
        keyed.sort(key=lambda item: item[:2])
        report.results = [r for _, _, r in keyed]
        if on_progress is not None:
            try:
                on_progress(report)
            except KeyboardInterrupt:
                report.interrupted = True
                report.skipped += [j.label for j in ordered[i + 1 :]]
                break
    return report


assert tuple(f.name for f in fields(Result)) == CSV_FIELDS
