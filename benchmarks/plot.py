"""Bar chart (PNG) of speed-ups over the eager line from a results CSV.

    python -m benchmarks.plot benchmarks/results/kernels-cpu-2026-11-23.csv [-o out.png]

Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__)
    p.add_argument("csv")
    p.add_argument("-o", "--output", default=None, help="PNG path (default: the CSV path with .png)")
    p.add_argument("--mode", default=None, help="only this mode (fwd, fwd+bwd, inverse)")
    args = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"benchmarks.plot needs matplotlib: pip install matplotlib ({exc})") from exc

    with open(args.csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["speedup_vs_reference"] and (args.mode is None or r["mode"] == args.mode)]
    if not rows:
        raise SystemExit(f"{args.csv}: no rows with a speed-up to plot")
    cases = sorted({(r["op"], r["mode"], r["shape"]) for r in rows})
    providers = sorted({r["provider"] for r in rows} - {"reference", "freia"})
    speedup = defaultdict(dict)
    for r in rows:
        speedup[(r["op"], r["mode"], r["shape"])][r["provider"]] = float(r["speedup_vs_reference"])
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cases)), 4.5))
    for i, provider in enumerate(providers):
        xs = [j + i * width for j in range(len(cases))]
        ax.bar(xs, [speedup[c].get(provider, 0.0) for c in cases], width, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{op}\n{mode} {shape}" for op, mode, shape in cases], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over eager (x)")
    ax.set_title(f"{rows[0]['device']} {rows[0]['dtype']}, {rows[0]['date']}")
    ax.legend()
    fig.tight_layout()
    out = args.output or args.csv.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
