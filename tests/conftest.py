"""Test configuration: Triton interpreter on CPU, NaN-poisoned outputs, seeds, backend and device fixtures."""

from __future__ import annotations

import os

import torch

# Before anything imports Triton kernels: without a GPU, run them in the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# C++ outputs start as NaN, so an element a kernel forgets to write fails the comparison.
os.environ.setdefault("MSFLOW_FAST_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

from msflow_fast.ops import available_backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    """``torch.empty``/``empty_like`` return NaN-filled float tensors, so unwritten outputs fail."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one CPU thread for a module (many small ops, where a second thread costs more than it
    gives on a shared 2-core machine), restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def float64_default():
    """Make float64 the default dtype for one test (Jacobian and exact-maths tests)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def fused_backends(device: torch.device = DEVICE, op: str | None = None) -> list[str]:
    """Non-reference backends that can run ``op`` on ``device`` here."""
    return [b for b in available_backends(device, op) if b != "reference"]
