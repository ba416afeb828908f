"""The reference maths against first principles: exact Jacobians, inverses, closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msflow_fast.ops import reference as ref



pytestmark = pytest.mark.usefixtures("float64_default")


def _jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """``slogdet`` of the exact Jacobian of ``fn`` at one sample ``x [1, C, H, W]``."""
    jac = torch.autograd.functional.jacobian(lambda t: fn(t.view_as(x)).reshape(-1), x.reshape(-1))
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign.item() != 0
    return logabsdet


@pytest.mark.parametrize("clamp_form", ref.CLAMP_FORMS)
@pytest.mark.parametrize("shape", [(1, 3, 2, 2), (1, 2, 1, 3)], ids=lambda s: "x".join(map(str, s)))
def test_affine_coupling_logdet_equals_slogdet_of_jacobian(clamp_form, shape):
    x = torch.randn(shape)
    a = 3 * torch.randn(shape[0], 2 * shape[1], *shape[2:])
    _, logdet = ref.affine_coupling(x, a, clamp=1.9, clamp_form=clamp_form)
    exact = _jacobian_logdet(lambda t: ref.affine_coupling(t, a, clamp=1.9, clamp_form=clamp_form)[0], x)
    torch.testing.assert_close(logdet[0], exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("clamp_form", ref.CLAMP_FORMS)
def test_affine_coupling_inverse_round_trip_and_logdet_sign(clamp_form):
    x = torch.randn(3, 5, 7, 9)
    a = 4 * torch.randn(3, 10, 7, 9)
    y, logdet = ref.affine_coupling(x, a, clamp=1.9, clamp_form=clamp_form)
    x_back, logdet_rev = ref.affine_coupling(y, a, clamp=1.9, clamp_form=clamp_form, reverse=True)
    torch.testing.assert_close(x_back, x, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(logdet_rev, -logdet, rtol=1e-13, atol=1e-13)
    assert not torch.allclose(y, x)


def test_soft_clamp_forms_match_their_formulas_and_bounds():
    a_s = torch.linspace(-200, 200, 1001)
    alpha = 1.9
    torch.testing.assert_close(ref.soft_clamp(a_s, alpha, "tanh"), alpha * torch.tanh(0.1 * a_s))
    torch.testing.assert_close(ref.soft_clamp(a_s, alpha, "tanh_scaled"), alpha * torch.tanh(0.1 * a_s / alpha))
    torch.testing.assert_close(ref.soft_clamp(a_s, alpha, "atan"), alpha * 0.636 * torch.atan(a_s / alpha))
    for form in ref.CLAMP_FORMS:
        assert ref.soft_clamp(a_s, alpha, form).abs().max() <= alpha
    # slope at 0: 0.19 for FrEIA 0.2's form, 0.1 for the newer one
    eps = 1e-6
    assert ref.soft_clamp(torch.tensor(eps), alpha, "tanh").item() / eps == pytest.approx(0.19)
    assert ref.soft_clamp(torch.tensor(eps), alpha, "tanh_scaled").item() / eps == pytest.approx(0.1)
    with pytest.raises(ValueError, match="clamp_form"):
        ref.soft_clamp(a_s, alpha, "sigmoid")


@pytest.mark.parametrize("affine_type", ref.AFFINE_TYPES)
def test_global_affine_permute_logdet_inverse_and_gather(affine_type):
    c = 5
    x = torch.randn(1, c, 2, 3)
    gamma = torch.randn(c)
    offset = torch.randn(c)
    perm = torch.randperm(c)
    y, logdet = ref.global_affine_permute(x, gamma, offset, perm, affine_type=affine_type)
    g = ref.global_scale_activation(gamma, affine_type)
    for i in range(c):
        torch.testing.assert_close(y[:, i], x[:, perm[i]] * g[perm[i]] + offset[perm[i]])
    exact = _jacobian_logdet(lambda t: ref.global_affine_permute(t, gamma, offset, perm, affine_type=affine_type)[0], x)
    torch.testing.assert_close(logdet[0], exact, rtol=1e-12, atol=1e-12)
    x_back, logdet_rev = ref.global_affine_permute(y, gamma, offset, perm, affine_type=affine_type, reverse=True)
    torch.testing.assert_close(x_back, x, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(logdet_rev, -logdet)


@pytest.mark.parametrize("affine_type", ref.AFFINE_TYPES)
@pytest.mark.parametrize("init", [0.5, 1.0, 2.0])
def test_global_scale_init_inverts_the_activation(affine_type, init):
    gamma0 = ref.global_scale_init(init, affine_type)
    assert ref.global_scale_activation(torch.tensor(gamma0), affine_type).item() == pytest.approx(init, rel=1e-12)


def test_softplus_init_is_freia_02_value():
    assert ref.global_scale_init(1.0, "SOFTPLUS") == pytest.approx(2 * math.log(math.exp(5) - 1))
    assert ref.global_scale_init(1.0, "SOFTPLUS") == pytest.approx(9.9865, abs=1e-4)


@pytest.mark.parametrize("c", [2, 3, 7])
def test_coupling_affine_permute_is_coupling_then_global_affine(c):
    x = torch.randn(2, c, 3, 4)
    active = c // 2
    a = 5 * torch.randn(2, 2 * active, 3, 4)
    gamma, offset, perm = torch.randn(c), torch.randn(c), torch.randperm(c)
    y, logdet = ref.coupling_affine_permute(x, a, gamma, offset, perm, clamp=1.9)
    exact = _jacobian_logdet(
        lambda t: ref.coupling_affine_permute(t, a[:1], gamma, offset, perm, clamp=1.9)[0], x[:1]
    )
    torch.testing.assert_close(logdet[0], exact, rtol=1e-12, atol=1e-12)
    # passive channels pass through the coupling unchanged
    u, _ = ref.global_affine_permute(y, gamma, offset, perm, reverse=True)
    torch.testing.assert_close(u[:, : c - active], x[:, : c - active])
    x2, _ = ref.affine_coupling(u[:, c - active :], a, clamp=1.9, reverse=True)
    torch.testing.assert_close(x2, x[:, c - active :])


def test_gaussian_nll_and_log_likelihood_map():
    z = torch.randn(3, 4, 5, 6)
    logdet = torch.randn(3)
    nll = ref.gaussian_nll(z, logdet)
    torch.testing.assert_close(nll, 0.5 * (z**2).sum(dim=(1, 2, 3)) - logdet)
    torch.testing.assert_close(ref.log_likelihood_map(z), -0.5 * (z**2).mean(dim=1))
    half = ref.gaussian_nll(z.to(torch.bfloat16), logdet.to(torch.bfloat16))
    assert half.dtype == torch.float32


def test_upsample_bilinear_align_corners_keeps_corners():
    m = torch.randn(2, 3, 4)
    up = ref.upsample_bilinear(m, (7, 10))
    assert up.shape == (2, 7, 10)
    torch.testing.assert_close(up[:, 0, 0], m[:, 0, 0])
    torch.testing.assert_close(up[:, -1, -1], m[:, -1, -1])
    torch.testing.assert_close(up[:, 0, -1], m[:, 0, -1])


def test_aggregate_anomaly_maps_matches_the_official_definitions():
    maps = [-torch.rand(2, 8, 8) * 10, -torch.rand(2, 4, 4) * 10, -torch.rand(2, 2, 2) * 10]
    size = (16, 16)
    add, mul, score = ref.aggregate_anomaly_maps(maps, size, top_k=0.1)
    ups = [F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=True)[:, 0] for m in maps]
    probs = [
        F.interpolate(torch.exp(m - m.amax(dim=(1, 2), keepdim=True))[:, None], size=size, mode="bilinear",
                      align_corners=True)[:, 0]
        for m in maps
    ]
    s = sum(probs)
    torch.testing.assert_close(add, s.amax(dim=(1, 2), keepdim=True) - s)
    total = sum(ups)
    p = torch.exp(total - total.amax(dim=(1, 2), keepdim=True))
    torch.testing.assert_close(mul, 1 - p)
    k = int(256 * 0.1)
    torch.testing.assert_close(score, mul.flatten(1).sort(dim=1, descending=True).values[:, :k].mean(dim=1))
    assert (add >= 0).all() and (mul >= 0).all()


def test_log_space_score_ranks_like_official_score_and_does_not_saturate():
    torch.manual_seed(3)
    maps = [-torch.rand(6, 8, 8) * s for s in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)[:3]]
    maps = [m * torch.arange(1, 7).view(6, 1, 1) for m in maps]
    _, _, official = ref.aggregate_anomaly_maps(maps, (16, 16), top_k=0.05)
    stable = ref.log_space_score(maps, (16, 16), top_k=0.05)
    # per pixel, 1 - exp(-gap) is increasing in gap: top-k sets coincide, scores rank alike
    assert torch.equal(torch.argsort(official), torch.argsort(stable))
    far = [m.float() * 1000 for m in maps]
    _, _, sat = ref.aggregate_anomaly_maps(far, (16, 16), top_k=0.05)
    assert torch.all(sat == 1.0)  # the official score saturates in float32
    assert torch.unique(ref.log_space_score(far, (16, 16), top_k=0.05)).numel() == 6


def test_top_k_count_is_at_least_one():
    assert ref.top_k_count(262144, 0.03) == 7864
    assert ref.top_k_count(10, 0.01) == 1
