"""Backend selection: argument > context manager > environment > auto; explicit requests fail loudly."""

from __future__ import annotations

import pytest
import torch

import msflow_fast
from msflow_fast import ops
from msflow_fast.ops import _backend


def _inputs():
    x = torch.randn(2, 3, 4, 5)
    a = torch.randn(2, 6, 4, 5)
    return x, a


def test_reference_backend_always_available():
    assert "reference" in ops.available_backends("cpu")
    x, a = _inputs()
    assert _backend.resolve("affine_coupling", x.device, "reference")[1] is ops.reference.affine_coupling
    y, logdet = ops.affine_coupling(x, a, clamp=1.9, backend="reference")
    y_ref, logdet_ref = ops.reference.affine_coupling(x, a, clamp=1.9)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(logdet, logdet_ref)


def test_precedence_argument_context_environment(monkeypatch):
    monkeypatch.setenv(_backend.ENV_BACKEND, "cpp")
    assert _backend.requested_backend() == "cpp"
    with ops.use_backend("reference"):
        assert _backend.requested_backend() == "reference"
        assert _backend.requested_backend("triton") == "triton"
    assert _backend.requested_backend() == "cpp"
    monkeypatch.delenv(_backend.ENV_BACKEND)
    assert _backend.requested_backend() == "auto"


def test_unknown_backend_names_raise():
    x, a = _inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.affine_coupling(x, a, clamp=1.9, backend="cuda")
    with pytest.raises(ValueError, match="use_backend"):
        with ops.use_backend("fast"):
            pass


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(_backend.ENV_BACKEND, "nope")
    x, a = _inputs()
    with pytest.raises(ValueError, match="MSFLOW_FAST_BACKEND"):
        ops.affine_coupling(x, a, clamp=1.9)


def test_explicit_unavailable_backend_says_how_to_get_it(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, a = _inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.affine_coupling(x, a, clamp=1.9, backend="triton")


def test_explicit_cpp_without_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(
        "msflow_fast.ops._extension.extension_info", lambda: {"loaded": False, "cuda": False, "error": "ImportError: gone"}
    )
    x, a = _inputs()
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        ops.affine_coupling(x, a, clamp=1.9, backend="cpp")
    # auto never raises: it falls back to the reference
    name, _ = _backend.resolve("affine_coupling", x.device)
    assert name == "reference"


def test_auto_never_picks_the_triton_interpreter_on_cpu():
    expected = "cpp" if msflow_fast.build_info()["extension"] else "reference"
    for op in ("affine_coupling", "gaussian_nll", "aggregate_anomaly_maps"):
        name, _ = _backend.resolve(op, torch.device("cpu"))
        assert name == expected


def test_build_info_reports_extension_and_backends():
    info = msflow_fast.build_info()
    for key in ("version", "torch", "extension", "extension_cuda", "triton", "backends"):
        assert key in info
    assert "reference" in info["backends"]["cpu"]
    assert info["extension"] == (info["extension_error"] is None)


TRITON_OPS = (
    "affine_coupling", "global_affine_permute", "coupling_affine_permute", "gaussian_nll",
    "log_likelihood_map", "aggregate_anomaly_maps", "log_space_score", "channel_layer_norm_relu",
)


def test_every_backend_that_should_load_here_does():
    """Op tests are parametrised over the backends that load, so one that silently failed to import
    would drop all its tests; this says which module failed and why."""
    import importlib.util

    from conftest import DEVICE

    info = msflow_fast.build_info()
    triton_expected = importlib.util.find_spec("triton") is not None and (
        DEVICE.type == "cuda" or _backend.triton_interpreter_enabled()
    )
    expected = {"triton": TRITON_OPS if triton_expected else (), "cpp": (*TRITON_OPS, "conv3x3") if info["extension"] else ()}
    for backend, op_names in expected.items():
        for op in op_names:
            assert backend in ops.available_backends(DEVICE, op), (
                f"{backend} should run {op} on {DEVICE.type}: {_backend._why_unavailable(backend, op, DEVICE)}"
            )
    assert not _backend._import_errors, f"backend modules failed to import: {_backend._import_errors}"


_X, _A = torch.randn(2, 3, 4, 5), torch.randn(2, 6, 4, 5)
_META = torch.device("meta")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.affine_coupling(_X, _A.to(_META), clamp=1.9), "a is on meta but x is on cpu"),
        (lambda: ops.global_affine_permute(_X, torch.ones(3), torch.zeros(3), torch.arange(3, device=_META)),
         "perm is on meta but the input is on cpu"),
        (lambda: ops.coupling_affine_permute(_X, _A[:, :2], torch.ones(3, device=_META), torch.zeros(3), torch.arange(3), clamp=1.9),
         "global_scale is on meta"),
        (lambda: ops.channel_layer_norm_relu(_X, torch.ones(3, device=_META), torch.zeros(3)), "weight is on meta"),
        (lambda: ops.gaussian_nll(_X, torch.zeros(2, device=_META)), "logdet is on meta but z is on cpu"),
        (lambda: ops.aggregate_anomaly_maps([torch.randn(2, 4, 4), torch.randn(2, 2, 2, device=_META)], (8, 8)),
         r"log_likelihood_maps\[1\] is on meta but log_likelihood_maps\[0\] is on cpu"),
        (lambda: ops.conv3x3(torch.randn(1, 32, 8, 8), torch.randn(16, 32, 3, 3, device=_META)), "weight is on meta but x"),
    ],
    ids=["coupling", "perm", "block_tail", "norm", "nll", "maps", "conv"],
)
def test_device_mismatches_name_the_tensor(call, match):
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.skipif(not msflow_fast.build_info()["extension"], reason="msflow_fast._C is not built")
def test_cpp_on_an_unsupported_device_says_so():
    with pytest.raises(RuntimeError, match="the C\\+\\+ extension supports CPU and CUDA tensors, got device meta"):
        ops.affine_coupling(_X.to(_META), _A.to(_META), clamp=1.9, backend="cpp")


def test_auto_skips_the_atomic_cuda_kernels_in_deterministic_mode(monkeypatch):
    """As if on a GPU machine: Triton unavailable, C++ CUDA available."""
    available = {"triton": "Triton is not installed", "cpp": None, "reference": None}
    monkeypatch.setattr(_backend, "_why_unavailable", lambda backend, op, device: available[backend])
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        assert _backend._resolve_name("affine_coupling", "cuda", None) == "cpp"
        torch.use_deterministic_algorithms(True)
        for op in _backend.CUDA_ATOMIC_OPS:
            assert _backend._resolve_name(op, "cuda", None) == "reference"
        assert _backend._resolve_name("channel_layer_norm_relu", "cuda", None) == "cpp"  # no atomics
        assert _backend._resolve_name("affine_coupling", "cpu", None) == "cpp"
        available["triton"] = None
        assert _backend._resolve_name("affine_coupling", "cuda", None) == "triton"
    finally:
        torch.use_deterministic_algorithms(previous)
