"""Per-sample LayerNorm over [C, H, W] (FastFlow's features): every fused backend against ops.reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msflow_fast import ops
from msflow_fast.ops import reference

from conftest import DEVICE, fused_backends
from helpers import assert_close_to_reference

BACKENDS = fused_backends(DEVICE, "sample_layer_norm")
# C in {1, 3, 7, 64}, H x W in {1x1, 7x9, 13x17}, B in {1, 3}. N = C*H*W of the last two spans several
# chunks of every split reduction (CPU: 8192-value statistics chunks, 2048-value backward columns;
# Triton: 4096; CUDA: 2048).
SHAPES = [(1, 1, 1, 1), (3, 7, 1, 1), (3, 3, 7, 9), (1, 7, 13, 17), (3, 64, 7, 9), (3, 64, 13, 17), (2, 64, 25, 25)]


def _inputs(shape, *, affine: bool):
    """Random float64 inputs with a per-sample offset and spread (the norm must remove both)."""
    b = shape[0]
    x = 3.0 * torch.randn(shape, dtype=torch.float64, device=DEVICE) + 5.0 * torch.randn(
        b, *[1] * (len(shape) - 1), dtype=torch.float64, device=DEVICE
    )
    if not affine:
        return x, None, None
    weight = 1.0 + 0.5 * torch.randn(shape[1:], dtype=torch.float64, device=DEVICE)
    bias = 0.3 * torch.randn(shape[1:], dtype=torch.float64, device=DEVICE)
    return x, weight, bias


def _leaves(tensors, dtype, param_dtype=None):
    param_dtype = param_dtype or dtype
    x, weight, bias = tensors
    out = [x.detach().to(dtype).requires_grad_()]
    out += [None if t is None else t.detach().to(param_dtype).requires_grad_() for t in (weight, bias)]
    return out


def _grads(out, leaves, cotangent):
    used = [t for t in leaves if t is not None]
    return torch.autograd.grad(out, used, cotangent)


def test_has_a_fused_backend_here():
    assert "cpp" in BACKENDS or "triton" in BACKENDS, f"no fused backend of sample_layer_norm on {DEVICE}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradients_match_reference(backend, dtype, affine, shape):
    inputs = _inputs(shape, affine=affine)
    leaves = _leaves(inputs, dtype)
    out = ops.sample_layer_norm(*leaves, backend=backend)
    assert out.dtype == dtype and out.shape == shape and out.is_contiguous()
    eager_leaves = _leaves(inputs, dtype)
    eager = reference.sample_layer_norm(*eager_leaves)
    exact_leaves = _leaves(inputs, torch.float64)
    exact = reference.sample_layer_norm(*exact_leaves)
    assert_close_to_reference("out", out.detach(), eager.detach(), exact.detach())

    cotangent = torch.randn_like(exact)
    grads = _grads(out, leaves, cotangent.to(dtype))
    eager_grads = _grads(eager, eager_leaves, cotangent.to(dtype))
    exact_grads = _grads(exact, exact_leaves, cotangent)
    for name, g, ge, gx in zip(("x", "weight", "bias"), grads, eager_grads, exact_grads):
        assert g.shape == gx.shape and g.dtype == dtype, name
        assert_close_to_reference(f"grad {name}", g, ge, gx, ratio=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_gradcheck(backend, affine):
    leaves = [t for t in _leaves(_inputs((2, 2, 2, 3), affine=affine), torch.float64) if t is not None]
    fn = (lambda x, w, b: ops.sample_layer_norm(x, w, b, backend=backend)) if affine else (
        lambda x: ops.sample_layer_norm(x, backend=backend)
    )
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "3d"])
def test_strided_and_other_rank_inputs(backend, layout):
    x, weight, bias = _inputs((3, 7, 5, 6), affine=True)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        weight = weight.transpose(1, 2).contiguous().transpose(1, 2)  # a non-contiguous weight, too
    else:
        x, weight, bias = x.flatten(2), weight.flatten(1), bias.flatten(1)
    assert not x.is_contiguous() or layout == "3d"
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = ops.sample_layer_norm(*leaves, backend=backend)
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    expected = reference.sample_layer_norm(*ref_leaves)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn_like(expected)
    for name, g, e in zip(("x", "weight", "bias"), _grads(out, leaves, cotangent), _grads(expected, ref_leaves, cotangent)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_half_inputs_compute_in_float32_with_float32_parameters(backend, dtype, affine):
    inputs = _inputs((2, 24, 5, 7), affine=affine)
    leaves = _leaves(inputs, dtype, torch.float32)
    out = ops.sample_layer_norm(*leaves, backend=backend)
    assert out.dtype == dtype
    # The float32 maths on the same (half-rounded) inputs is the target.
    exact_leaves = [None if t is None else t.detach().float().requires_grad_() for t in leaves]
    expected = reference.sample_layer_norm(*exact_leaves)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    cotangent = torch.randn_like(expected)
    grads = _grads(out, leaves, cotangent.to(dtype))
    exact_grads = _grads(expected, exact_leaves, cotangent)
    for name, leaf, g, ge in zip(("x", "weight", "bias"), [t for t in leaves if t is not None], grads, exact_grads):
        assert g.dtype == leaf.dtype, name
        scale = max(1.0, ge.abs().max().item())
        torch.testing.assert_close(g.float(), ge, rtol=4 * tol, atol=4 * tol * scale, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_reduction_is_accurate_and_bit_reproducible(backend):
    """Many chunks per sample, a mean 1000x the spread (float32 cancellation), repeats bit for bit
    (and, on the CPU, whatever the thread count: the chunks are fixed)."""
    shape = (2, 64, 40, 41)  # N = 104960 per sample: 13 / 26 / 52 chunks (CPU / Triton / CUDA)
    x64 = 1000.0 + torch.randn(shape, dtype=torch.float64, device=DEVICE)
    w64 = 1.0 + 0.5 * torch.randn(shape[1:], dtype=torch.float64, device=DEVICE)
    b64 = 0.3 * torch.randn(shape[1:], dtype=torch.float64, device=DEVICE)
    cotangent = torch.randn(shape, dtype=torch.float64, device=DEVICE)

    def run():
        leaves = [t.float().requires_grad_() for t in (x64, w64, b64)]
        out = ops.sample_layer_norm(*leaves, backend=backend)
        return (out.detach(), *torch.autograd.grad(out, leaves, cotangent.float()))

    first = run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        second = run()
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("out", "grad x", "grad weight", "grad bias"), first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"
    eager_leaves = [t.float().requires_grad_() for t in (x64, w64, b64)]
    eager = reference.sample_layer_norm(*eager_leaves)
    exact_leaves = [t.clone().requires_grad_() for t in (x64, w64, b64)]
    exact = reference.sample_layer_norm(*exact_leaves)
    results = zip(
        ("out", "grad x", "grad weight", "grad bias"),
        first,
        (eager.detach(), *torch.autograd.grad(eager, eager_leaves, cotangent.float())),
        (exact.detach(), *torch.autograd.grad(exact, exact_leaves, cotangent)),
    )
    for name, a, e, x in results:
        assert_close_to_reference(name, a, e, x, ratio=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_module_it_replaces(backend):
    """FastFlow's ``nn.LayerNorm([C, H, W])`` (elementwise affine) in float32, forward and parameter gradients."""
    norm = nn.LayerNorm([16, 9, 10]).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    x = torch.randn(4, 16, 9, 10, device=DEVICE)
    expected = norm(x)
    out = ops.sample_layer_norm(x, norm.weight, norm.bias, eps=norm.eps, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad(out, (norm.weight, norm.bias), cotangent)
    expected_grads = torch.autograd.grad(expected, (norm.weight, norm.bias), cotangent)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [1e-5, 0.1], ids=str)
def test_float64_uses_eps_unrounded(backend, eps):
    """A spread far below sqrt(eps) makes ``rstd ~ eps^-1/2``: an eps rounded to float32 would move
    the output by ~1e-9 relative, 1000x the tolerance."""
    x, weight, _ = _inputs((2, 7, 5, 7), affine=True)
    x = 1e-6 * x
    bias = torch.zeros_like(weight)
    out = ops.sample_layer_norm(x, weight, bias, eps=eps, backend=backend)
    expected = reference.sample_layer_norm(x, weight, bias, eps=eps)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_poisons_only_its_sample(backend):
    x, weight, bias = _inputs((3, 5, 4, 6), affine=True)
    x[1, 2, 3, 4] = float("nan")
    out = ops.sample_layer_norm(x, weight, bias, backend=backend)
    assert out[1].isnan().all()
    torch.testing.assert_close(out[[0, 2]], reference.sample_layer_norm(x[[0, 2]], weight, bias))


def test_check_finite_names_the_tensor():
    x, weight, bias = _inputs((2, 6, 3, 4), affine=True)
    x[1, 2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="x contains 1 non-finite"):
        ops.sample_layer_norm(x, weight, bias, check_finite=True)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, w, b, be: ops.sample_layer_norm(x[0, 0, 0], w, b, backend=be), ValueError, "at least 2 dims"),
        (lambda x, w, b, be: ops.sample_layer_norm(x[:0], w, b, backend=be), ValueError, "non-empty"),
        (lambda x, w, b, be: ops.sample_layer_norm(x, w[:-1], b, backend=be), ValueError, "weight must have x's per-sample shape"),
        (lambda x, w, b, be: ops.sample_layer_norm(x, w, b.flatten(), backend=be), ValueError, "bias must have x's per-sample shape"),
        (lambda x, w, b, be: ops.sample_layer_norm(x, w, None, backend=be), ValueError, "weight and bias must be given together"),
        (lambda x, w, b, be: ops.sample_layer_norm(x, w, b.float(), backend=be), TypeError, "bias has dtype"),
        (lambda x, w, b, be: ops.sample_layer_norm(x, w.long(), b, backend=be), TypeError, "weight must have a floating dtype"),
        (lambda x, w, b, be: ops.sample_layer_norm(x.long(), w, b, backend=be), TypeError, "x must have a floating dtype"),
        (lambda x, w, b, be: ops.sample_layer_norm(x, w.to("meta"), b, backend=be), TypeError, "weight is on meta"),
        (lambda x, w, b, be: ops.sample_layer_norm(x, w, b, eps=0.0, backend=be), ValueError, "eps must be"),
        (lambda x, w, b, be: ops.sample_layer_norm(x, w, b, eps="1e-5", backend=be), TypeError, "eps must be"),
        (lambda x, w, b, be: ops.sample_layer_norm(x.tolist(), w, b, backend=be), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_arguments_name_the_problem(backend, call, error, match):
    x, w, b = _inputs((2, 6, 3, 4), affine=True)
    with pytest.raises(error, match=match):
        call(x, w, b, backend)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="msflow_fast._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_cpp_op_registration_passes_opcheck(dtype, affine):
    x, weight, bias = _inputs((2, 5, 3, 4), affine=affine)
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    xd = x.to(dtype).requires_grad_()
    wd = None if weight is None else weight.to(param_dtype).requires_grad_()
    bd = None if bias is None else bias.to(param_dtype).requires_grad_()
    torch.library.opcheck(torch.ops.msflow_fast.sample_layer_norm_fwd, (xd, wd, bd, 1e-5))
    wdet = None if wd is None else wd.detach()
    _, mean, rstd = torch.ops.msflow_fast.sample_layer_norm_fwd(xd.detach(), wdet, None if bd is None else bd.detach(), 1e-5)
    grad = torch.randn_like(xd.detach())
    torch.library.opcheck(torch.ops.msflow_fast.sample_layer_norm_bwd, (grad, xd.detach(), wdet, mean, rstd))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="msflow_fast._C is not built")
def test_cpp_checks_name_the_argument():
    o = torch.ops.msflow_fast
    x = torch.randn(2, 5, 3, 4, device=DEVICE)
    w = torch.randn(5, 3, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="weight must have x's per-sample shape"):
        o.sample_layer_norm_fwd(x, w[:4], w, 1e-5)
    with pytest.raises(RuntimeError, match="weight and bias must be given together"):
        o.sample_layer_norm_fwd(x, w, None, 1e-5)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        o.sample_layer_norm_fwd(x.transpose(2, 3), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="bias must have x's dtype"):
        o.sample_layer_norm_fwd(x, w, w.double(), 1e-5)
    with pytest.raises(RuntimeError, match="eps must be"):
        o.sample_layer_norm_fwd(x, None, None, -1.0)
    with pytest.raises(RuntimeError, match="x must be a non-empty"):
        o.sample_layer_norm_fwd(x[:0], None, None, 1e-5)
    _, mean, rstd = o.sample_layer_norm_fwd(x, w, w, 1e-5)
    with pytest.raises(RuntimeError, match="mean must have shape"):
        o.sample_layer_norm_bwd(x, x, w, mean[:1], rstd)
    with pytest.raises(RuntimeError, match="rstd must be Double"):
        o.sample_layer_norm_bwd(x.double(), x.double(), w.double(), mean.double(), rstd)
    with pytest.raises(RuntimeError, match="grad must have x's shape"):
        o.sample_layer_norm_bwd(x[:, :2].contiguous(), x, w, mean, rstd)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="msflow_fast._C is not built")
def test_cpp_op_under_torch_compile():
    """``torch.compile(fullgraph=True)`` traces the C++ op (fake kernels) and its registered autograd."""
    x, weight, bias = _inputs((2, 6, 5, 7), affine=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss(x, w, b):
        return (ops.sample_layer_norm(x, w, b, backend="cpp") ** 2).sum()

    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    value = loss(*leaves)
    expected = (reference.sample_layer_norm(*ref_leaves) ** 2).sum()
    torch.testing.assert_close(value, expected)
    for g, e in zip(torch.autograd.grad(value, leaves), torch.autograd.grad(expected, ref_leaves)):
        torch.testing.assert_close(g, e)
