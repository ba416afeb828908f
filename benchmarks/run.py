"""Run the benchmark suites and write ``<out>/<name>.csv`` and ``<out>/<name>.md``.

Examples:
    python -m benchmarks.run --suite kernels --device cpu
    python -m benchmarks.run --suite all --device cuda --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import harness


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("kernels", "block", "e2e", "all"), default="kernels")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default="float32")
    p.add_argument("--batch", type=int, default=8, help="batch of the flow-block kernels (MSFlow trains with 8)")
    p.add_argument("--head-batch", type=int, default=32, help="batch of the anomaly-map head")
    p.add_argument("--head-size", type=int, default=512, help="anomaly-map size (input resolution)")
    p.add_argument("--ops", nargs="*", default=None, help="only these ops")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per CPU measurement")
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--name", default=None, help="file stem (default: <suite>-<device>-<date>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    info = harness.versions()
    bandwidth = harness.copy_bandwidth_gb_per_s(device)
    header = {
        "device": f"{device.type} ({info['device_name']}, {info['cpu_threads']} CPU threads)",
        "torch": info["torch"],
        "triton": info["triton"] or "not installed",
        "msflow_fast": info["msflow_fast"],
        "python": info["python"],
        "date": info["date"],
        "measured copy bandwidth": f"{bandwidth:.1f} GB/s (read + write)",
        "measured matmul": f"{harness.matmul_tflops(device):.2f} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})",
    }
    results: list[harness.Result] = []
    if args.suite in ("kernels", "all"):
        from . import kernels

        for case in kernels.cases(args.batch, args.head_batch, args.head_size):
            if args.ops and case.op not in args.ops:
                continue
            print(f"[kernels] {case.op} {case.shape}", file=sys.stderr, flush=True)
            results += kernels.run_case(case, device, dtype, with_compile=not args.no_compile, min_run_time=args.min_run_time)
    if args.suite in ("block", "all"):
        from . import blocks

        print("[block] AllInOneBlock vs FrEIA 0.2", file=sys.stderr, flush=True)
        results += blocks.run(device, batch=args.batch, min_run_time=args.min_run_time)
    if args.suite in ("e2e", "all"):
        from . import end_to_end

        results += end_to_end.run(device, with_compile=not args.no_compile, min_run_time=args.min_run_time)
    harness.add_speedups(results)
    for r in results:
        r.triton, r.msflow_fast, r.date = info["triton"], info["msflow_fast"], info["date"]
        if r.gb_per_s is not None:
            r.roofline_fraction = r.gb_per_s / bandwidth
    name = args.name or f"{args.suite}-{device.type}-{info['date']}"
    harness.write_csv(results, f"{args.out}/{name}.csv")
    table = harness.markdown_table(results, header)
    harness.write_markdown(f"# Benchmarks: {args.suite} on {device.type}\n\n{table}", f"{args.out}/{name}.md")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
