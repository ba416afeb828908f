"""Run the benchmark suites and write ``<out>/<name>.csv`` and ``<out>/<name>.md``.

Examples:
    python -m benchmarks.run --suite kernels --device cpu
    python -m benchmarks.run --suite all --device cuda --out benchmarks/results
    python -m benchmarks.run --suite all --device cpu --smoke --out /tmp/bench   # code paths in seconds

The tables are rewritten after every measured case, so a run stopped by a time limit keeps what it
measured (its Markdown ``status`` line then says so). A case that raises is recorded under "Errors"
in the Markdown and the run goes on (exit status 1); ``--time-budget`` stops starting new cases once
spent (exit status 124). The ``torch.compile`` provider runs after every other provider.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import torch

from . import harness

# Shapes and times of --smoke: every code path of a suite, at toy sizes, in seconds on a 2-core CPU.
SMOKE = {"batch": 2, "head_batch": 2, "head_size": 64, "min_run_time": 0.005, "bandwidth_mb": 8, "matmul_n": 128}
DEFAULTS = {"batch": 8, "head_batch": 32, "head_size": 512, "min_run_time": 0.5, "bandwidth_mb": 256, "matmul_n": 4096}
EXIT_ERRORS, EXIT_BUDGET, EXIT_INTERRUPTED = 1, 124, 130


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("kernels", "block", "e2e", "fastflow", "epoch", "csflow", "msflow_aas", "anomalib_patch", "pseudo_anomaly", "dadf", "mlff", "all"), default="kernels")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default="float32")
    p.add_argument("--batch", type=int, default=None, help="batch of the flow-block kernels (MSFlow trains with 8; --smoke: 2)")
    p.add_argument("--head-batch", type=int, default=None, help="batch of the anomaly-map head (default 32; --smoke: 2)")
    p.add_argument("--head-size", type=int, default=None, help="anomaly-map size, at most 512 (default 512; --smoke: 64)")
    p.add_argument("--ops", nargs="*", default=None, help="only these ops")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per CPU measurement (default 0.5; --smoke: 0.005)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="toy shapes, tiny measurements, no torch.compile: checks every code path of the suites in seconds "
        "(kernels: 16 channels at 8x8, batch 2; block: the same scales; e2e: resnet18 at 64 px, batch 2, "
        "one flow block per scale). The numbers mean nothing.",
    )
    p.add_argument("--bf16", action="store_true", help="add the end-to-end bf16-autocast line on CPU too (always on CUDA)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds after which no new case starts (the tables say what was skipped)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (torch.set_num_threads; default: torch's). On a shared host, 1 thread is far less "
        "sensitive to other processes than a team of OpenMP threads waiting on each other",
    )
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--name", default=None, help="file stem (default: <suite>-<device>-<date>)")
    args = p.parse_args(argv)
    preset = SMOKE if args.smoke else DEFAULTS
    for key in ("batch", "head_batch", "head_size", "min_run_time"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.smoke:
        args.no_compile = True
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def _jobs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[harness.Job]:
    """The jobs of the selected suites; ``order`` is prefixed by the suite so ``all`` keeps suite order."""
    jobs: list[harness.Job] = []

    def add(suite_index: int, suite_jobs: list[harness.Job]) -> None:
        for job in suite_jobs:
            job.order = (suite_index, *job.order)
            jobs.append(job)

    if args.suite in ("kernels", "all"):
        from . import kernels

        scales = kernels.SMOKE_SCALES if args.smoke else kernels.MSFLOW_SCALES
        cases = [c for c in kernels.cases(args.batch, args.head_batch, args.head_size, scales) if not args.ops or c.op in args.ops]
        add(0, kernels.jobs(cases, device, dtype, with_compile=not args.no_compile, min_run_time=args.min_run_time))
    if args.suite in ("block", "all"):
        from . import blocks
        from .kernels import MSFLOW_SCALES, SMOKE_SCALES

        scales = SMOKE_SCALES if args.smoke else MSFLOW_SCALES
        add(1, blocks.jobs(device, batch=args.batch, min_run_time=args.min_run_time, scales=scales))
    if args.suite in ("e2e", "all"):
        from . import end_to_end

        bf16 = True if args.bf16 else None
        add(2, end_to_end.jobs(device, with_compile=not args.no_compile, min_run_time=args.min_run_time, smoke=args.smoke, bf16=bf16))
    if args.suite in ("fastflow", "all"):
        from . import fastflow

        add(3, fastflow.jobs(device, with_compile=not args.no_compile, min_run_time=args.min_run_time, smoke=args.smoke))
    if args.suite in ("epoch", "all"):
        from . import epochs

        add(4, epochs.jobs(device, min_run_time=args.min_run_time, smoke=args.smoke))
    if args.suite in ("csflow", "all"):
        from . import csflow

        add(5, csflow.jobs(device, with_compile=not args.no_compile, min_run_time=args.min_run_time, smoke=args.smoke))
    if args.suite in ("msflow_aas", "all"):
        from . import msflow_aas

        add(6, msflow_aas.jobs(device, with_compile=not args.no_compile, min_run_time=args.min_run_time, smoke=args.smoke))
    if args.suite in ("anomalib_patch", "all"):
        from . import anomalib_patch

        add(7, anomalib_patch.jobs(device, min_run_time=args.min_run_time, smoke=args.smoke))
    if args.suite in ("pseudo_anomaly", "all"):
        from . import pseudo_anomaly

        add(8, pseudo_anomaly.jobs(device, min_run_time=args.min_run_time, smoke=args.smoke))
    if args.suite in ("dadf", "all"):
        from . import dadf

        add(9, dadf.jobs(device, min_run_time=args.min_run_time, smoke=args.smoke))
    if args.suite in ("mlff", "all"):
        from . import mlff

        add(10, mlff.jobs(device, min_run_time=args.min_run_time, smoke=args.smoke))
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    started = time.monotonic()
    deadline = None if args.time_budget is None else started + args.time_budget
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    preset = SMOKE if args.smoke else DEFAULTS
    info = harness.versions()
    bandwidth = harness.copy_bandwidth_gb_per_s(device, preset["bandwidth_mb"], min_run_time=min(args.min_run_time, 0.5))
    matmul = harness.matmul_tflops(device, n=preset["matmul_n"], min_run_time=min(args.min_run_time, 0.5))
    header = {
        "device": f"{device.type} ({info['device_name']}, {info['cpu_threads']} CPU threads)",
        "torch": info["torch"],
        "triton": info["triton"] or "not installed",
        "msflow_fast": info["msflow_fast"],
        "python": info["python"],
        "date": info["date"],
        "measured copy bandwidth": f"{bandwidth:.1f} GB/s (read + write)",
        "measured matmul": f"{matmul:.2f} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})",
    }
    if args.smoke:
        header["settings"] = "--smoke (toy shapes: checks the code paths; the numbers mean nothing)"
    name = args.name or f"{args.suite}-{device.type}-{info['date']}"
    csv_path, md_path = f"{args.out}/{name}.csv", f"{args.out}/{name}.md"

    def write(report: harness.JobReport, status: str) -> None:
        results = report.results
        harness.add_speedups(results)
        for r in results:
            r.triton, r.msflow_fast, r.date = info["triton"], info["msflow_fast"], info["date"]
            if r.gb_per_s is not None:
                r.roofline_fraction = r.gb_per_s / bandwidth
        harness.write_csv(results, csv_path)
        table = harness.markdown_table(results, {**header, "status": status})
        notes = ""
        if report.errors:
            notes += "\n## Errors\n\n" + "".join(f"- {label}: `{err}`\n" for label, err in report.errors)
        if report.skipped:
            notes += "\n## Not measured\n\n" + "".join(f"- {label}\n" for label in report.skipped)
        harness.write_markdown(f"# Benchmarks: {args.suite} on {device.type}\n\n{table}{notes}", md_path)

    jobs = _jobs(args, device, dtype)
    total = len(jobs)
    done = [0]

    def progress(report: harness.JobReport) -> None:
        done[0] += 1
        write(report, f"in progress ({done[0]} of {total} cases measured; the run was stopped if this line remains)")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = harness.run_jobs(jobs, deadline=deadline, on_progress=progress, log=log)
    elapsed = time.monotonic() - started
    if report.interrupted:
        status, code = f"interrupted after {elapsed:.0f} s ({len(report.skipped)} of {total} cases not measured)", EXIT_INTERRUPTED
    elif report.skipped:
        status, code = f"time budget of {args.time_budget:.0f} s spent ({len(report.skipped)} of {total} cases not measured)", EXIT_BUDGET
    else:
        status, code = f"complete ({total} cases in {elapsed:.0f} s)", 0
    if report.errors:
        status += f"; {len(report.errors)} of {total} cases failed (see Errors)"
        code = code or EXIT_ERRORS
    write(report, status)
    print(harness.markdown_table(report.results, {**header, "status": status}))
    return code


def _interrupt_on_term(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    # `timeout` sends SIGINT (or SIGTERM); either ends the run with the tables written. SIGINT is
    # re-armed because a shell may start background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt_on_term)
    sys.exit(main())
