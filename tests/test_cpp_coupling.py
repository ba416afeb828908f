"""C++ extension tests of the flow-block ops: registration (opcheck), torch.compile, the C++-level
argument checks, and results and gradients against ops.reference on odd shapes (CPU here; the
same tests run on CUDA where a GPU is present)."""

from __future__ import annotations

import itertools

import pytest
import torch

import msflow_fast.ops as ops
from msflow_fast.ops import reference as ref

from conftest import DEVICE
from helpers import assert_close_to_reference

cpp = pytest.importorskip("msflow_fast.ops._cpp_coupling", reason="msflow_fast._C is not built")
msops = torch.ops.msflow_fast

CLAMP = 1.9
SHAPES = [
    (b, c, h, w)
    for b, c, (h, w) in itertools.product((1, 3), (2, 3, 7, 64), ((1, 1), (7, 9), (13, 17)))
]
SHAPE_IDS = [f"B{b}-C{c}-{h}x{w}" for b, c, h, w in SHAPES]
# small planes (H * W < 64: fibers [B, C, 1, 1] as in CFlow, small maps) take tiled C++ kernels
SMALL_SHAPES = [
    (64, 7, 1, 1),
    (64, 33, 1, 1),
    (5, 128, 1, 1),
    (3, 1025, 1, 1),  # chunks of 512 channels, the passive half ends inside one
    (300, 64, 1, 1),  # several sample blocks
    (2, 4099, 2, 2),  # one sample per tile, several channel ranges
    (4, 7, 2, 2),
    (3, 33, 4, 4),
    (2, 3, 3, 5),
    (2, 9, 7, 9),  # 63 pixels, the largest small plane
    (2, 5, 8, 8),  # 64 pixels, the plane kernels
]
SMALL_IDS = [f"B{b}-C{c}-{h}x{w}" for b, c, h, w in SMALL_SHAPES]
ALL_SHAPES, ALL_IDS = SHAPES + SMALL_SHAPES, SHAPE_IDS + SMALL_IDS
DTYPES = [torch.float32, torch.float64]


def _gamma(channels: int, affine_type: str, dtype=torch.float64, device=DEVICE) -> torch.Tensor:
    """Raw global scale around the FrEIA init, [1, C, 1, 1]."""
    base = ref.global_scale_init(1.0, affine_type)
    spread = {"SOFTPLUS": 2.0, "SIGMOID": 1.0, "EXP": 0.3}[affine_type]
    return (base + spread * torch.randn(1, channels, 1, 1, dtype=torch.float64)).to(device, dtype)


def _block_inputs(shape, active: int, dtype, affine_type="SOFTPLUS", device=DEVICE):
    b, c, h, w = shape
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    a = 4.0 * torch.randn(b, 2 * active, h, w, dtype=torch.float64)
    gamma = _gamma(c, affine_type)
    offset = 0.5 * torch.randn(1, c, 1, 1, dtype=torch.float64)
    perm = torch.randperm(c)
    return [t.to(device, dtype) for t in (x, a, gamma, offset)] + [perm.to(device)]


def _grads_of(fn, inputs, cotangents):
    """Outputs of fn(*inputs) and the gradients of <outputs, cotangents> wrt inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    loss = sum((o * g).sum() for o, g in zip(outs, cotangents))
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves))


def _compare(name, fn_cpp, fn_ref, inputs, dtype, *, out_names=("y", "logdet"), in_names=()):
    """Forward values and every input gradient of fn_cpp vs fn_ref (float64 and eager same-dtype)."""
    exact_inputs = [t.double() for t in inputs]
    exact_outs = fn_ref(*exact_inputs)
    cotangents = [torch.randn_like(o) for o in exact_outs]
    outs, grads = _grads_of(fn_cpp, [t.to(dtype) for t in inputs], [g.to(dtype) for g in cotangents])
    eager_outs, eager_grads = _grads_of(fn_ref, [t.to(dtype) for t in inputs], [g.to(dtype) for g in cotangents])
    exact_outs, exact_grads = _grads_of(fn_ref, exact_inputs, cotangents)
    for label, actual, eager, exact in zip(out_names, outs, eager_outs, exact_outs):
        # log-dets of half inputs are float32, element outputs keep the input dtype
        assert actual.dtype == (ref.compute_dtype(dtype) if label == "logdet" else dtype), (label, actual.dtype)
        assert actual.dtype == eager.dtype
        assert_close_to_reference(f"{name} {label}", actual, eager, exact)
    for label, actual, eager, exact in zip(in_names, grads, eager_grads, exact_grads):
        assert actual.shape == exact.shape
        assert_close_to_reference(f"{name} grad {label}", actual, eager, exact)


# ---------------------------------------------------------------------------------------------
# results and gradients vs the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("clamp_form", ref.CLAMP_FORMS)
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=ALL_IDS)
def test_affine_coupling_matches_reference(shape, clamp_form, reverse, dtype):
    x, a, *_ = _block_inputs(shape, shape[1], torch.float64)
    kwargs = dict(clamp=CLAMP, clamp_form=clamp_form, reverse=reverse)
    _compare(
        "affine_coupling",
        lambda x, a: cpp.affine_coupling(x, a, **kwargs),
        lambda x, a: ref.affine_coupling(x, a, **kwargs),
        [x, a],
        dtype,
        in_names=("x", "a"),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("affine_type", ref.AFFINE_TYPES)
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=ALL_IDS)
def test_global_affine_permute_matches_reference(shape, affine_type, reverse, dtype):
    x, _, gamma, offset, perm = _block_inputs(shape, 1, torch.float64, affine_type)
    kwargs = dict(affine_type=affine_type, reverse=reverse)
    _compare(
        "global_affine_permute",
        lambda x, g, o: cpp.global_affine_permute(x, g, o, perm, **kwargs),
        lambda x, g, o: ref.global_affine_permute(x, g, o, perm, **kwargs),
        [x, gamma, offset],
        dtype,
        in_names=("x", "global_scale", "global_offset"),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("clamp_form", "affine_type"), [(f, t) for f in ref.CLAMP_FORMS for t in ref.AFFINE_TYPES]
)
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=ALL_IDS)
def test_coupling_affine_permute_matches_reference(shape, clamp_form, affine_type, dtype):
    x, a, gamma, offset, perm = _block_inputs(shape, shape[1] // 2, torch.float64, affine_type)
    kwargs = dict(clamp=CLAMP, clamp_form=clamp_form, affine_type=affine_type)
    _compare(
        "coupling_affine_permute",
        lambda x, a, g, o: cpp.coupling_affine_permute(x, a, g, o, perm, **kwargs),
        lambda x, a, g, o: ref.coupling_affine_permute(x, a, g, o, perm, **kwargs),
        [x, a, gamma, offset],
        dtype,
        in_names=("x", "a", "global_scale", "global_offset"),
    )


def test_softplus_linear_branch_matches_reference():
    """gamma / 2 > 20: F.softplus returns its input; the kernels mirror that threshold."""
    shape = (2, 5, 3, 4)
    x, a, _, offset, perm = _block_inputs(shape, 2, torch.float64)
    gamma = torch.tensor([-3.0, 0.0, 39.0, 41.0, 60.0], dtype=torch.float64).view(1, 5, 1, 1)
    _compare(
        "coupling_affine_permute",
        lambda x, a, g, o: cpp.coupling_affine_permute(x, a, g, o, perm, clamp=CLAMP),
        lambda x, a, g, o: ref.coupling_affine_permute(x, a, g, o, perm, clamp=CLAMP),
        [x, a, gamma, offset],
        torch.float64,
        in_names=("x", "a", "global_scale", "global_offset"),
    )


@pytest.mark.parametrize("clamp_form", ["tanh", "atan"])
def test_float32_clamp_approximations_over_every_range(clamp_form):
    """The vectorised float32 tanh/atan cover every branch: tiny, both reduction ranges, huge, inf, NaN."""
    magnitudes = torch.cat([torch.zeros(1), torch.logspace(-8, 8, 333), torch.tensor([3e38, float("inf")])])
    a_s = torch.cat([magnitudes, -magnitudes, torch.tensor([float("nan")])]).view(1, -1, 1, 1)
    a = torch.cat([a_s, 0.5 * torch.randn_like(a_s)], dim=1).to(DEVICE)
    x = torch.randn(1, a_s.shape[1], 1, 1, device=DEVICE)
    y, _ = cpp.affine_coupling(x, a, clamp=CLAMP, clamp_form=clamp_form)
    y_exact, _ = ref.affine_coupling(x.double(), a.double(), clamp=CLAMP, clamp_form=clamp_form)
    finite = torch.isfinite(y_exact)
    torch.testing.assert_close(y[finite].double(), y_exact[finite], rtol=4e-6, atol=1e-6)
    assert torch.isnan(y[~finite]).all(), "NaN in the subnet output must propagate"


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("clamp_form", ref.CLAMP_FORMS)
def test_float64_clamp_and_exp_over_every_range(clamp_form, reverse):
    """The vectorised float64 tanh/atan/exp agree with the reference to a few ulp on every branch,
    and their gradients too; NaN propagates."""
    magnitudes = torch.cat(
        [torch.zeros(1), torch.logspace(-300, 300, 601, dtype=torch.float64), torch.tensor([float("inf")])]
    )
    a_s = torch.cat([magnitudes, -magnitudes, torch.tensor([float("nan")])]).view(1, -1, 1, 1).to(DEVICE)
    a = torch.cat([a_s, torch.randn_like(a_s)], dim=1)
    x = torch.randn(1, a_s.shape[1], 1, 1, dtype=torch.float64, device=DEVICE)
    kwargs = dict(clamp=CLAMP, clamp_form=clamp_form, reverse=reverse)
    y, _ = cpp.affine_coupling(x, a, **kwargs)
    y_ref, _ = ref.affine_coupling(x, a, **kwargs)
    finite = torch.isfinite(y_ref)
    assert finite.sum() == a_s.numel() - 1, "only the NaN input may give a non-finite output"
    torch.testing.assert_close(y[finite], y_ref[finite], rtol=1e-14, atol=1e-13)  # atol: x e^s + t may cancel
    assert torch.isnan(y[~finite]).all(), "NaN in the subnet output must propagate"
    ok = torch.isfinite(a).all(dim=1, keepdim=True).expand_as(a).clone()
    a_ok = torch.where(ok, a, torch.zeros_like(a)).requires_grad_()
    x_ok = x.clone().requires_grad_()
    gy = torch.randn_like(x)
    grads = torch.autograd.grad(cpp.affine_coupling(x_ok, a_ok, **kwargs)[0], (x_ok, a_ok), gy)
    grads_ref = torch.autograd.grad(ref.affine_coupling(x_ok, a_ok, **kwargs)[0], (x_ok, a_ok), gy)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("layout", ["non_contiguous", "channels_last"])
def test_strided_inputs_through_public_ops(layout):
    b, c, h, w = 3, 7, 7, 9
    active = c // 2

    def make(channels):
        if layout == "channels_last":
            return torch.randn(b, channels, h, w, device=DEVICE).to(memory_format=torch.channels_last)
        return torch.randn(b, channels, h, w + 4, device=DEVICE)[..., 2 : 2 + w]

    x, a_full, a_half = make(c), make(2 * c), make(2 * active)
    gamma, offset = _gamma(c, "SOFTPLUS", torch.float32), 0.5 * torch.randn(1, c, 1, 1, device=DEVICE)
    perm = torch.randperm(c, device=DEVICE)
    assert not x.is_contiguous()
    pairs = [
        (
            ops.affine_coupling(x, a_full, clamp=CLAMP, reverse=True, backend="cpp"),
            ref.affine_coupling(x, a_full, clamp=CLAMP, reverse=True),
        ),
        (
            ops.global_affine_permute(x, gamma, offset, perm, backend="cpp"),
            ref.global_affine_permute(x, gamma, offset, perm),
        ),
        (
            ops.coupling_affine_permute(x, a_half, gamma, offset, perm, clamp=CLAMP, backend="cpp"),
            ref.coupling_affine_permute(x, a_half, gamma, offset, perm, clamp=CLAMP),
        ),
    ]
    for (y, logdet), (y_ref, logdet_ref) in pairs:
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logdet, logdet_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes_compute_in_float32(dtype):
    shape = (3, 7, 7, 9)
    x, a, gamma, offset, perm = _block_inputs(shape, 3, torch.float64)
    kwargs = dict(clamp=CLAMP, clamp_form="tanh", affine_type="SOFTPLUS")
    _compare(
        "coupling_affine_permute",
        lambda x, a, g, o: cpp.coupling_affine_permute(x, a, g, o, perm, **kwargs),
        lambda x, a, g, o: ref.coupling_affine_permute(x, a, g, o, perm, **kwargs),
        [x, a, gamma, offset],
        dtype,
        in_names=("x", "a", "global_scale", "global_offset"),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "op", ["global_affine_permute_fwd", "global_affine_permute_inv", "coupling_affine_permute_fwd"]
)
def test_half_inputs_read_float32_parameters(op, dtype):
    """At the torch.ops level the parameters of half x are float32 [C] tensors read as they are:
    the log-det equals the float64 value from those parameters (a rounded gamma = 9.9865 is off by
    nats) and the parameter gradients are float32."""
    b, c, h, w = 2, 64, 9, 11
    x = torch.randn(b, c, h, w, device=DEVICE).to(dtype)
    a = (4.0 * torch.randn(b, 2 * (c // 2), h, w, device=DEVICE)).to(dtype)
    gamma = (9.9865 + 1e-3 * torch.randn(c, dtype=torch.float64, device=DEVICE)).float()
    offset = (0.3 + 0.1 * torch.randn(c, dtype=torch.float64, device=DEVICE)).float()
    perm = torch.randperm(c, device=DEVICE)
    leaves = [gamma.clone().requires_grad_(), offset.clone().requires_grad_()]
    exact_leaves = [gamma.double().requires_grad_(), offset.double().requires_grad_()]
    if op == "coupling_affine_permute_fwd":
        y, logdet = msops.coupling_affine_permute_fwd(x, a, *leaves, perm, CLAMP, "tanh", "SOFTPLUS")
        y_exact, logdet_exact = ref.coupling_affine_permute(x.double(), a.double(), *exact_leaves, perm, clamp=CLAMP)
    else:
        reverse = op.endswith("inv")
        y, logdet = getattr(msops, op)(x, *leaves, perm, "SOFTPLUS")
        y_exact, logdet_exact = ref.global_affine_permute(x.double(), *exact_leaves, perm, reverse=reverse)
    assert y.dtype == dtype and logdet.dtype == torch.float32
    err = (logdet.double() - logdet_exact).abs().max().item()
    assert err <= 2e-6 * c * h * w, f"logdet: max error {err:.3e} nats"
    gy, gl = torch.randn_like(y), torch.randn(b, device=DEVICE)
    grads = torch.autograd.grad((y, logdet), leaves, (gy, gl))
    grads_exact = torch.autograd.grad((y_exact, logdet_exact), exact_leaves, (gy.double(), gl.double()))
    for g, g_exact in zip(grads, grads_exact):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), g_exact, rtol=0, atol=1e-4 * g_exact.abs().max().item())


def test_round_trips_are_exact_inverses():
    x, a, gamma, offset, perm = _block_inputs((3, 7, 13, 17), 7, torch.float64)
    y, logdet = cpp.affine_coupling(x, a, clamp=CLAMP)
    x_back, logdet_back = cpp.affine_coupling(y, a, clamp=CLAMP, reverse=True)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet + logdet_back, torch.zeros_like(logdet), rtol=0, atol=1e-10)
    y, logdet = cpp.global_affine_permute(x, gamma, offset, perm)
    x_back, logdet_back = cpp.global_affine_permute(y, gamma, offset, perm, reverse=True)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet + logdet_back, torch.zeros_like(logdet), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# small planes (H * W < 64: fibers [B, C, 1, 1] as in CFlow, small maps): the tiled kernels



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_small_planes_half_dtypes_compute_in_float32(dtype):
    x, a, gamma, offset, perm = _block_inputs((64, 33, 1, 1), 16, torch.float64)
    _compare(
        "coupling_affine_permute",
        lambda x, a, g, o: cpp.coupling_affine_permute(x, a, g, o, perm, clamp=CLAMP),
        lambda x, a, g, o: ref.coupling_affine_permute(x, a, g, o, perm, clamp=CLAMP),
        [x, a, gamma, offset],
        dtype,
        in_names=("x", "a", "global_scale", "global_offset"),
    )


@pytest.mark.parametrize("shape", [(3, 7, 1, 1), (2, 5, 2, 2)], ids=["B3-C7-1x1", "B2-C5-2x2"])
def test_small_planes_gradcheck(shape):
    b, c, h, w = shape
    x, a, gamma, offset, perm = _block_inputs(shape, c // 2, torch.float64)
    a_full = 4.0 * torch.randn(b, 2 * c, h, w, dtype=torch.float64, device=DEVICE)
    for reverse in (False, True):
        assert torch.autograd.gradcheck(
            lambda x, a: cpp.affine_coupling(x, a, clamp=CLAMP, reverse=reverse),
            (x.clone().requires_grad_(), a_full.clone().requires_grad_()),
        )
        assert torch.autograd.gradcheck(
            lambda x, g, o: cpp.global_affine_permute(x, g, o, perm, reverse=reverse),
            tuple(t.clone().requires_grad_() for t in (x, gamma, offset)),
        )
    assert torch.autograd.gradcheck(
        lambda x, a, g, o: cpp.coupling_affine_permute(x, a, g, o, perm, clamp=CLAMP),
        tuple(t.clone().requires_grad_() for t in (x, a, gamma, offset)),
    )


@pytest.mark.parametrize("shape", [(2, 6, 0, 3), (0, 6, 1, 1)], ids=["no-pixels", "no-samples"])
def test_empty_planes_and_batches(shape):
    x, a, gamma, offset, perm = _block_inputs(shape, shape[1] // 2, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, a, gamma, offset)]
    y, logdet = cpp.coupling_affine_permute(*leaves[:2], *leaves[2:], perm, clamp=CLAMP)
    y_ref, logdet_ref = ref.coupling_affine_permute(x, a, gamma, offset, perm, clamp=CLAMP)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(logdet, logdet_ref)
    grads = torch.autograd.grad((y.sum() + logdet.sum()), leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU thread count")
@pytest.mark.parametrize("shape", [(300, 64, 1, 1), (2, 4099, 2, 2)], ids=["sample-blocks", "channel-ranges"])
def test_small_planes_results_do_not_depend_on_the_thread_count(shape):
    x, a, gamma, offset, perm = _block_inputs(shape, shape[1] // 2, torch.float32)
    passive = shape[1] - shape[1] // 2

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, a, gamma, offset)]
        y, logdet = cpp.coupling_affine_permute(*leaves[:2], *leaves[2:], perm, clamp=CLAMP)
        z, logdet_z = cpp.global_affine_permute(y, *leaves[2:], perm, reverse=True)
        w, logdet_w = cpp.affine_coupling(z[:, passive:], leaves[1], clamp=CLAMP, reverse=True)
        loss = (y * y).sum() + (w * w).sum() + (logdet + logdet_z + logdet_w).sum()
        return [y, logdet, z, w, *torch.autograd.grad(loss, leaves)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        many = run()
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(many, one):
        assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("clamp_form", ref.CLAMP_FORMS)
def test_affine_coupling_gradcheck(clamp_form, reverse):
    x, a, *_ = _block_inputs((2, 3, 3, 4), 3, torch.float64)

    def fn(x, a):
        return cpp.affine_coupling(x, a, clamp=CLAMP, clamp_form=clamp_form, reverse=reverse)

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), a.requires_grad_()))


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("affine_type", ref.AFFINE_TYPES)
def test_global_affine_permute_gradcheck(affine_type, reverse):
    x, _, gamma, offset, perm = _block_inputs((2, 5, 3, 4), 1, torch.float64, affine_type)

    def fn(x, g, o):
        return cpp.global_affine_permute(x, g, o, perm, affine_type=affine_type, reverse=reverse)

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), gamma.requires_grad_(), offset.requires_grad_()))


@pytest.mark.parametrize("clamp_form", ref.CLAMP_FORMS)
@pytest.mark.parametrize("affine_type", ref.AFFINE_TYPES)
def test_coupling_affine_permute_gradcheck(clamp_form, affine_type):
    x, a, gamma, offset, perm = _block_inputs((2, 5, 3, 4), 2, torch.float64, affine_type)

    def fn(x, a, g, o):
        return cpp.coupling_affine_permute(
            x, a, g, o, perm, clamp=CLAMP, clamp_form=clamp_form, affine_type=affine_type
        )

    inputs = tuple(t.requires_grad_() for t in (x, a, gamma, offset))
    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck on every op


def _op_cases(dtype):
    b, c, h, w = 2, 5, 3, 4
    active = c // 2
    x, a, gamma, offset, perm = _block_inputs((b, c, h, w), active, dtype)
    a_full = (4.0 * torch.randn(b, 2 * c, h, w, dtype=torch.float64, device=DEVICE)).to(dtype)
    # parameters, log-dets and their gradients in the accumulation dtype (float32 for half x)
    acc = ref.compute_dtype(dtype)
    gamma, offset = gamma.reshape(c).to(acc), offset.reshape(c).to(acc)
    gy, gl = torch.randn_like(x), torch.randn(b, dtype=acc, device=DEVICE)

    def rg(t):
        return t.clone().requires_grad_(True)

    cases = []
    for form in ref.CLAMP_FORMS:
        cases += [
            (f"affine_coupling_fwd-{form}", msops.affine_coupling_fwd, (rg(x), rg(a_full), CLAMP, form)),
            (f"affine_coupling_inv-{form}", msops.affine_coupling_inv, (rg(x), rg(a_full), CLAMP, form)),
            (f"affine_coupling_bwd-{form}", msops.affine_coupling_bwd, (gy, gl, x, a_full, CLAMP, form, True)),
        ]
    for kind in ref.AFFINE_TYPES:
        cases += [
            (
                f"global_affine_permute_fwd-{kind}",
                msops.global_affine_permute_fwd,
                (rg(x), rg(gamma), rg(offset), perm, kind),
            ),
            (
                f"global_affine_permute_inv-{kind}",
                msops.global_affine_permute_inv,
                (rg(x), rg(gamma), rg(offset), perm, kind),
            ),
            (
                f"global_affine_permute_bwd-{kind}",
                msops.global_affine_permute_bwd,
                (gy, gl, x, gamma, offset, perm, kind, False),
            ),
        ]
    cases += [
        (
            "coupling_affine_permute_fwd",
            msops.coupling_affine_permute_fwd,
            (rg(x), rg(a), rg(gamma), rg(offset), perm, CLAMP, "atan", "SIGMOID"),
        ),
        (
            "coupling_affine_permute_bwd",
            msops.coupling_affine_permute_bwd,
            (gy, gl, x, a, gamma, perm, CLAMP, "tanh_scaled", "EXP"),
        ),
    ]
    return cases


_OPCHECK_NAMES = [name for name, _, _ in _op_cases(torch.float64)]


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", _OPCHECK_NAMES)
def test_opcheck(case, dtype):
    name, op, args = next(c for c in _op_cases(dtype) if c[0] == case)
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_torch_compile_fullgraph_block_tail():
    b, c, h, w = 2, 6, 5, 7
    x, a, gamma, offset, perm = _block_inputs((b, c, h, w), c // 2, torch.float32)

    def step(x, a, gamma, offset):
        y, logdet = ops.coupling_affine_permute(x, a, gamma, offset, perm, clamp=CLAMP, backend="cpp")
        z, logdet_back = ops.affine_coupling(y[:, : c // 2], a, clamp=CLAMP, reverse=True, backend="cpp")
        return (0.5 * z.square().sum((1, 2, 3)) - logdet - logdet_back).mean()

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    leaves = [t.clone().requires_grad_(True) for t in (x, a, gamma, offset)]
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager_leaves = [t.clone().requires_grad_(True) for t in (x, a, gamma, offset)]
    eager_loss = step(*eager_leaves)
    eager_grads = torch.autograd.grad(eager_loss, eager_leaves)
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


# ---------------------------------------------------------------------------------------------
# C++-level argument checks (torch.ops called directly)


def _bad_calls():
    b, c, h, w = 2, 4, 3, 3
    x = torch.randn(b, c, h, w, device=DEVICE)
    a = torch.randn(b, 2 * c, h, w, device=DEVICE)
    a_half = torch.randn(b, c, h, w, device=DEVICE)
    g, o = torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE)
    perm = torch.randperm(c, device=DEVICE)
    gy, gl = torch.randn_like(x), torch.randn(b, device=DEVICE)
    return [
        ("x must be 4-D", msops.affine_coupling_fwd, (x[0], a, CLAMP, "tanh")),
        ("x must be contiguous", msops.affine_coupling_fwd, (x.transpose(2, 3), a, CLAMP, "tanh")),
        ("x must be floating", msops.affine_coupling_fwd, (x.long(), a, CLAMP, "tanh")),
        ("a must have shape", msops.affine_coupling_fwd, (x, a_half, CLAMP, "tanh")),
        ("a has dtype", msops.affine_coupling_inv, (x, a.double(), CLAMP, "tanh")),
        ("a must be contiguous", msops.affine_coupling_inv, (x, a.transpose(2, 3), CLAMP, "tanh")),
        ("clamp must be", msops.affine_coupling_fwd, (x, a, -1.0, "tanh")),
        ("clamp_form must be one of", msops.affine_coupling_fwd, (x, a, CLAMP, "sigmoid")),
        ("grad_y must have the shape", msops.affine_coupling_bwd, (gy[:1], gl, x, a, CLAMP, "tanh", False)),
        ("grad_logdet must have shape", msops.affine_coupling_bwd, (gy, gl[:1], x, a, CLAMP, "tanh", False)),
        ("global_scale must have shape", msops.global_affine_permute_fwd, (x, g[:2], o, perm, "SOFTPLUS")),
        ("global_offset has dtype", msops.global_affine_permute_fwd, (x, g, o.double(), perm, "SOFTPLUS")),
        (  # parameters of half x are float32 at this level (the Python functions convert them)
            "global_scale has dtype Half but must have Float",
            msops.global_affine_permute_fwd,
            (x.half(), g.half(), o, perm, "SOFTPLUS"),
        ),
        (
            "grad_logdet has dtype BFloat16 but must have Float",
            msops.affine_coupling_bwd,
            (gy.bfloat16(), gl.bfloat16(), x.bfloat16(), a.bfloat16(), CLAMP, "tanh", False),
        ),
        ("perm must have dtype int64", msops.global_affine_permute_inv, (x, g, o, perm.int(), "SOFTPLUS")),
        ("perm must have shape", msops.global_affine_permute_inv, (x, g, o, perm[:2], "SOFTPLUS")),
        ("affine_type must be one of", msops.global_affine_permute_fwd, (x, g, o, perm, "softplus")),
        (
            "grad_y has dtype",
            msops.global_affine_permute_bwd,
            (gy.double(), gl, x, g, o, perm, "SOFTPLUS", False),
        ),
        (
            "at least 2 channels",
            msops.coupling_affine_permute_fwd,
            (x[:, :1].contiguous(), a[:, :0].contiguous(), g[:1], o[:1], perm[:1], CLAMP, "tanh", "EXP"),
        ),
        ("a must have shape", msops.coupling_affine_permute_fwd, (x, a, g, o, perm, CLAMP, "tanh", "EXP")),
        (
            "global_scale must have shape",
            msops.coupling_affine_permute_bwd,
            (gy, gl, x, a_half, g[:3], perm, CLAMP, "tanh", "EXP"),
        ),
    ] + (
        [  # permutation values are only checked on CPU (on CUDA the check would synchronise)
            (
                "perm must be a permutation",
                msops.global_affine_permute_fwd,
                (x, g, o, torch.tensor([0, 1, 1, 3]), "EXP"),
            ),
            (
                "perm must be a permutation",
                msops.coupling_affine_permute_fwd,
                (x, a_half, g, o, torch.tensor([0, 1, 2, 4]), CLAMP, "tanh", "EXP"),
            ),
        ]
        if DEVICE.type == "cpu"
        else []
    )


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_cpp_checks_name_the_argument(index):
    message, op, args = _bad_calls()[index]
    with pytest.raises(RuntimeError, match=message):
        op(*args)
