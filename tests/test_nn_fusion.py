"""FusionCouplingLayer / FusionFlow: exact log-det, invertibility, the spec's formulas, key layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msflow_fast.models.msflow import FusionFlow, MSFlowHead, build_parallel_flows
from msflow_fast.nn import ChannelPermutation, FusionCouplingLayer, FusionSTNets, ParallelFlows, SequenceFlow, SubnetConvLN, enable_fast_paths
from msflow_fast import ops

GRIDS = [(4, 4), (2, 2), (1, 1)]


pytestmark = pytest.mark.usefixtures("float64_default")


def _inputs(channels, grids=GRIDS, batch=1):
    return [torch.randn(batch, c, h, w) for c, (h, w) in zip(channels, grids)]


def _layer(channels, clamp=1.9, strength=3.0):
    layer = FusionCouplingLayer([(c, 1, 1) for c in channels], clamp=clamp)
    with torch.no_grad():  # large s/t so the clamp and both stages matter
        for p in layer.parameters():
            p.mul_(strength)
    return layer


def _flat_fn(layer, shapes, rev=False):
    sizes = [math.prod(s) for s in shapes]

    def fn(flat):
        parts = [p.view(s) for p, s in zip(torch.split(flat, sizes), shapes)]
        outs, _ = layer(parts, rev=rev)
        return torch.cat([o.reshape(-1) for o in outs])

    return fn


@pytest.mark.parametrize("channels", [(2, 4, 6), (4, 4, 4), (3, 5, 7), (6, 2)], ids=lambda c: "-".join(map(str, c)))
def test_logdet_equals_slogdet_of_the_jacobian_and_reverse_is_negated(channels):
    layer = _layer(channels)
    xs = _inputs(channels, GRIDS[-len(channels):] if len(channels) < 3 else GRIDS)
    shapes = [tuple(x.shape) for x in xs]
    flat = torch.cat([x.reshape(-1) for x in xs])
    jac = torch.autograd.functional.jacobian(_flat_fn(layer, shapes), flat)
    sign, exact = torch.linalg.slogdet(jac)
    zs, logdet = layer(xs)
    assert sign.item() != 0
    torch.testing.assert_close(logdet[0], exact, rtol=1e-10, atol=1e-10)
    back, logdet_rev = layer(list(zs), rev=True)
    for b, x in zip(back, xs):
        torch.testing.assert_close(b, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet_rev, -logdet, rtol=1e-12, atol=1e-12)
    # the reverse log-det is the log-det of the inverse map's own Jacobian
    flat_z = torch.cat([z.reshape(-1) for z in zs])
    jac_rev = torch.autograd.functional.jacobian(_flat_fn(layer, shapes, rev=True), flat_z)
    torch.testing.assert_close(logdet_rev[0], torch.linalg.slogdet(jac_rev)[1], rtol=1e-10, atol=1e-10)


def _spec_fusion_subnet(net, us):
    """MSFLOW_SPEC §1.7 Phi written out with plain functional ops and the module's weights."""
    size = us[-1].shape[-2:]
    cat = torch.cat([F.adaptive_avg_pool2d(u, size) for u in us], dim=1)
    cc = net.cross_convs
    h = F.conv2d(cat, cc.conv1.weight, cc.conv1.bias, padding=1)
    h = F.layer_norm(h.permute(0, 2, 3, 1), (h.shape[1],), cc.norm.weight, cc.norm.bias, 1e-5).permute(0, 3, 1, 2)
    h = F.relu(F.conv2d(F.relu(h), cc.conv2.weight, cc.conv2.bias, padding=1))
    out = []
    for k, (u, part) in enumerate(zip(us, torch.split(h, [u.shape[1] for u in us], dim=1))):
        r = u + F.interpolate(part, size=u.shape[-2:], mode="bilinear", align_corners=True)
        s = F.conv2d(r, net.conv_s[k].weight, net.conv_s[k].bias, padding=1)
        t = F.conv2d(r, net.conv_t[k].weight, net.conv_t[k].bias, padding=1)
        out.append((s, t))
    return out


def test_forward_follows_the_spec_formulas():
    channels = (4, 6, 8)
    layer = _layer(channels, strength=2.0)
    xs = _inputs(channels, batch=2)
    alpha = 1.9

    def sig(s):
        return alpha * 0.636 * torch.atan(s / alpha)

    xa = [x[:, : c // 2] for x, c in zip(xs, channels)]
    xb = [x[:, c // 2 :] for x, c in zip(xs, channels)]
    ya, logdet = [], 0
    for a, (s, t) in zip(xa, _spec_fusion_subnet(layer.subnet_2, xb)):
        ya.append(torch.exp(sig(s)) * a + t)
        logdet = logdet + sig(s).sum(dim=(1, 2, 3))
    yb = []
    for b, (s, t) in zip(xb, _spec_fusion_subnet(layer.subnet_1, ya)):
        yb.append(torch.exp(sig(s)) * b + t)
        logdet = logdet + sig(s).sum(dim=(1, 2, 3))
    zs, ld = layer(xs)
    for z, a, b in zip(zs, ya, yb):
        torch.testing.assert_close(z, torch.cat([a, b], dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld, logdet, rtol=1e-12, atol=1e-12)


def test_state_dict_keys_match_the_official_layout():
    layer = FusionCouplingLayer([(8, 1, 1), (16, 1, 1), (32, 1, 1)], clamp=1.9)
    keys = set(layer.state_dict())
    for sub in ("subnet_1", "subnet_2"):
        for part in ("conv1", "norm", "conv2"):
            assert {f"{sub}.cross_convs.{part}.weight", f"{sub}.cross_convs.{part}.bias"} <= keys
        for k in range(3):
            assert {f"{sub}.conv_s.{k}.weight", f"{sub}.conv_t.{k}.bias"} <= keys
    assert layer.subnet_1.cross_convs.conv1.weight.shape == (28 // 4, 28, 3, 3)
    assert layer.subnet_1.conv_s[2].weight.shape == (16, 16, 3, 3)
    flow = FusionFlow((8, 16, 32))
    assert {"permutations.0.perm", "permutations.2.perm_inv", "coupling.subnet_1.conv_t.0.weight"} <= set(flow.state_dict())
    assert flow.permutations[2].perm.dtype == torch.int64 and flow.permutations[2].perm.numel() == 32


def test_official_parameter_count_for_msflow_widths():
    net = FusionSTNets([128, 256, 512])
    assert sum(p.numel() for p in net.parameters()) == 9_809_184  # MSFLOW_SPEC §1.7


def test_fusion_flow_round_trip_and_permutations():
    np.random.seed(0)
    flow = FusionFlow((4, 6, 8), clamp=1.9)
    xs = _inputs((4, 6, 8), batch=2)
    zs, logdet = flow(xs)
    permuted = [x[:, p.perm] for x, p in zip(xs, flow.permutations)]
    zs_direct, logdet_direct = flow.coupling(permuted)
    for a, b in zip(zs, zs_direct):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(logdet, logdet_direct)
    back, logdet_rev = flow(zs, rev=True)
    for b, x in zip(back, xs):
        torch.testing.assert_close(b, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet_rev, -logdet)


def test_channel_permutation_seed_and_inverse():
    a, b = ChannelPermutation(10, seed=3), ChannelPermutation(10, seed=3)
    assert torch.equal(a.perm, b.perm)
    np.random.seed(3)
    assert torch.equal(a.perm, torch.as_tensor(np.random.permutation(10)))
    x = torch.randn(2, 10, 3, 3)
    torch.testing.assert_close(a(a(x), rev=True), x)


def test_fusion_bad_inputs():
    layer = FusionCouplingLayer([(4, 1, 1), (6, 1, 1)], clamp=1.9)
    with pytest.raises(ValueError, match="2 tensors"):
        layer([torch.randn(1, 4, 2, 2)])
    with pytest.raises(ValueError, match="6 channels"):
        layer([torch.randn(1, 4, 2, 2), torch.randn(1, 5, 1, 1)])
    with pytest.raises(TypeError):
        layer(torch.randn(1, 4, 2, 2))
    with pytest.raises(NotImplementedError, match="dims_c"):
        FusionCouplingLayer([(4, 1, 1)], dims_c=[(2, 1, 1)])
    with pytest.raises(ValueError, match="clamp"):
        FusionCouplingLayer([(4, 1, 1)], clamp=0.0)


def test_gradients_flow_to_both_subnets():
    layer = _layer((4, 6), strength=1.0)
    xs = [x.requires_grad_(True) for x in _inputs((4, 6), GRIDS[1:], batch=2)]
    zs, logdet = layer(xs)
    (sum(z.square().sum() for z in zs) - logdet.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    torch.autograd.gradcheck(lambda a, b: layer([a, b])[1], [x.detach().requires_grad_(True) for x in xs])


def test_inference_caches_the_stacked_st_weights_until_a_weight_changes():
    # Under no_grad the concatenated [conv_s, conv_t] weights are reused; an in-place change or a
    # replaced weight recomputes them, and with autograd on nothing is cached.
    torch.manual_seed(3)
    net = FusionSTNets([4, 6])
    enable_fast_paths(net)
    xs = _inputs((4, 6), GRIDS[1:], batch=2)

    def expected():
        mixed = net.cross_convs(xs)
        return [torch.cat([cs(r), ct(r)], dim=1) for r, cs, ct in zip(mixed, net.conv_s, net.conv_t)]

    def check():
        with torch.no_grad():
            for got, want in zip(net(xs), expected()):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    check()
    assert len(net._inference_cache) == 2
    with torch.no_grad():
        net.conv_t[1].weight.mul_(-2.0)
    check()
    net.conv_s[0].bias.data = net.conv_s[0].bias.data + 1.0
    check()
    out = net(xs)
    (out[0].sum() + out[1].sum()).backward()
    assert net.conv_s[0].weight.grad is not None and net.conv_t[1].bias.grad.abs().sum() > 0
    net.float()
    assert len(net._inference_cache) == 0


def test_parallel_flows_and_head_shapes():
    flows = build_parallel_flows((4, 6), (1, 2), cond_channels=4, clamp=1.9)
    assert isinstance(flows, ParallelFlows)
    assert len(flows.flows[1]) == 2 and isinstance(flows.flows[0][0].subnet, SubnetConvLN)
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    conds = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)]
    zs, logdets = flows(feats, conds)
    back, logdets_rev = flows(zs, conds, rev=True)
    for b, f, l1, l2 in zip(back, feats, logdets, logdets_rev):
        torch.testing.assert_close(b, f, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(l2, -l1)
    head = MSFlowHead(top_k=0.1)
    out = head(zs, (16, 16))
    maps = [ops.log_likelihood_map(z) for z in zs]
    add, mul, score = ops.reference.aggregate_anomaly_maps(maps, (16, 16), top_k=0.1)
    log_score = ops.reference.log_space_score(maps, (16, 16), top_k=0.1)
    torch.testing.assert_close(out.anomaly_map, add)
    torch.testing.assert_close(out.maps["anomaly_map_mul"], mul)
    torch.testing.assert_close(out.score, score)
    torch.testing.assert_close(out.maps["score_official"], score)
    torch.testing.assert_close(out.maps["score_log_space"], log_score)
    torch.testing.assert_close(out.maps["log_likelihood_1"], maps[1])
    torch.testing.assert_close(MSFlowHead(top_k=0.1, score="log_space")(zs, (16, 16)).score, log_score)
    with pytest.raises(ValueError, match="top_k"):
        MSFlowHead(top_k=0.0)
    with pytest.raises(ValueError, match="score"):
        MSFlowHead(score="max")


def test_generic_parallel_flows_run_any_flows_with_or_without_conditions():
    torch.manual_seed(4)
    first, second = SequenceFlow(4, 1, 1), SequenceFlow(6, 1, 1)
    from msflow_fast.nn import AllInOneBlock

    first.append(AllInOneBlock, subnet_constructor=lambda i, o: torch.nn.Conv2d(i, o, 1))
    second.append(AllInOneBlock, subnet_constructor=lambda i, o: torch.nn.Conv2d(i, o, 1))
    flows = ParallelFlows([first, second]).double()
    feats = [torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 6, 2, 2, dtype=torch.float64)]
    zs, logdets = flows(feats)
    assert [tuple(z.shape) for z in zs] == [(2, 4, 3, 3), (2, 6, 2, 2)] and all(l.shape == (2,) for l in logdets)
    back, _ = flows(zs, rev=True)
    for b, f in zip(back, feats):
        torch.testing.assert_close(b, f, rtol=1e-12, atol=1e-12)
    assert set(flows.state_dict()) >= {"flows.0.module_list.0.global_scale", "flows.1.module_list.0.global_scale"}
    with pytest.raises(ValueError, match="at least one flow"):
        ParallelFlows([])
    with pytest.raises(ValueError, match="2 scales"):
        flows(feats[:1])
