"""Export of a registered model's predict (MSFlow here: torch.export, ONNX through the reference backend) and autocast numerics."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from helpers import TinyBackbone
from msflow_fast import MSFlow, ops
from msflow_fast.models import PredictModule, export_onnx, export_predict, output_names

SMALL = dict(c_cond=8, parallel_blocks=(1, 2, 2), pretrained=False)


def _model(**overrides) -> MSFlow:
    torch.manual_seed(0)
    np.random.seed(0)
    model = MSFlow(backbone=TinyBackbone(), **{**SMALL, **overrides})
    with torch.no_grad():  # away from the identity initialisation
        for name, p in model.named_parameters():
            if "global_offset" in name or "conv2" in name:
                p.normal_(0, 0.1)
    return model.eval()


def _images(batch=2, size=64, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


NAMES = ["anomaly_map", "score", "anomaly_map_mul", "log_likelihood_0", "log_likelihood_1", "log_likelihood_2",
         "score_log_space", "score_official"]


def _assert_matches_predict(outputs, pred, **tol):
    assert len(outputs) == len(NAMES)
    for name, value in zip(NAMES, outputs):
        torch.testing.assert_close(value, pred.get(name), **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_exported_program_equals_predict_with_dynamic_batch():
    model = _model()
    x = _images(2)
    program = export_predict(model, x)
    assert isinstance(program, torch.export.ExportedProgram)
    assert output_names(model.predict(x), 2) == NAMES
    _assert_matches_predict(program.module()(x), model.predict(x))
    for batch in (1, 3):  # other batch sizes through the same program
        other = _images(batch, seed=batch)
        _assert_matches_predict(program.module()(other), model.predict(other))
    # the model's own state is untouched by tracing (eager predict still works)
    assert all(not isinstance(t, torch._subclasses.FakeTensor) for t in model.positional._cache.values())


def test_export_keeps_a_dynamic_batch_where_cpu_inference_uses_winograd():
    """Subnets wide enough for the Winograd path (resnet18 stages): its tile threshold reads the batch
    size, so tracing keeps F.conv2d instead of guarding the symbolic batch."""
    torch.manual_seed(0)
    model = MSFlow(input_size=64, backbone="resnet18", pretrained=False, parallel_blocks=(1, 1, 1)).eval()
    x = _images(2)
    if "cpp" in ops.available_backends("cpu", "conv3x3"):
        with torch.no_grad():  # eager predict here does take the Winograd path the export must avoid
            assert ops.winograd_enabled(torch.randn(2, 64, 16, 16))
    program = export_predict(model, x)
    for batch in (1, 3):
        other = _images(batch, seed=batch)
        _assert_matches_predict(program.module()(other), model.predict(other), rtol=1e-4, atol=1e-5)


def test_exported_reference_program_has_only_aten_ops_and_matches():
    model = _model(score="log_space")
    x = _images(2)
    program = export_predict(model, x, backend="reference", dynamic_batch=False)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "msflow_fast" in t], targets
    with ops.use_backend("reference"):
        expected = model.predict(x)
    _assert_matches_predict(program.module()(x), expected)
    _assert_matches_predict(program.module()(x), model.predict(x), rtol=1e-4, atol=1e-5)


def test_export_rejects_bad_inputs():
    model = _model()
    with pytest.raises(TypeError, match="AnomalyModel"):
        PredictModule(nn.Linear(2, 2), ["anomaly_map"])
    with pytest.raises(TypeError, match="AnomalyModel"):
        export_predict(nn.Linear(2, 2), _images(1))
    with pytest.raises(ValueError, match="divisible"):
        export_predict(model, _images(1, 60))
    bad = _images(1)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        export_predict(model, bad)


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
    reason="ONNX export needs the optional packages onnx and onnxscript (pip install onnx onnxscript)",
)
def test_onnx_export_runs_and_matches(tmp_path):
    model = _model()
    x = _images(2)
    path = export_onnx(model, x, tmp_path / "msflow.onnx")
    import onnx

    onnx.checker.check_model(onnx.load(path))
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed: the file was written and checked but not run")
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == NAMES
    other = _images(3, seed=3)
    outputs = session.run(None, {"images": other.numpy()})
    pred = model.predict(other)
    _assert_matches_predict([torch.from_numpy(o) for o in outputs], pred, rtol=1e-4, atol=1e-5)


def test_export_onnx_without_onnx_names_the_package(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError("No module named 'onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(ImportError, match="'onnx'"):
        export_onnx(_model(), _images(1), tmp_path / "x.onnx")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_loss_and_logdet_stay_float32(dtype):
    model = _model().train()
    x = _images(2)
    seen = []
    conv = model.parallel_flows.flows[0].module_list[0].subnet.conv2
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        reference = model.loss(x).detach()
        with torch.autocast("cpu", dtype=dtype):
            latents, logdet = model(x)
            loss = model.loss(x)
    finally:
        handle.remove()
    assert seen[-1] == dtype  # the subnets really ran in low precision
    assert logdet.dtype == torch.float32 and all(z.dtype == torch.float32 for z in latents)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), reference, rtol=5e-2, atol=0.0)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
