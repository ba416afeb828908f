"""Likelihood and anomaly-map ops: every fused backend against ops.reference."""

from __future__ import annotations

import pytest
import torch

from msflow_fast import ops
from msflow_fast.ops import reference

from conftest import DEVICE, fused_backends
from helpers import assert_close_to_reference

HEAD_OPS = ("gaussian_nll", "log_likelihood_map", "aggregate_anomaly_maps", "log_space_score", "fastflow_anomaly_map")


def _backends(op: str) -> list[str]:
    return fused_backends(DEVICE, op)


def _all_backends() -> list[str]:
    return sorted({b for op in HEAD_OPS for b in _backends(op)})


def _random_maps(batch: int, sizes, dtype=torch.float64, spread: float = 4.0) -> list[torch.Tensor]:
    return [-(spread * torch.rand(batch, h, w, dtype=dtype, device=DEVICE)) - 0.1 for h, w in sizes]


def test_every_head_op_has_a_fused_backend_here():
    for op in HEAD_OPS:
        assert "cpp" in _backends(op) or "triton" in _backends(op), f"{op}: no fused backend on {DEVICE}"


# --------------------------------------------------------------------------------------------- NLL


@pytest.mark.parametrize("backend", _backends("gaussian_nll"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (3, 7, 7, 9), (3, 64, 13, 17), (2, 5)], ids=str)
def test_gaussian_nll_matches_reference(backend, dtype, shape):
    z = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    logdet = 10 * torch.randn(shape[0], dtype=torch.float64, device=DEVICE)
    zt, lt = z.to(dtype).requires_grad_(), logdet.to(dtype).requires_grad_()
    nll = ops.gaussian_nll(zt, lt, backend=backend)
    eager = reference.gaussian_nll(z.to(dtype), logdet.to(dtype))
    assert nll.dtype == eager.dtype and nll.shape == (shape[0],)
    assert_close_to_reference("nll", nll.detach(), eager, reference.gaussian_nll(z, logdet))
    g = torch.randn(shape[0], dtype=dtype, device=DEVICE)
    gz, gl = torch.autograd.grad(nll, (zt, lt), g)
    torch.testing.assert_close(gz, g.view(-1, *[1] * (z.dim() - 1)) * z.to(dtype))
    torch.testing.assert_close(gl, -g)


@pytest.mark.parametrize("backend", _backends("gaussian_nll"))
def test_gaussian_nll_non_contiguous_and_channels_last(backend):
    z = torch.randn(3, 7, 9, 5, dtype=torch.float64, device=DEVICE)
    logdet = torch.randn(3, dtype=torch.float64, device=DEVICE)
    for zz in (z.transpose(1, 3), z.to(memory_format=torch.channels_last)):
        torch.testing.assert_close(ops.gaussian_nll(zz, logdet, backend=backend), reference.gaussian_nll(zz, logdet))


@pytest.mark.parametrize("backend", _backends("gaussian_nll"))
def test_gaussian_nll_half_accumulates_in_float32(backend):
    z = torch.randn(2, 3, 5, 5, device=DEVICE)
    logdet = torch.randn(2, device=DEVICE)
    out = ops.gaussian_nll(z.half(), logdet.half(), backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.gaussian_nll(z.half(), logdet.half()), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", _backends("gaussian_nll"))
def test_gaussian_nll_of_an_empty_latent_is_minus_logdet(backend):
    z = torch.randn(3, 0, 4, 5, dtype=torch.float64, device=DEVICE)
    logdet = torch.randn(3, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(ops.gaussian_nll(z, logdet, backend=backend), -logdet)


@pytest.mark.parametrize("backend", _backends("gaussian_nll"))
def test_gaussian_nll_gradcheck(backend):
    z = torch.randn(2, 3, 2, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    logdet = torch.randn(2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.gaussian_nll(a, b, backend=backend), (z, logdet))


# ------------------------------------------------------------------------------- log-likelihood map


@pytest.mark.parametrize("backend", _backends("log_likelihood_map"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (3, 3, 7, 9), (1, 64, 13, 17), (3, 7, 13, 17)], ids=str)
def test_log_likelihood_map_matches_reference(backend, dtype, shape):
    z = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    zt = z.to(dtype).requires_grad_()
    out = ops.log_likelihood_map(zt, backend=backend)
    eager = reference.log_likelihood_map(z.to(dtype))
    assert out.dtype == eager.dtype
    assert_close_to_reference("logp map", out.detach(), eager, reference.log_likelihood_map(z))
    g = torch.randn(out.shape, dtype=dtype, device=DEVICE)
    (gz,) = torch.autograd.grad(out, zt, g)
    zr = z.to(dtype).requires_grad_()
    (gr,) = torch.autograd.grad(reference.log_likelihood_map(zr), zr, g)
    torch.testing.assert_close(gz, gr)


@pytest.mark.parametrize("backend", _backends("log_likelihood_map"))
def test_log_likelihood_map_non_contiguous_and_gradcheck(backend):
    z = torch.randn(2, 9, 7, 3, dtype=torch.float64, device=DEVICE).permute(0, 3, 2, 1)
    torch.testing.assert_close(ops.log_likelihood_map(z, backend=backend), reference.log_likelihood_map(z))
    zc = torch.randn(2, 3, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ops.log_likelihood_map(a, backend=backend), (zc,))


# ------------------------------------------------------------------------------------ aggregation

SCALE_SETS = {
    "one_7x9": [(7, 9)],
    "two_7x9_13x17": [(13, 17), (7, 9)],
    "three": [(16, 16), (8, 8), (4, 4)],
    "four_1x1": [(13, 17), (7, 9), (3, 5), (1, 1)],
}


@pytest.mark.parametrize("backend", _backends("aggregate_anomaly_maps"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("scales", list(SCALE_SETS), ids=str)
@pytest.mark.parametrize("output_size,top_k", [((29, 31), 0.03), ((16, 16), 1.0), ((1, 1), 0.5), ((5, 40), 0.001)])
def test_aggregate_anomaly_maps_matches_reference(backend, dtype, batch, scales, output_size, top_k):
    maps = _random_maps(batch, SCALE_SETS[scales])
    out = ops.aggregate_anomaly_maps([m.to(dtype) for m in maps], output_size, top_k=top_k, backend=backend)
    eager = reference.aggregate_anomaly_maps([m.to(dtype) for m in maps], output_size, top_k=top_k)
    exact = reference.aggregate_anomaly_maps(maps, output_size, top_k=top_k)
    for name, a, e, x in zip(("map_add", "map_mul", "score"), out, eager, exact):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_close_to_reference(name, a, e, x)
    score = ops.log_space_score([m.to(dtype) for m in maps], output_size, top_k=top_k, backend=backend)
    assert score.dtype == dtype
    assert_close_to_reference(
        "log_space_score",
        score,
        reference.log_space_score([m.to(dtype) for m in maps], output_size, top_k=top_k),
        reference.log_space_score(maps, output_size, top_k=top_k),
    )


@pytest.mark.parametrize("backend", ["reference", *_backends("aggregate_anomaly_maps")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("output_size,top_k", [((29, 31), 0.03), ((1, 1), 0.5), ((5, 40), 1.0)])
def test_one_aggregation_pass_gives_both_scores(backend, dtype, output_size, top_k):
    """``log_space_score=True``: the same maps and official score, and the log-space score bit for
    bit equal to the separate op (the same upsampled sums, the same selection), on every backend."""
    maps = [m.to(dtype) for m in _random_maps(3, SCALE_SETS[list(SCALE_SETS)[-1]], spread=30.0)]
    add, mul, score, log_score = ops.aggregate_anomaly_maps(maps, output_size, top_k=top_k, log_space_score=True, backend=backend)
    add3, mul3, score3 = ops.aggregate_anomaly_maps(maps, output_size, top_k=top_k, backend=backend)
    assert torch.equal(add, add3) and torch.equal(mul, mul3) and torch.equal(score, score3)
    separate = ops.log_space_score(maps, output_size, top_k=top_k, backend=backend)
    assert log_score.dtype == separate.dtype == dtype and torch.equal(log_score, separate)
    with pytest.raises(TypeError, match="log_space_score must be a bool"):
        ops.aggregate_anomaly_maps(maps, output_size, log_space_score=1, backend=backend)


@pytest.mark.parametrize("backend", _backends("aggregate_anomaly_maps"))
def test_one_aggregation_pass_gradients_are_the_reference(backend):
    maps = [m.requires_grad_() for m in _random_maps(2, [(4, 5), (2, 3)])]
    outs = ops.aggregate_anomaly_maps(maps, (7, 9), top_k=0.2, log_space_score=True, backend=backend)
    grads = torch.autograd.grad(outs[0].sum() + outs[2].sum() + outs[3].sum(), maps)
    ref_maps = [m.detach().requires_grad_() for m in maps]
    ref = reference.aggregate_anomaly_maps(ref_maps, (7, 9), top_k=0.2, log_space_score=True)
    ref_grads = torch.autograd.grad(ref[0].sum() + ref[2].sum() + ref[3].sum(), ref_maps)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend", ["reference", *_backends("aggregate_anomaly_maps")])
@pytest.mark.parametrize("dtype,bits", [(torch.float32, 25), (torch.float64, 54)], ids=["float32", "float64"])
def test_official_score_saturates_at_the_documented_gaps(backend, dtype, bits):
    """The "mul" map (and so the official score) is exactly 1.0 from a gap of bits * ln 2 nats:
    17.33 in float32, 37.43 in float64; the log-space score still tells the images apart."""
    import math

    edge = bits * math.log(2.0)
    maps = []
    for gap in (edge - 0.1, edge + 0.1):  # one image per gap: its other pixels are the most likely (L = 0)
        image = torch.zeros(1, 4, 4, dtype=dtype, device=DEVICE)
        image[0, 0, 0] = -gap
        maps.append(image)
    maps = [torch.cat(maps)]
    _, mul, score, log_score = ops.aggregate_anomaly_maps(maps, (4, 4), top_k=1 / 16, log_space_score=True, backend=backend)
    assert mul[0, 0, 0] < 1.0 and mul[1, 0, 0] == 1.0, (backend, mul[:, 0, 0])
    assert score[0] < 1.0 and score[1] == 1.0
    torch.testing.assert_close(log_score, torch.tensor([edge - 0.1, edge + 0.1], dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("backend", _all_backends())
@pytest.mark.parametrize("top_k", [1e-9, 0.03, 0.5, 1.0], ids=str)
def test_top_k_with_ties(backend, top_k):
    # Constant regions and repeated values: many equal pixels straddle the k-th value.
    coarse = torch.randint(0, 3, (3, 4, 5), device=DEVICE).double() * -2.0
    coarse[1] = -1.0  # a constant image: every pixel ties
    fine = torch.randint(0, 2, (3, 7, 9), device=DEVICE).double() * -1.0
    maps = [coarse, fine]
    for size in ((13, 16), (4, 5)):
        _, map_mul, score = ops.aggregate_anomaly_maps(maps, size, top_k=top_k, backend=backend)
        _, ref_mul, ref_score = reference.aggregate_anomaly_maps(maps, size, top_k=top_k)
        torch.testing.assert_close(map_mul, ref_mul)
        torch.testing.assert_close(score, ref_score)
        torch.testing.assert_close(
            ops.log_space_score(maps, size, top_k=top_k, backend=backend),
            reference.log_space_score(maps, size, top_k=top_k),
        )
        k = reference.top_k_count(size[0] * size[1], top_k)
        manual = torch.sort(ref_mul.flatten(1), dim=1, descending=True).values[:, :k].mean(dim=1)
        torch.testing.assert_close(score, manual)


@pytest.mark.parametrize("backend", _all_backends())
def test_aggregate_large_log_likelihood_gaps(backend):
    # Gaps of hundreds of nats: the official map saturates at 1, the log-space score does not.
    maps = [-300.0 * torch.rand(2, 7, 9, dtype=torch.float64, device=DEVICE), torch.zeros(2, 4, 4, dtype=torch.float64)]
    maps[1] = maps[1].to(DEVICE) - 1.0
    for a, r in zip(
        ops.aggregate_anomaly_maps(maps, (11, 12), top_k=0.1, backend=backend),
        reference.aggregate_anomaly_maps(maps, (11, 12), top_k=0.1),
    ):
        torch.testing.assert_close(a, r)
    torch.testing.assert_close(
        ops.log_space_score(maps, (11, 12), top_k=0.1, backend=backend),
        reference.log_space_score(maps, (11, 12), top_k=0.1),
    )


@pytest.mark.parametrize("backend", _all_backends())
def test_aggregate_more_scales_than_one_kernel_call(backend):
    maps = _random_maps(2, [(3, 4), (5, 6), (7, 9), (2, 2), (4, 3)])
    for a, r in zip(
        ops.aggregate_anomaly_maps(maps, (9, 11), top_k=0.2, backend=backend),
        reference.aggregate_anomaly_maps(maps, (9, 11), top_k=0.2),
    ):
        torch.testing.assert_close(a, r)
    torch.testing.assert_close(
        ops.log_space_score(maps, (9, 11), top_k=0.2, backend=backend), reference.log_space_score(maps, (9, 11), top_k=0.2)
    )


@pytest.mark.parametrize("backend", _all_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_aggregate_half_inputs(backend, dtype):
    maps = _random_maps(2, [(7, 9), (4, 5)], spread=2.0)
    out = ops.aggregate_anomaly_maps([m.to(dtype) for m in maps], (13, 11), top_k=0.1, backend=backend)
    exact = reference.aggregate_anomaly_maps([m.to(dtype).double() for m in maps], (13, 11), top_k=0.1)
    for a, x in zip(out, exact):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), x, rtol=0, atol=2e-2)
    score = ops.log_space_score([m.to(dtype) for m in maps], (13, 11), top_k=0.1, backend=backend)
    exact_score = reference.log_space_score([m.to(dtype).double() for m in maps], (13, 11), top_k=0.1)
    assert score.dtype == dtype
    torch.testing.assert_close(score.double(), exact_score, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", _all_backends())
def test_aggregate_non_contiguous_maps(backend):
    maps = [m.transpose(1, 2) for m in _random_maps(2, [(9, 7), (17, 13)])]
    for a, r in zip(
        ops.aggregate_anomaly_maps(maps, (29, 31), backend=backend), reference.aggregate_anomaly_maps(maps, (29, 31))
    ):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("backend", ["reference", *_all_backends()])
@pytest.mark.parametrize("where", ["coarse", "fine"])
def test_a_nan_in_an_image_makes_its_score_nan(backend, where):
    """A diverged model must not look healthy: the image with a NaN pixel scores NaN, the others do not."""
    maps = _random_maps(3, [(7, 9), (4, 5)])
    maps[0 if where == "fine" else 1][1, 2, 3] = float("nan")
    _, _, score = ops.aggregate_anomaly_maps(maps, (13, 11), top_k=0.05, backend=backend)
    log_score = ops.log_space_score(maps, (13, 11), top_k=0.05, backend=backend)
    clean = [m[[0, 2]] for m in maps]
    for name, s, expected in (
        ("score", score, reference.aggregate_anomaly_maps(clean, (13, 11), top_k=0.05)[2]),
        ("log_space_score", log_score, reference.log_space_score(clean, (13, 11), top_k=0.05)),
    ):
        assert s[1].isnan(), f"{name}: the image with a NaN scored {s[1].item()}"
        torch.testing.assert_close(s[[0, 2]], expected)


@pytest.mark.parametrize("backend", ["reference", *_all_backends()])
@pytest.mark.parametrize("op", ["aggregate_anomaly_maps", "log_space_score"])
def test_map_aggregation_gradients_are_the_reference_ones(op, backend):
    """Every backend is differentiable: fused forward, gradients of the reference maths (float64 gradcheck)."""
    maps = [m.requires_grad_() for m in _random_maps(2, [(7, 9), (4, 5)])]

    def weighted(*ms):
        out = getattr(ops, op)(list(ms), (13, 11), top_k=0.1, backend=backend)
        outs = out if isinstance(out, tuple) else (out,)
        return sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum() for o in outs)

    grads = torch.autograd.grad(weighted(*maps), maps)
    with ops.use_backend("reference"):
        expected = torch.autograd.grad(weighted(*maps), maps)
    for g, e in zip(grads, expected):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    small = [m.requires_grad_() for m in _random_maps(1, [(3, 4), (2, 3)])]
    assert torch.autograd.gradcheck(lambda *ms: getattr(ops, op)(list(ms), (4, 5), top_k=0.2, backend=backend), small)
    with torch.no_grad():
        out = getattr(ops, op)(maps, (13, 11), backend=backend)
    assert not any(o.requires_grad for o in (out if isinstance(out, tuple) else (out,)))


# ----------------------------------------------------------------------------------- C++ op checks


def _cpp_available() -> bool:
    return "cpp" in _backends("aggregate_anomaly_maps")


@pytest.mark.skipif(not _cpp_available(), reason="msflow_fast._C is not built")
def test_opcheck_cpp_head_ops():
    import msflow_fast.ops._cpp_head  # noqa: F401  (registers fake kernels and autograd)

    o = torch.ops.msflow_fast
    z = torch.randn(2, 3, 5, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    logdet = torch.randn(2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    maps = _random_maps(2, [(7, 9), (4, 5)])
    torch.library.opcheck(o.gaussian_nll_fwd, (z, logdet))
    torch.library.opcheck(o.gaussian_nll_bwd, (torch.randn(2, dtype=torch.float64, device=DEVICE), z.detach()))
    torch.library.opcheck(o.log_likelihood_map_fwd, (z,))
    torch.library.opcheck(
        o.log_likelihood_map_bwd, (torch.randn(2, 5, 7, dtype=torch.float64, device=DEVICE), z.detach())
    )
    torch.library.opcheck(o.aggregate_anomaly_maps_fwd, (maps, [11, 13], 0.1))
    torch.library.opcheck(o.aggregate_anomaly_maps_fwd, (maps, [11, 13], 0.1, True))
    torch.library.opcheck(o.log_space_score_fwd, (maps, [11, 13], 0.1))


@pytest.mark.skipif(not _cpp_available(), reason="msflow_fast._C is not built")
def test_cpp_ops_recheck_their_inputs():
    o = torch.ops.msflow_fast
    maps = _random_maps(2, [(7, 9)])
    with pytest.raises(RuntimeError, match="top_k"):
        o.aggregate_anomaly_maps_fwd(maps, [5, 5], 0.0)
    with pytest.raises(RuntimeError, match="batch"):
        o.log_space_score_fwd([maps[0], maps[0][:1]], [5, 5], 0.5)
    with pytest.raises(RuntimeError, match="empty"):
        o.aggregate_anomaly_maps_fwd([], [5, 5], 0.5)
    with pytest.raises(RuntimeError, match="logdet"):
        o.gaussian_nll_fwd(torch.randn(2, 3), torch.randn(3))


@pytest.mark.skipif(not _cpp_available(), reason="msflow_fast._C is not built")
def test_cpp_head_ops_under_torch_compile():
    maps = _random_maps(2, [(7, 9), (4, 5)])

    @torch.compile(fullgraph=True, backend="eager")
    def head(a, b):
        return (
            ops.aggregate_anomaly_maps([a, b], (11, 13), top_k=0.1, backend="cpp"),
            ops.log_space_score([a, b], (11, 13), backend="cpp"),
        )

    (map_add, map_mul, score), log_score = head(*maps)
    for x, r in zip((map_add, map_mul, score), reference.aggregate_anomaly_maps(maps, (11, 13), top_k=0.1)):
        torch.testing.assert_close(x, r)
    torch.testing.assert_close(log_score, reference.log_space_score(maps, (11, 13)))


# ------------------------------------------------------------------------------------- bad inputs

BAD_AGGREGATE_INPUTS = [
    ("mismatched batch", lambda m: ([m[0], m[1][:1]], (5, 5), 0.1), ValueError, "batch"),
    ("top_k zero", lambda m: (m, (5, 5), 0.0), ValueError, "top_k"),
    ("top_k above one", lambda m: (m, (5, 5), 1.5), ValueError, "top_k"),
    ("top_k not a number", lambda m: (m, (5, 5), "0.1"), TypeError, "top_k"),
    ("empty list", lambda m: ([], (5, 5), 0.1), ValueError, "empty"),
    ("empty map", lambda m: ([m[0][:, :0]], (5, 5), 0.1), ValueError, "empty"),
    ("tensor not list", lambda m: (m[0], (5, 5), 0.1), TypeError, "list"),
    ("2-D map", lambda m: ([m[0][0]], (5, 5), 0.1), ValueError, "3-D"),
    ("mixed dtypes", lambda m: ([m[0], m[1].float()], (5, 5), 0.1), TypeError, "dtype"),
    ("integer map", lambda m: ([m[0].long()], (5, 5), 0.1), TypeError, "floating"),
    ("bad output_size", lambda m: (m, (5,), 0.1), TypeError, "output_size"),
    ("zero output_size", lambda m: (m, (0, 5), 0.1), ValueError, "output_size"),
]


@pytest.mark.parametrize("backend", ["reference", *_all_backends()])
@pytest.mark.parametrize("op", ["aggregate_anomaly_maps", "log_space_score"])
@pytest.mark.parametrize("case", BAD_AGGREGATE_INPUTS, ids=lambda c: c[0])
def test_aggregate_bad_inputs_raise(backend, op, case):
    _, make, exc, match = case
    maps, size, top_k = make(_random_maps(2, [(7, 9), (4, 5)]))
    with pytest.raises(exc, match=match):
        getattr(ops, op)(maps, size, top_k=top_k, backend=backend)


@pytest.mark.parametrize("backend", ["reference", *_all_backends()])
def test_nll_and_map_bad_inputs_raise(backend):
    z = torch.randn(2, 3, 4, 5, device=DEVICE)
    with pytest.raises(ValueError, match="logdet"):
        ops.gaussian_nll(z, torch.randn(3, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="logdet"):
        ops.gaussian_nll(z, torch.randn(2, 1, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="z"):
        ops.gaussian_nll(z.long(), torch.randn(2, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="z"):
        ops.log_likelihood_map(z[0], backend=backend)
    with pytest.raises(TypeError, match="z"):
        ops.log_likelihood_map([z], backend=backend)


# ----------------------------------------------------------------------------------- FastFlow mode


def _fastflow(maps, size, backend, **options):
    return ops.aggregate_anomaly_maps(maps, size, mode="fastflow", backend=backend, **options)


FASTFLOW_SIZES = {
    "up_29x31": (29, 31),  # upsampling every scale, odd ratios
    "down_5x5": (5, 5),  # downsampling the larger scales (some of their cells are never tapped)
    "same_13x17": (13, 17),  # the identity for a 13x17 scale
    "one_1x1": (1, 1),
    "mixed_4x40": (4, 40),  # down along y, up along x
}


@pytest.mark.parametrize("backend", _backends("fastflow_anomaly_map"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("scales", list(SCALE_SETS), ids=str)
@pytest.mark.parametrize("size", list(FASTFLOW_SIZES), ids=str)
def test_fastflow_map_matches_reference(backend, dtype, batch, scales, size):
    output_size = FASTFLOW_SIZES[size]
    maps = _random_maps(batch, SCALE_SETS[scales])
    out = _fastflow([m.to(dtype) for m in maps], output_size, backend, log_space_score=True)
    eager = reference.fastflow_anomaly_map([m.to(dtype) for m in maps], output_size, log_space_score=True)
    exact = reference.fastflow_anomaly_map(maps, output_size, log_space_score=True)
    for name, a, e, x in zip(("anomaly_map", "score", "score_log_space"), out, eager, exact):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert_close_to_reference(name, a, e, x)
    two = _fastflow([m.to(dtype) for m in maps], output_size, backend)
    assert len(two) == 2 and torch.equal(two[0], out[0]) and torch.equal(two[1], out[1])


@pytest.mark.parametrize("backend", ["reference", *_backends("fastflow_anomaly_map")])
@pytest.mark.parametrize("log_offset", [0.0, 1.0, -2.5], ids=str)
def test_fastflow_log_offset_and_map_range(backend, log_offset):
    """DADF's map is -exp(1 + L): the offset scales the map by e^offset and shifts the log-space score."""
    maps = _random_maps(2, [(7, 9), (4, 5), (2, 3)])
    out = _fastflow(maps, (13, 11), backend, log_space_score=True, log_offset=log_offset)
    base = reference.fastflow_anomaly_map(maps, (13, 11), log_space_score=True)
    torch.testing.assert_close(out[0], base[0] * torch.exp(torch.tensor(log_offset, dtype=torch.float64)))
    torch.testing.assert_close(out[2], base[2] - log_offset)
    assert (out[0] <= 0).all() and (out[0] >= -torch.exp(torch.tensor(log_offset, dtype=torch.float64))).all()
    torch.testing.assert_close(out[2], -torch.log(-out[1]))  # -log(-v) is increasing: the same maximum


@pytest.mark.parametrize("backend", ["reference", *_backends("fastflow_anomaly_map")])
@pytest.mark.parametrize("dtype,low", [(torch.float32, -400.0), (torch.float64, -1500.0)], ids=["float32", "float64"])
def test_fastflow_official_map_underflows_and_the_log_space_score_stays_exact(backend, dtype, low):
    """Log-likelihoods far below -104 (float32) or -745 (float64): exp(L) is 0, so the official map
    and score are exactly 0 for every image; the log-space score still ranks them, exactly."""
    maps = [low + 100.0 * torch.rand(3, h, w, dtype=torch.float64, device=DEVICE) for h, w in ((7, 9), (4, 5))]
    anomaly_map, score, score_log = _fastflow([m.to(dtype) for m in maps], (13, 11), backend, log_space_score=True)
    assert (anomaly_map == 0).all() and (score == 0).all()
    exact = reference.fastflow_anomaly_map(maps, (13, 11), log_space_score=True)[2]
    torch.testing.assert_close(score_log, exact.to(dtype), rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0.0)
    assert score_log.unique().numel() == 3


@pytest.mark.parametrize("backend", _backends("fastflow_anomaly_map"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fastflow_many_scales_and_large_gaps(backend, dtype):
    """Seven scales (more than one launch of the msflow kernels takes), 1x1 to 17x13, with
    log-likelihood gaps of hundreds of nats inside an image."""
    sizes = [(17, 13), (9, 7), (1, 1), (5, 6), (3, 3), (13, 17), (2, 9)]
    maps = [-300.0 * torch.rand(2, h, w, dtype=torch.float64, device=DEVICE) for h, w in sizes]
    out = _fastflow([m.to(dtype) for m in maps], (21, 19), backend, log_space_score=True)
    eager = reference.fastflow_anomaly_map([m.to(dtype) for m in maps], (21, 19), log_space_score=True)
    exact = reference.fastflow_anomaly_map(maps, (21, 19), log_space_score=True)
    for name, a, e, x in zip(("anomaly_map", "score", "score_log_space"), out, eager, exact):
        assert_close_to_reference(name, a, e, x)


@pytest.mark.parametrize("backend", _backends("fastflow_anomaly_map"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fastflow_half_inputs(backend, dtype):
    maps = [m.to(dtype) for m in _random_maps(2, [(7, 9), (4, 5)], spread=2.0)]
    out = _fastflow(maps, (13, 11), backend, log_space_score=True)
    exact = reference.fastflow_anomaly_map([m.double() for m in maps], (13, 11), log_space_score=True)
    for a, x in zip(out, exact):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), x, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", _backends("fastflow_anomaly_map"))
def test_fastflow_non_contiguous_maps_and_repeats(backend):
    maps = [m.transpose(1, 2) for m in _random_maps(2, [(9, 7), (17, 13)])]
    out = _fastflow(maps, (29, 31), backend, log_space_score=True)
    for a, r in zip(out, reference.fastflow_anomaly_map(maps, (29, 31), log_space_score=True)):
        torch.testing.assert_close(a, r)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = _fastflow(maps, (29, 31), backend, log_space_score=True)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(out, again)), "not bit-reproducible"


@pytest.mark.parametrize("backend", ["reference", *_backends("fastflow_anomaly_map")])
@pytest.mark.parametrize("where", ["coarse", "fine"])
def test_fastflow_a_nan_in_an_image_makes_its_scores_nan(backend, where):
    maps = _random_maps(3, [(7, 9), (4, 5)])
    maps[0 if where == "fine" else 1][1, 2, 3] = float("nan")
    _, score, score_log = _fastflow(maps, (13, 11), backend, log_space_score=True)
    expected = reference.fastflow_anomaly_map([m[[0, 2]] for m in maps], (13, 11), log_space_score=True)
    for name, s, e in (("score", score, expected[1]), ("score_log_space", score_log, expected[2])):
        assert s[1].isnan(), f"{name}: the image with a NaN scored {s[1].item()}"
        torch.testing.assert_close(s[[0, 2]], e)


@pytest.mark.parametrize("backend", ["reference", *_backends("fastflow_anomaly_map")])
def test_fastflow_a_nan_that_no_output_pixel_reads_still_poisons_the_scores(backend):
    """Downsampling 13x17 to 5x5 reads only some source cells; a NaN in another one leaves every map
    pixel finite, and every backend still scores that image NaN (they scan the maps)."""
    maps = _random_maps(2, [(13, 17)])
    maps[0][0, 2, 2] = float("nan")  # rows 0-1, 3-4, 6-9, 11-12 and columns 0-1, 3-5, 6-8, ... are read
    anomaly_map, score, score_log = _fastflow(maps, (5, 5), backend, log_space_score=True)
    assert torch.isfinite(anomaly_map).all()
    assert score[0].isnan() and score_log[0].isnan()
    expected = reference.fastflow_anomaly_map(maps, (5, 5), log_space_score=True)
    torch.testing.assert_close(anomaly_map, expected[0])
    torch.testing.assert_close(score[1:], expected[1][1:])
    torch.testing.assert_close(score_log[1:], expected[2][1:])


@pytest.mark.parametrize("backend", ["reference", *_backends("fastflow_anomaly_map")])
def test_fastflow_gradients_are_the_reference_ones(backend):
    maps = [m.requires_grad_() for m in _random_maps(2, [(7, 9), (4, 5)])]

    def weighted(*ms):
        outs = _fastflow(list(ms), (13, 11), backend, log_space_score=True, log_offset=0.5)
        return sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum() for o in outs)

    grads = torch.autograd.grad(weighted(*maps), maps)
    with ops.use_backend("reference"):
        expected = torch.autograd.grad(weighted(*maps), maps)
    for g, e in zip(grads, expected):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    small = [m.requires_grad_() for m in _random_maps(1, [(3, 4), (2, 3)])]
    assert torch.autograd.gradcheck(lambda *ms: _fastflow(list(ms), (4, 5), backend, log_space_score=True), small)
    with torch.no_grad():
        out = _fastflow(maps, (13, 11), backend)
    assert not any(o.requires_grad for o in out)


@pytest.mark.parametrize("backend", ["reference", *_backends("fastflow_anomaly_map")])
@pytest.mark.parametrize("case", [c for c in BAD_AGGREGATE_INPUTS if "top_k" not in c[0]], ids=lambda c: c[0])
def test_fastflow_bad_inputs_raise(backend, case):
    _, make, exc, match = case
    maps, size, _ = make(_random_maps(2, [(7, 9), (4, 5)]))
    with pytest.raises(exc, match=match):
        _fastflow(maps, size, backend)


@pytest.mark.parametrize("backend", ["reference", *_backends("fastflow_anomaly_map")])
@pytest.mark.parametrize("log_offset", [float("nan"), float("inf"), True, "1.0", None], ids=repr)
def test_fastflow_bad_log_offset_raises(backend, log_offset):
    with pytest.raises(ValueError, match="log_offset must be a finite number"):
        _fastflow(_random_maps(2, [(7, 9)]), (5, 5), backend, log_offset=log_offset)


def test_fastflow_on_another_device_is_named():
    maps = _random_maps(2, [(7, 9), (4, 5)])
    with pytest.raises(TypeError, match=r"log_likelihood_maps\[1\] is on meta"):
        _fastflow([maps[0], maps[1].to("meta")], (5, 5), "reference")


@pytest.mark.skipif(not _cpp_available(), reason="msflow_fast._C is not built")
def test_opcheck_cpp_fastflow_op():
    import msflow_fast.ops._cpp_head  # noqa: F401  (registers the fake kernel)

    o = torch.ops.msflow_fast
    maps = _random_maps(2, [(7, 9), (4, 5)])
    torch.library.opcheck(o.fastflow_anomaly_map_fwd, (maps, [11, 13]))
    torch.library.opcheck(o.fastflow_anomaly_map_fwd, (maps, [11, 13], True, 1.0))
    torch.library.opcheck(o.fastflow_anomaly_map_fwd, ([m.float() for m in maps], [3, 2], True, 0.0))
    with pytest.raises(RuntimeError, match="log_offset must be a finite number"):
        o.fastflow_anomaly_map_fwd(maps, [5, 5], True, float("inf"))
    with pytest.raises(RuntimeError, match="batch"):
        o.fastflow_anomaly_map_fwd([maps[0], maps[1][:1]], [5, 5])
    with pytest.raises(RuntimeError, match="empty"):
        o.fastflow_anomaly_map_fwd([], [5, 5])
    with pytest.raises(RuntimeError, match="output_size"):
        o.fastflow_anomaly_map_fwd(maps, [0, 5])
    assert o.fastflow_anomaly_map_fwd(maps, [5, 5])[2].shape == (0,)


@pytest.mark.skipif(not _cpp_available(), reason="msflow_fast._C is not built")
def test_cpp_fastflow_op_under_torch_compile():
    maps = _random_maps(2, [(7, 9), (4, 5)])

    @torch.compile(fullgraph=True, backend="eager")
    def head(a, b):
        return _fastflow([a, b], (11, 13), "cpp", log_space_score=True)

    for x, r in zip(head(*maps), reference.fastflow_anomaly_map(maps, (11, 13), log_space_score=True)):
        torch.testing.assert_close(x, r)
