"""Write ``summary.md`` for ``benchmarks/gpu_suite.sh``: device, versions, date, test counts, stages.

    python -m benchmarks.gpu_suite_summary --out OUT --stages STAGES.tsv [--junit J.xml] [--tests-log T.log]
        [--tables kernels-cuda-2026-11-23 ...] [--mode cuda]

``STAGES.tsv`` has one line per stage: name, exit status (or ``skipped``), seconds, budget seconds.
Exit status 124 or 137 is a stage stopped by its time limit (``timeout``, or the benchmark runner's
own ``--time-budget``). Reads only files; imports torch and msflow_fast for the versions, and
writes what it can if either fails to import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import sys
import xml.etree.ElementTree as ET

TIMED_OUT = {"124", "137"}
MAX_FILES = 8  # what the device tool brings back from $OUT


def _versions() -> dict[str, str]:
    info = {"python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda (torch build)"] = str(torch.version.cuda)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["device"] = f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
        else:
            info["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    except Exception as exc:  # noqa: BLE001 - the summary must still be written
        info["torch"] = f"import failed: {exc}"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = "not importable"
    try:
        import msflow_fast

        build = msflow_fast.build_info()
        info["msflow_fast"] = build.get("version", "?")
        ext = "built" if build.get("extension") else f"NOT loaded ({build.get('extension_error')})"
        if build.get("extension"):
            ext += ", with CUDA kernels" if build.get("extension_cuda") else ", CPU kernels only"
        info["extension msflow_fast._C"] = ext
        info["backends"] = str(build.get("backends"))
    except Exception as exc:  # noqa: BLE001
        info["msflow_fast"] = f"import failed: {exc}"
    return info


def count_tests(junit: str | None, log: str | None) -> tuple[dict[str, int], list[str], str]:
    """``(counts, failed test ids, source)`` from the JUnit XML, else from pytest's last summary line."""
    if junit and os.path.exists(junit):
        try:
            root = ET.parse(junit).getroot()
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            failed = []
            for case in root.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
            passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            return {"passed": passed, "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"]}, failed, "junit"
        except (ET.ParseError, OSError, ValueError):
            pass
    if log and os.path.exists(log):
        with open(log, errors="replace") as f:
            lines = f.read().splitlines()
        pattern = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)\b")
        for line in reversed(lines):
            found = pattern.findall(line)
            if found and re.search(r" in [\d.]+s", line):
                counts: dict[str, int] = {}
                for n, word in found:
                    word = "errors" if word.startswith("error") else word
                    counts[word] = counts.get(word, 0) + int(n)
                failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
                return counts, failed, "log"
    return {}, [], "none"


def _stage_result(rc: str) -> str:
    if rc == "skipped":
        return "skipped"
    if rc == "0":
        return "ok"
    if rc in TIMED_OUT:
        return "TIMED OUT"
    return f"FAILED (exit {rc})"


def _table_line(out: str, stem: str) -> str:
    csv_path, md_path = os.path.join(out, f"{stem}.csv"), os.path.join(out, f"{stem}.md")
    if not os.path.exists(csv_path):
        return f"- `{stem}`: no table"
    with open(csv_path) as f:
        rows = max(0, sum(1 for _ in f) - 1)
    status = "?"
    if os.path.exists(md_path):
        with open(md_path) as f:
            for line in f:
                if line.startswith("- status: "):
                    status = line[len("- status: ") :].strip()
                    break
    return f"- `{stem}.csv` / `.md`: {rows} rows; {status}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite_summary", description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--stages", required=True)
    p.add_argument("--junit", default=None)
    p.add_argument("--tests-log", default=None)
    p.add_argument("--tables", nargs="*", default=[])
    p.add_argument("--mode", default="cuda")
    p.add_argument("--started", default=None, help="start time (ISO)")
    args = p.parse_args(argv)

    stages = []
    if os.path.exists(args.stages):
        with open(args.stages) as f:
            stages = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    timed_out = [s[0] for s in stages if len(s) > 1 and s[1] in TIMED_OUT]
    failed = [s[0] for s in stages if len(s) > 1 and s[1] not in TIMED_OUT | {"0", "skipped"}]
    counts, failed_tests, source = count_tests(args.junit, args.tests_log)
    info = _versions()

    lines = [f"# gpu_suite: {info.get('device', args.mode)}", ""]
    lines.append(f"- mode: {args.mode}" + (" (dry run: CPU, --smoke tables, no install)" if args.mode != "cuda" else ""))
    lines.append(f"- date: {args.started or _dt.datetime.now().isoformat(timespec='seconds')}")
    lines += [f"- {k}: {v}" for k, v in info.items()]
    if counts:
        shown = ", ".join(f"{n} {k}" for k, n in counts.items())
        partial = " (partial: the tests stage timed out)" if "tests" in timed_out else ""
        partial = partial or (" (from the log: no JUnit report)" if source == "log" else "")
        lines.append(f"- tests: {shown}{partial}")
    else:
        lines.append("- tests: no result (see gpu_suite.log)")
    lines.append(f"- timed out: {', '.join(timed_out) if timed_out else 'none'}")
    lines.append(f"- failed: {', '.join(failed) if failed else 'none'}")
    lines += ["", "## Stages", "", "| stage | result | seconds | budget s |", "| --- | --- | ---: | ---: |"]
    for s in stages:
        name, rc, secs, budget = (s + ["", "", "", ""])[:4]
        lines.append(f"| {name} | {_stage_result(rc)} | {secs} | {budget} |")
    if failed_tests:
        lines += ["", f"## Failed tests ({len(failed_tests)})", ""]
        lines += [f"- `{t}`" for t in failed_tests[:40]]
        if len(failed_tests) > 40:
            lines.append(f"- ... {len(failed_tests) - 40} more (see gpu_suite.log)")
    lines += ["", "## Tables", ""] + [_table_line(args.out, stem) for stem in args.tables]
    files = sorted(f for f in os.listdir(args.out) if not f.endswith(".tmp")) + ["summary.md"]
    files = sorted(set(files))
    lines += ["", f"## Files in the output folder ({len(files)})", ""] + [f"- {f}" for f in files]
    if len(files) > MAX_FILES:
        lines.append(f"- WARNING: more than {MAX_FILES} files; the device tool brings back at most {MAX_FILES}")
    text = "\n".join(lines) + "\n"
    tmp = os.path.join(args.out, "summary.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(args.out, "summary.md"))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
