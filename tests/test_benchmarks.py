"""Smoke tests of the benchmark harness (``benchmarks/``) and of ``benchmarks/gpu_suite.sh``.

Each suite runs through ``benchmarks.run.main`` with ``--smoke`` (toy shapes, no torch.compile)
on CPU; the tests check the tables' schema and rows, not the numbers. The kernels suite's
``triton`` provider is excluded on CPU (``kernels._providers``), also under ``TRITON_INTERPRET=1``.
The shell script runs in its ``--dry-run`` mode (CPU, same stages, no pip install).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ lives beside the package in the checkout
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_suite_summary, harness  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402
from msflow_fast.ops import available_backends  # noqa: E402

CPU = torch.device("cpu")
MD_HEADER = ("- device: cpu", "- torch: ", "- triton: ", "- msflow_fast: ", "- python: ", "- date: ",
             "- measured copy bandwidth: ", "- measured matmul: ", "- status: ")
TABLE_HEADER = "| suite | op | mode | shape | dtype | provider | median ms |"


def _run(out: Path, suite: str, *extra: str) -> tuple[int, list[dict], str]:
    name = f"{suite}-smoke"
    code = bench_run.main(["--suite", suite, "--device", "cpu", "--smoke", "--out", str(out), "--name", name, *extra])
    with open(out / f"{name}.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == harness.CSV_FIELDS
        rows = list(reader)
    return code, rows, (out / f"{name}.md").read_text()


def _check_rows(rows: list[dict], suite: str, baseline: str) -> None:
    assert rows, "no rows"
    for r in rows:
        assert r["suite"] == suite and r["device"] == "cpu"
        median, p20, p80 = float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= median <= p80, r
        assert r["torch"] == torch.__version__ and r["msflow_fast"] and r["date"], r
        assert r["speedup_vs_reference"], f"no speed-up over {baseline}: {r}"
        assert float(r["speedup_vs_reference"]) > 0
        if r["provider"] == baseline:
            assert float(r["speedup_vs_reference"]) == pytest.approx(1.0)
        assert r["speedup_vs_compile"] == ""  # --smoke skips torch.compile


def _check_markdown(md: str, suite: str, rows: list[dict]) -> None:
    lines = md.splitlines()
    assert lines[0] == f"# Benchmarks: {suite} on cpu"
    for prefix in MD_HEADER:
        assert any(line.startswith(prefix) for line in lines), f"no '{prefix}' line in\n{md}"
    assert "- settings: --smoke" in md
    assert any(line.startswith(TABLE_HEADER) for line in lines)
    assert sum(line.startswith(f"| {suite} |") for line in lines) == len(rows)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def kernels_table(out_dir):
    return _run(out_dir, "kernels")


@pytest.fixture(scope="module")
def e2e_table(out_dir):
    return _run(out_dir, "e2e", "--bf16")


def test_smoke_flag_shrinks_and_defaults_stay():
    default = bench_run._parse([])
    assert (default.batch, default.head_batch, default.head_size, default.min_run_time) == (8, 32, 512, 0.5)
    assert not default.no_compile and not default.smoke
    smoke = bench_run._parse(["--smoke"])
    assert (smoke.batch, smoke.head_batch, smoke.head_size) == (2, 2, 64)
    assert smoke.min_run_time < 0.05 and smoke.no_compile
    assert bench_run._parse(["--smoke", "--batch", "3"]).batch == 3  # explicit values win


def test_kernels_suite_smoke(kernels_table):
    code, rows, md = kernels_table
    assert code == 0, md
    _check_rows(rows, "kernels", "reference")
    expected = {"reference"} | ({"cpp"} if "cpp" in available_backends(CPU, "affine_coupling") else set())
    assert {r["provider"] for r in rows} == expected  # no compile (--smoke), no triton on CPU
    assert {r["op"] for r in rows} == {
        "affine_coupling", "global_affine_permute", "coupling_affine_permute", "channel_layer_norm_relu", "conv3x3", "gaussian_nll", "aggregate_anomaly_maps"
    }
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd", "inverse"}
    for r in rows:
        if r["op"] == "conv3x3":  # compute-bound: no bandwidth figures
            assert r["gb_per_s"] == r["roofline_fraction"] == "", r
            continue
        assert float(r["gb_per_s"]) > 0 and float(r["roofline_fraction"]) > 0
    # every (op, shape, mode) has every provider, and the table keeps provider order within a case
    cases = {}
    for r in rows:
        cases.setdefault((r["op"], r["shape"]), []).append(r["provider"])
    for providers in cases.values():
        assert providers == sorted(providers, key=["reference", "cpp"].index)
    _check_markdown(md, "kernels", rows)
    assert "- status: complete" in md and "## Errors" not in md


def test_block_suite_smoke(out_dir):
    code, rows, md = _run(out_dir, "block")
    assert code == 0, md
    _check_rows(rows, "block", "freia")
    assert [r["provider"] for r in rows] == ["freia", "msflow_fast-reference", "msflow_fast"]
    assert {r["mode"] for r in rows} == {"fwd+bwd"}
    _check_markdown(md, "block", rows)


def test_e2e_suite_smoke(e2e_table):
    _, rows, md = e2e_table
    fp32 = [r for r in rows if r["provider"] != "msflow_fast-bf16"]
    _check_rows(fp32, "e2e", "reference")
    assert [(r["mode"], r["provider"]) for r in fp32] == [
        ("train step", "reference"),
        ("train step", "msflow_fast"),
        ("infer flows+head", "reference"),
        ("infer with backbone", "reference"),
        ("infer flows+head", "msflow_fast"),
        ("infer with backbone", "msflow_fast"),
    ]
    for r in fp32:
        assert r["dtype"] == "float32" and r["shape"] == "B2 64px resnet18"
        assert re.fullmatch(r"[\d.]+ img/s", r["extra"]), r["extra"]  # no peak memory on CPU
    _check_markdown(md, "e2e", rows)


def test_e2e_bf16_autocast_line(e2e_table):
    """The bf16-autocast line (GPU-only by default; --bf16 adds it on CPU) is measured and compared
    with the float32 reference of the same case."""
    code, rows, md = e2e_table
    assert code == 0 and "## Errors" not in md, md[md.find("## Errors") :]
    bf16 = [r for r in rows if r["provider"] == "msflow_fast-bf16"]
    assert [r["mode"] for r in bf16] == ["train step", "infer flows+head", "infer with backbone"]
    for r in bf16:
        assert r["dtype"] == "bfloat16" and float(r["median_ms"]) > 0
        assert r["speedup_vs_reference"], r


def test_epoch_suite_smoke(out_dir):
    """The epoch suite: per provider epoch 1 (cache built), steady epochs and inference, against
    the official composition; msflow_fast's first epoch names the cache it built."""
    code, rows, md = _run(out_dir, "epoch")
    assert code == 0 and "## Errors" not in md, md
    _check_rows(rows, "epoch", "freia")
    assert [(r["provider"], r["mode"]) for r in rows] == [
        (p, m) for p in ("freia", "msflow_fast", "msflow_fast-bf16") for m in ("epoch 1", "steady epoch", "infer with backbone")
    ]
    for r in rows:
        assert r["dtype"] == "float32" and r["shape"].endswith("64px resnet18"), r
        if r["provider"] != "freia" and r["mode"] == "epoch 1":
            assert re.search(r"cache memory [\d.]+ MiB, built in [\d.]+ s", r["extra"]), r["extra"]
    _check_markdown(md, "epoch", rows)


def test_fastflow_suite_smoke(out_dir):
    """The FastFlow suite: anomalib's eager FastflowModel against msflow_fast's FastFlow on the same weights."""
    code, rows, md = _run(out_dir, "fastflow")
    assert code == 0 and "## Errors" not in md, md
    _check_rows(rows, "fastflow", "anomalib")
    assert [(r["provider"], r["mode"]) for r in rows] == [
        (p, m) for p in ("anomalib", "msflow_fast") for m in ("train step", "infer flows+head", "infer with backbone")
    ]
    for r in rows:
        assert r["dtype"] == "float32" and r["shape"] == "B2 64px resnet18 3-3", r
        assert re.fullmatch(r"[\d.]+ img/s", r["extra"]), r["extra"]
    _check_markdown(md, "fastflow", rows)


def test_csflow_suite_smoke(out_dir):
    """The CS-Flow suite: anomalib's eager CrossScaleFlow against msflow_fast on the same weights."""
    code, rows, md = _run(out_dir, "csflow")
    assert code == 0 and "## Errors" not in md, md
    _check_rows(rows, "csflow", "anomalib")
    assert [(r["provider"], r["mode"]) for r in rows] == [
        (p, m) for p in ("anomalib", "msflow_fast") for m in ("train step", "infer flows+head", "infer with backbone")
    ]
    for r in rows:
        assert r["dtype"] == "float32" and r["shape"] == "B2 128px hidden 32", r
        assert re.fullmatch(r"[\d.]+ img/s", r["extra"]), r["extra"]
    _check_markdown(md, "csflow", rows)


def test_dadf_suite_smoke(out_dir):
    """The dadf suite: the eager composition (torch MultiheadAttention, FrEIA flows) against msflow_fast's DADF,
    in float32 and with the transformer in bf16 (compared with the float32 reference)."""
    code, rows, md = _run(out_dir, "dadf")
    assert code == 0 and "## Errors" not in md, md
    _check_rows(rows, "dadf", "reference")
    modes = ("stage-1 step", "stage-2 step (cached)", "inference")
    assert [(r["provider"], r["mode"]) for r in rows] == [(p, m) for p in ("reference", "msflow_fast") for m in modes] + [
        ("msflow_fast-bf16", "stage-1 step"), ("msflow_fast-bf16", "inference")
    ]
    for r in rows:
        assert r["dtype"] == ("bfloat16" if r["provider"] == "msflow_fast-bf16" else "float32"), r
        assert r["shape"] == "B2 64px resnet18 D48 L1 K2", r
        paired = "" if r["provider"] == "reference" else r"; paired [\d.]+x"
        assert re.fullmatch(r"[\d.]+ img/s" + paired, r["extra"]), r["extra"]
    _check_markdown(md, "dadf", rows)


def test_msflow_aas_suite_smoke(out_dir):
    """The msflow_aas suite: the FrEIA composition of the same maths against msflow_fast, CS-Flow beside them."""
    code, rows, md = _run(out_dir, "msflow_aas")
    assert code == 0 and "## Errors" not in md, md
    _check_rows(rows, "msflow_aas", "freia")
    assert [(r["provider"], r["mode"]) for r in rows] == [
        (p, m) for p in ("freia", "msflow_fast", "csflow") for m in ("train step", "infer flows+head", "infer with backbone")
    ]
    for r in rows:
        assert r["dtype"] == "float32" and r["shape"] == "B2 128px K2 mid 16", r
    _check_markdown(md, "msflow_aas", rows)


def test_anomalib_patch_suite_smoke(out_dir):
    """The anomalib suite: stock FastFlow, CFlow and U-Flow against the same models patched."""
    code, rows, md = _run(out_dir, "anomalib_patch")
    assert code == 0 and "## Errors" not in md, md
    _check_rows(rows, "anomalib_patch", "anomalib")
    assert [(r["op"], r["provider"], r["mode"]) for r in rows] == [
        (op, p, m) for op in ("FastFlow", "CFlow", "U-Flow") for p in ("anomalib", "msflow_fast") for m in ("train step", "inference")
    ] + [
        ("CFlow fiber block", p, m)
        for p in ("anomalib", "msflow_fast", "msflow_fast (reference)")
        for m in ("block forward", "block fwd+bwd")
    ]
    assert {r["shape"] for r in rows if r["op"] == "CFlow fiber block"} == {"N64 C33 cond 128"}
    _check_markdown(md, "anomalib_patch", rows)


def test_pseudo_anomaly_suite_smoke(out_dir):
    """The generator's throughput: one row per mode, images per second in the notes (no baseline)."""
    code, rows, md = _run(out_dir, "pseudo_anomaly")
    assert code == 0 and "## Errors" not in md, md
    assert [r["mode"] for r in rows] == ["mixture", "texture", "cutpaste", "scar", "poisson"]
    for r in rows:
        assert r["suite"] == "pseudo_anomaly" and float(r["median_ms"]) > 0 and re.fullmatch(r"[\d.]+ img/s", r["extra"]), r
    _check_markdown(md, "pseudo_anomaly", rows)


def test_mlff_suite_smoke(out_dir):
    """The mlff suite: both training steps and predict, for each fusion (no baseline provider)."""
    code, rows, md = _run(out_dir, "mlff")
    assert code == 0 and "## Errors" not in md, md
    assert [(r["op"], r["mode"]) for r in rows] == [
        (f"MLFF ({f} fusion), interpretation", m) for f in ("fpn", "concat") for m in ("student step", "segmentation step", "predict")
    ]
    for r in rows:
        assert r["suite"] == "mlff" and r["provider"] == "msflow_fast" and r["shape"] == "B2 64px" and float(r["median_ms"]) > 0, r
        assert re.fullmatch(r"[\d.]+ img/s", r["extra"]), r
    _check_markdown(md, "mlff", rows)


def test_time_budget_stops_and_says_so(tmp_path):
    code, rows, md = _run(tmp_path, "kernels", "--time-budget", "0")
    assert code == bench_run.EXIT_BUDGET and rows == []
    assert "- status: time budget of 0 s spent" in md and "## Not measured" in md
    assert "[kernels] affine_coupling B2 C8 8x8 reference" in md


def test_a_failing_case_is_reported_and_the_rest_measured(tmp_path, monkeypatch):
    from benchmarks import kernels

    real = kernels.run_case

    def run_case(case, *args, providers=None, **kwargs):
        if providers == ("reference",) and case.op == "gaussian_nll":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(case, *args, providers=providers, **kwargs)

    monkeypatch.setattr(kernels, "run_case", run_case)
    code, rows, md = _run(tmp_path, "kernels", "--ops", "gaussian_nll", "affine_coupling")
    assert code == bench_run.EXIT_ERRORS
    assert {(r["op"], r["provider"]) for r in rows} >= {("affine_coupling", "reference")}
    assert ("gaussian_nll", "reference") not in {(r["op"], r["provider"]) for r in rows}
    assert "## Errors" in md and "- [kernels] gaussian_nll B2 C16 8x8 reference: `RuntimeError: CUDA error" in md
    assert "1 of " in md and "cases failed" in md


def test_plot_draws_the_smoke_table(kernels_table, out_dir):
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    png = out_dir / "kernels-smoke.png"
    assert plot.main([str(out_dir / "kernels-smoke.csv"), "-o", str(png)]) == 0
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _row(provider: str, median: float, dtype: str = "float32") -> harness.Result:
    return harness.Result("e2e", "MSFlow", provider, "train step", "B8", dtype, "cuda", median, median, median)


def test_add_speedups_compares_a_bf16_line_with_the_float32_baselines():
    rows = [_row("reference", 10.0), _row("compile", 5.0), _row("msflow_fast", 4.0), _row("msflow_fast-bf16", 2.0, "bfloat16")]
    harness.add_speedups(rows)
    assert [r.speedup_vs_reference for r in rows] == [1.0, 2.0, 2.5, 5.0]
    assert [r.speedup_vs_compile for r in rows] == [0.5, 1.0, 1.25, 2.5]
    alone = [_row("msflow_fast", 4.0, "bfloat16")]  # a whole bf16 run without float32 rows: nothing to compare
    harness.add_speedups(alone)
    assert alone[0].speedup_vs_reference is None


def test_run_jobs_keeps_going_defers_and_orders():
    ran = []

    def job(label, order, median=None, deferred=False):
        def run():
            ran.append(label)
            if median is None:
                raise RuntimeError(f"{label} broke\nsecond line")
            return [_row(label, median)]

        return harness.Job(label, order, run, deferred)

    progress = []
    report = harness.run_jobs(
        [job("compile", (1,), 3.0, deferred=True), job("reference", (0,), 1.0), job("bad", (2,)), job("msflow_fast", (3,), 2.0)],
        on_progress=lambda rep: progress.append(len(rep.results)),
    )
    assert ran == ["reference", "bad", "msflow_fast", "compile"]  # deferred last
    assert [r.provider for r in report.results] == ["reference", "compile", "msflow_fast"]  # table order
    assert report.errors == [("bad", "RuntimeError: bad broke")] and progress == [1, 1, 2, 3]
    assert not report.skipped and not report.interrupted
    late = harness.run_jobs([job("reference", (0,), 1.0)], deadline=0.0)
    assert late.skipped == ["reference"] and late.results == []


def test_summary_counts_tests_from_junit_or_the_log(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/><testcase classname="tests.test_a" name="test_bad"><failure/></testcase>'
        '<testcase classname="tests.test_b" name="test_err"><error/></testcase></testsuite></testsuites>'
    )
    counts, failed, source = gpu_suite_summary.count_tests(str(junit), None)
    assert source == "junit" and counts == {"passed": 2, "failed": 1, "errors": 1, "skipped": 1}
    assert failed == ["tests.test_a::test_bad", "tests.test_b::test_err"]
    log = tmp_path / "t.log"
    log.write_text("....F\nFAILED tests/test_x.py::test_y - assert 0\n!!! KeyboardInterrupt !!!\n3 failed, 40 passed, 2 skipped in 12.5s\n")
    counts, failed, source = gpu_suite_summary.count_tests(str(tmp_path / "missing.xml"), str(log))
    assert source == "log" and counts == {"failed": 3, "passed": 40, "skipped": 2}
    assert failed == ["tests/test_x.py::test_y"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout")
@pytest.mark.skipif(os.environ.get("GPU_SUITE_NESTED") == "1", reason="already inside benchmarks/gpu_suite.sh")
def test_gpu_suite_dry_run(tmp_path):
    """The shell logic of gpu_suite.sh on CPU: stages, budgets, a timed-out stage that does not stop
    the next, the log, summary.md and the 8-file limit of the device tool."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "GPU_SUITE_"))}
    env.update(
        PYTHON=sys.executable,
        TMPDIR=str(tmp_path),
        GPU_SUITE_TESTS="tests/test_backend_selection.py",
        GPU_SUITE_ROLLOVER="0",
        GPU_SUITE_BUDGET_BLOCK="1",  # too short even to import torch: the block stage times out
    )
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", str(out)],
        env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    log = (out / "gpu_suite.log").read_text()
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: a stage did not pass
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    (date,) = {m.group(1) for f in files if (m := re.fullmatch(r"kernels-cpu-smoke-(\d{4}-\d\d-\d\d)\.csv", f))}
    tables = [f"{suite}-cpu-smoke-{date}.{ext}" for suite in ("kernels", "e2e") for ext in ("csv", "md")]
    assert files == sorted(["gpu_suite.log", "summary.md", *tables]), files
    for suite in ("kernels", "e2e"):
        with open(out / f"{suite}-cpu-smoke-{date}.csv", newline="") as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames) == harness.CSV_FIELDS and len(list(reader)) > 0
        assert "- status: complete" in (out / f"{suite}-cpu-smoke-{date}.md").read_text()

    summary = (out / "summary.md").read_text()
    assert summary.startswith("# gpu_suite: cpu")
    for line in ("- mode: cpu", "- date: ", "- torch: ", "- msflow_fast: ", "- timed out: block", "- failed: none"):
        assert line in summary, summary
    m = re.search(r"^- tests: (\d+) passed, 0 failed, 0 errors", summary, re.M)
    assert m and int(m.group(1)) > 0, summary
    for stage, result in (("setup", "skipped"), ("tests", "ok"), ("kernels", "ok"), ("block", "TIMED OUT"), ("e2e", "ok")):
        assert re.search(rf"^\| {stage} \| {result} \|", summary, re.M), summary
    assert f"- `kernels-cpu-smoke-{date}.csv` / `.md`: " in summary and f"- `block-cpu-smoke-{date}`: no table" in summary
    # the log holds every stage's output, in order
    positions = [log.index(f"==== {s}: ") for s in ("setup", "tests", "kernels", "block", "e2e")]
    assert positions == sorted(positions)
    assert "passed" in log and "==== block: TIMED OUT" in log and "| kernels | affine_coupling |" in log
    assert summary in proc.stdout  # the summary ends the script's output (the device tool returns its tail)


def test_cuda_timing_path_with_a_fake_device(monkeypatch):
    """``time_ms`` on CUDA (not runnable here): Triton's do_bench arguments and quantile order, and
    the longer ``rep`` for slow steps; ``_peak_memory_mb``'s conversion. CUDA calls are faked."""
    triton_testing = pytest.importorskip("triton.testing")
    import inspect
    import time

    from benchmarks import end_to_end

    assert {"quantiles", "warmup", "rep"} <= set(inspect.signature(triton_testing.do_bench).parameters)
    calls = []

    def fake_do_bench(fn, *, quantiles, warmup, rep):
        calls.append((quantiles, warmup, rep))
        fn()
        return [1.0, 2.0, 3.0]  # Triton returns the quantiles in the order asked

    monkeypatch.setattr(triton_testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    cuda = torch.device("cuda")
    assert harness.time_ms(lambda: None, cuda) == (2.0, 1.0, 3.0)  # (median, p20, p80)
    assert calls[-1] == ([0.2, 0.5, 0.8], 25, 100.0)
    harness.time_ms(lambda: time.sleep(0.03), cuda)  # a 30-ms step: ~5 timed runs, not 1
    assert 140.0 <= calls[-1][2] <= 2000.0

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    assert end_to_end._peak_memory_mb(cuda, lambda: None) == 3.0
    assert end_to_end._peak_memory_mb(CPU, lambda: None) is None


def test_threads_option_sets_and_reports_the_thread_count(out_dir):
    """``--threads N`` measures on N threads and says so in the header; bad counts are refused."""
    before = torch.get_num_threads()
    try:
        code, rows, md = _run(out_dir, "kernels", "--ops", "gaussian_nll", "--threads", "1")
        assert code == 0 and rows and torch.get_num_threads() == 1
        assert "- device: cpu (" in md and ", 1 CPU threads)" in md, md
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        bench_run.main(["--suite", "kernels", "--smoke", "--threads", "0", "--out", str(out_dir)])
