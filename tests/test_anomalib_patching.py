"""msflow_fast.integrations.anomalib.patching: the fused block in every anomalib flow model.

For each model that binds anomalib's AllInOneBlock (found by looking, and checked to include
FastFlow, CFlow, U-Flow and PatchFlow): built under one seed, patched and stock hold the same
weights under the same keys, load each other's state dicts strictly, and give the same outputs in
float64 (training and inference forward; 1e-10 relative); to_stock / to_fused convert built models
both ways with the same weights; the patch is undone on exit. anomalib is a test dependency: a
missing package fails these tests.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import timm
import torch

from msflow_fast.integrations.anomalib import (
    AnomalibAllInOneBlock,
    count_blocks,
    patch,
    patched,
    stock_block,
    to_fused,
    to_stock,
    unpatch,
)
from msflow_fast.nn import AllInOneBlock

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # anomalib's import-time deprecation notices
    import anomalib.models.image.cflow.torch_model as cflow_torch
    import anomalib.models.image.fastflow.torch_model as fastflow_torch
    import anomalib.models.image.patchflow.torch_model as patchflow_torch
    import anomalib.models.image.uflow.torch_model as uflow_torch

F64 = torch.float64


def _no_download(monkeypatch) -> None:
    """U-Flow builds its timm extractor with pretrained=True; no weights can be downloaded here."""
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: create(*a, **{**k, "pretrained": False}))


BUILDERS = {
    "fastflow": lambda: fastflow_torch.FastflowModel(input_size=(64, 64), backbone="resnet18", pre_trained=False, flow_steps=2),
    "cflow": lambda: cflow_torch.CflowModel(backbone="resnet18", layers=["layer2", "layer3"], pre_trained=False, fiber_batch_size=64, coupling_blocks=2),
    "uflow": lambda: uflow_torch.UflowModel(input_size=(64, 64), flow_steps=2, backbone="resnet18"),
    "patchflow": lambda: patchflow_torch.PatchflowModel(input_size=(64, 64), backbone="resnet18", pre_trained=False, flow_steps=2),
}


def _build(name: str, fused: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if fused:
        with patched():
            return BUILDERS[name]()
    return BUILDERS[name]()


def _tensors(out) -> list[torch.Tensor]:
    """Every tensor of a model output (tensors, tuples, lists, anomalib's batch dataclasses)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if dataclasses.is_dataclass(out):
        return [t for f in dataclasses.fields(out) for t in _tensors(getattr(out, f.name))]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def test_patch_finds_every_flow_model_by_looking_and_undoes_itself():
    stock = stock_block()
    report = patch()
    try:
        assert {"fastflow", "cflow", "uflow", "patchflow"} <= set(report.models()), report
        for module in (fastflow_torch, patchflow_torch, uflow_torch):
            assert module.AllInOneBlock is AnomalibAllInOneBlock
        import anomalib.models.image.cflow.utils as cflow_utils

        assert cflow_utils.AllInOneBlock is AnomalibAllInOneBlock
        assert "fastflow" in str(report) and "patched" in str(report)
    finally:
        assert unpatch() == len(report.patched)
    assert fastflow_torch.AllInOneBlock is stock and uflow_torch.AllInOneBlock is stock
    with patched() as inner:
        assert inner.patched == report.patched
    assert patchflow_torch.AllInOneBlock is stock


@pytest.mark.parametrize("name", list(BUILDERS))
def test_patched_equals_stock_on_the_same_weights(name, monkeypatch):
    _no_download(monkeypatch)
    stock, fused = _build(name, fused=False), _build(name, fused=True)
    assert count_blocks(fused)["fused"] == count_blocks(stock)["stock"] > 0 and count_blocks(fused)["stock"] == 0
    s_state, f_state = stock.state_dict(), fused.state_dict()
    assert list(s_state) == list(f_state)
    for key in s_state:  # the same seed builds the same weights
        assert torch.equal(s_state[key], f_state[key]), key
    stock.load_state_dict(f_state, strict=True)
    fused.load_state_dict(s_state, strict=True)

    stock, fused = stock.to(F64), fused.to(F64)
    images = torch.rand(2, 3, 64, 64, dtype=F64, generator=torch.Generator().manual_seed(1))
    for training in (True, False):
        stock.train(training)
        fused.train(training)
        if name == "cflow" and training:  # CFlow trains its decoders on fibers in its Lightning module
            fibers = torch.randn(64, 128, dtype=F64)
            cond = torch.randn(64, 128, dtype=F64)
            outs = [m.decoders[0](fibers, [cond]) for m in (stock, fused)]
        else:
            outs = [m(images) for m in (stock, fused)]
        want, got = _tensors(outs[0]), _tensors(outs[1])
        assert want and len(want) == len(got)
        for w, g in zip(want, got):
            assert _rel(g, w) <= 1e-10, (name, training)
        if training:  # gradients reach the same parameters
            sum(t.sum() for t in got if t.requires_grad).backward()
            trained = fused.decoders[0] if name == "cflow" else fused
            assert all(p.grad is not None for p in trained.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["fastflow", "cflow"])
def test_to_stock_and_to_fused_convert_built_models_with_the_same_weights(name):
    fused = _build(name, fused=True, seed=3).to(F64).eval()
    reference = _build(name, fused=True, seed=3).to(F64).eval()
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    rng = torch.random.get_rng_state()
    assert to_stock(fused) is fused
    assert torch.equal(torch.random.get_rng_state(), rng)  # converting draws nothing from the caller's stream
    assert count_blocks(fused) == {"fused": 0, "stock": count_blocks(reference)["fused"]}
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in state.items())
    images = torch.rand(2, 3, 64, 64, dtype=F64)
    for w, g in zip(_tensors(reference(images)), _tensors(fused(images))):
        assert _rel(g, w) <= 1e-10
    to_fused(fused)
    assert count_blocks(fused)["stock"] == 0 and all(type(m) is AnomalibAllInOneBlock for m in fused.modules() if isinstance(m, AllInOneBlock))
    for w, g in zip(_tensors(reference(images)), _tensors(fused(images))):
        assert _rel(g, w) <= 1e-10


def test_soft_and_householder_permutations_convert():
    for kwargs in ({"permute_soft": True}, {"learned_householder_permutation": 2}):
        torch.manual_seed(0)
        block = stock_block()([(6, 3, 3)], subnet_constructor=lambda i, o: torch.nn.Conv2d(i, o, 3, padding=1), **kwargs).to(F64)
        holder = torch.nn.Sequential(block)
        x = torch.randn(2, 6, 3, 3, dtype=F64)
        (want,), want_ld = block([x])
        to_fused(holder)
        assert isinstance(holder[0], AnomalibAllInOneBlock)
        (got,), got_ld = holder[0]([x])
        assert _rel(got, want) <= 1e-10 and _rel(got_ld, want_ld) <= 1e-10


@pytest.mark.parametrize("name", ["fastflow", "uflow"])
def test_onnx_export_of_a_patched_model_runs_in_onnxruntime(name, tmp_path, monkeypatch):
    """ONNX export traces the reference maths of the fused ops (plain ONNX operators, no custom
    domain), and ONNX Runtime gives the eager patched model's outputs."""
    import onnx
    import onnxruntime

    _no_download(monkeypatch)
    model = _build(name, fused=True).eval()
    assert count_blocks(model)["fused"] > 0
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _tensors(model(images))
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (images,), str(path), dynamo=True, input_names=["input"])
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}, {n.domain for n in graph.node}
    assert not any("msflow" in n.op_type for n in graph.node)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": images.numpy()})
    assert len(got) == len(want)
    for w, g in zip(want, got):
        assert _rel(torch.from_numpy(g), w) <= 1e-4
