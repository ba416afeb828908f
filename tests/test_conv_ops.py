"""The subnets' 3x3 convolution: Winograd F(4x4, 3x3) of the C++ CPU backend against F.conv2d,
the dispatch rules of ops.conv3x3, and the modules that cache Winograd weights at inference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from msflow_fast import ops
from msflow_fast.nn import FusionSTNets, SubnetConvLN, enable_fast_paths
from msflow_fast.ops import reference

from conftest import fused_backends

pytestmark = pytest.mark.skipif(
    "cpp" not in fused_backends(torch.device("cpu"), "conv3x3"), reason="needs the C++ extension (msflow_fast._C)"
)

# (B, C_in, H, W, C_out): odd sizes, sizes that are not whole 4x4 tiles, 1x1 images, lane groups
# across images, MSFlow's 8x8 / 16x16 grids with real widths, and more tiles than one block.
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 3, 5, 7, 4),
    (3, 5, 4, 4, 2),
    (1, 7, 13, 6, 9),
    (2, 4, 2, 21, 3),
    (5, 16, 9, 8, 11),
    (2, 72, 8, 8, 96),
    (1, 64, 17, 16, 32),
    (3, 5, 45, 47, 4),  # 432 tiles: a full block of 256 and a shorter last one
]


def _conv_inputs(shape, dtype=torch.float64, bias=True):
    b, ci, h, w, co = shape
    x = torch.randn(b, ci, h, w, dtype=torch.float64) + 0.5
    weight = torch.randn(co, ci, 3, 3, dtype=torch.float64) / (ci * 9) ** 0.5
    b_ = torch.randn(co, dtype=torch.float64) if bias else None
    return x.to(dtype), weight.to(dtype), None if b_ is None else b_.to(dtype)


def _winograd(x, weight, bias):
    return torch.ops.msflow_fast.conv3x3_winograd_fwd(x, reference.winograd_weight(weight), bias)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_winograd_matches_conv2d_in_float64(shape, bias):
    x, weight, b = _conv_inputs(shape, bias=bias)
    out = _winograd(x, weight, b)
    assert out.shape == (shape[0], shape[4], shape[2], shape[3]) and out.is_contiguous()
    torch.testing.assert_close(out, F.conv2d(x, weight, b, padding=1), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("layout", ["channel_half", "channels_last", "transposed"])
def test_winograd_reads_strided_inputs(layout):
    # A flow block's passive half is a strided view [:, :C/2] of a contiguous tensor; the op reads
    # it (and other layouts) in place.
    x, weight, b = _conv_inputs((3, 6, 9, 7, 5))
    if layout == "channel_half":
        x = torch.cat([x, torch.randn_like(x)], dim=1)[:, :6]
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    torch.testing.assert_close(_winograd(x, weight, b), F.conv2d(x, weight, b, padding=1), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_winograd_float32_error_stays_within_the_documented_bound(shape):
    # Winograd F(4x4, 3x3) rounds more than a direct convolution (its transforms scale values by
    # up to 8 and back): the documented bound is 2e-5 of the output's scale, 30x conv2d's error.
    x, weight, b = _conv_inputs(shape, dtype=torch.float32)
    exact = F.conv2d(x.double(), weight.double(), b.double(), padding=1)
    out = _winograd(x, weight, b)
    scale = exact.abs().max().item()
    err = (out.double() - exact).abs().max().item()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert err <= 2e-5 * scale, f"max error {err:.2e} > 2e-5 x scale {scale:.2e}"
    assert err > 0 or x.numel() < 10, "float32 Winograd cannot be bit-exact here: is the path taken at all?"


def test_winograd_weight_is_the_kernel_transform():
    # (G w G^T)[i, j] for one (o, c), written out with the interpolation points 0, 1, -1, 2, -2, inf.
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    u = reference.winograd_weight(weight)
    assert u.shape == (36, 3, 2) and u.dtype == torch.float64
    w = weight[1, 0]
    points = [0.0, 1.0, -1.0, 2.0, -2.0]
    scales = [1 / 4, -1 / 6, -1 / 6, 1 / 24, 1 / 24]  # 1 / prod_{k != i} (p_i - p_k), signs folded in

    def g_row(i):
        if i == 5:  # the point at infinity takes the last tap
            return torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        p = points[i]
        return scales[i] * torch.tensor([1.0, p, p * p], dtype=torch.float64)

    for i in range(6):
        for j in range(6):
            torch.testing.assert_close(u[6 * i + j, 1, 0], g_row(i) @ w @ g_row(j), rtol=1e-14, atol=1e-14)


def test_public_conv3x3_dispatch():
    x, weight, b = _conv_inputs((2, 64, 16, 8, 8), dtype=torch.float32)  # 16 tiles
    u = ops.conv3x3_winograd_weight(weight)
    plain = F.conv2d(x, weight, b, padding=1)
    with torch.no_grad():
        assert ops.winograd_enabled(x)
        fast = ops.conv3x3(x, weight, b, weight_winograd=u)
        torch.testing.assert_close(fast, _winograd(x, weight, b), rtol=0, atol=0)
        assert not torch.equal(fast, plain), "with weight_winograd at inference the Winograd path must run"
        # Without Winograd weights, or on the reference backend, it is F.conv2d exactly.
        torch.testing.assert_close(ops.conv3x3(x, weight, b), plain, rtol=0, atol=0)
        torch.testing.assert_close(ops.conv3x3(x, weight, b, weight_winograd=u, backend="reference"), plain, rtol=0, atol=0)
        with ops.use_backend("reference"):
            assert not ops.winograd_enabled(x)
        assert not ops.winograd_enabled(x[:, : ops.conv.WINOGRAD_MIN_CHANNELS - 1])
        assert ops.winograd_enabled(x[:, : ops.conv.WINOGRAD_MIN_CHANNELS])
        assert not ops.winograd_enabled(torch.randn(1, 64, 13, 12))  # 4 x 3 tiles
        assert ops.winograd_enabled(torch.randn(1, 64, 13, 13))  # 4 x 4 tiles
        assert not ops.winograd_enabled(x.to(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not ops.winograd_enabled(x)
    # With autograd on it is F.conv2d, and differentiable.
    assert not ops.winograd_enabled(x)
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    out = ops.conv3x3(*leaves, weight_winograd=u)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    out.square().sum().backward()
    assert all(t.grad is not None for t in leaves)


def test_winograd_can_be_switched_off(monkeypatch):
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        assert ops.winograd_enabled(x)
        monkeypatch.setenv(ops.ENV_WINOGRAD, "0")
        assert not ops.winograd_enabled(x)


def test_conv3x3_gradcheck_float64():
    x, weight, b = _conv_inputs((2, 3, 5, 4, 2))
    leaves = [t.requires_grad_() for t in (x, weight, b)]
    u = ops.conv3x3_winograd_weight(weight)
    assert torch.autograd.gradcheck(lambda *a: ops.conv3x3(*a, weight_winograd=u), leaves)


def test_bad_arguments_name_the_problem():
    x, weight, b = _conv_inputs((1, 4, 5, 5, 3), dtype=torch.float32)
    u = ops.conv3x3_winograd_weight(weight)
    with pytest.raises(ValueError, match=r"weight must have shape \[C_out, 4, 3, 3\]"):
        ops.conv3x3(x, weight[:, :3], b)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.conv3x3(x, weight, b[:2])
    with pytest.raises(ValueError, match=r"weight_winograd must have shape \(36, 3, 4\)"):
        ops.conv3x3(x, weight, b, weight_winograd=u[:, :2])
    with pytest.raises(TypeError, match="weight_winograd has dtype"):
        ops.conv3x3(x, weight, b, weight_winograd=u.double())
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has torch.float32"):
        ops.conv3x3(x, weight.double(), b)
    with pytest.raises(TypeError, match="bias has dtype"):
        ops.conv3x3(x, weight, b.double())
    with pytest.raises(ValueError, match="x must be 4-D"):
        ops.conv3x3(x[0], weight, b)
    with pytest.raises(ValueError, match=r"weight must have shape \[C_out, C_in, 3, 3\]"):
        ops.conv3x3_winograd_weight(torch.randn(3, 4, 5, 5))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.msflow_fast.conv3x3_winograd_fwd(x.half(), u.half(), None)
    with pytest.raises(RuntimeError, match="weight_winograd must have shape"):
        torch.ops.msflow_fast.conv3x3_winograd_fwd(x, u[:, :, :2], None)


def test_winograd_op_opcheck():
    x, weight, b = _conv_inputs((2, 5, 6, 7, 3), dtype=torch.float32)
    torch.library.opcheck(torch.ops.msflow_fast.conv3x3_winograd_fwd, (x, reference.winograd_weight(weight), b))


# ------------------------------------------------------------------ modules


def _without_winograd(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setenv(ops.ENV_WINOGRAD, "0")
        return fn()


def test_subnet_uses_cached_winograd_weights_at_cpu_inference(monkeypatch):
    torch.manual_seed(1)
    subnet = SubnetConvLN(64 + 64, 2 * 64)
    assert enable_fast_paths(subnet) == 1
    x = torch.randn(2, 64, 16, 16)
    cond = torch.randn(1, 64, 16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        plain = _without_winograd(monkeypatch, lambda: subnet.forward_split(x, [cond]))
        fast = subnet.forward_split(x, [cond])
        names = set(subnet._inference_cache._entries)
        assert {"conv1_x", "conv2"} <= names, names
        torch.testing.assert_close(fast, plain, rtol=2e-5, atol=2e-5 * plain.abs().max().item())
        assert not torch.equal(fast, plain)
        # The concatenating path (per-sample conditions) uses the full conv1 weight.
        torch.testing.assert_close(
            subnet(torch.cat([x, cond], 1)), _without_winograd(monkeypatch, lambda: subnet(torch.cat([x, cond], 1))),
            rtol=2e-5, atol=2e-5 * plain.abs().max().item(),
        )
        # An in-place change of a weight invalidates its Winograd form.
        subnet.conv2.weight.mul_(-1.5)
        again = subnet.forward_split(x, [cond])
        plain_again = _without_winograd(monkeypatch, lambda: subnet.forward_split(x, [cond]))
        torch.testing.assert_close(again, plain_again, rtol=2e-5, atol=2e-5 * plain_again.abs().max().item())
    assert len(copy.deepcopy(subnet)._inference_cache) == 0
    # Training takes the module calls (hooks fire) and conv2d's gradients.
    calls = []
    subnet.conv2.register_forward_hook(lambda *args: calls.append(1))
    subnet.forward_split(x, [cond]).sum().backward()
    assert calls and subnet.conv1.weight.grad is not None


def test_fusion_subnet_uses_winograd_at_cpu_inference(monkeypatch):
    torch.manual_seed(2)
    net = FusionSTNets([64, 128])
    assert enable_fast_paths(net) == 2
    xs = [torch.randn(4, 64, 16, 16), torch.randn(4, 128, 8, 8)]
    with torch.no_grad():
        plain = _without_winograd(monkeypatch, lambda: net(xs))
        fast = net(xs)
    assert any(name.endswith("_conv") for name in net._inference_cache._entries)
    assert any(name == "conv1" for name in net.cross_convs._inference_cache._entries)
    for f, p in zip(fast, plain):
        torch.testing.assert_close(f, p, rtol=2e-5, atol=2e-5 * p.abs().max().item())


def test_subnets_are_plain_modules_until_fast_paths_are_enabled():
    """By default every submodule is called (its hooks fire) and nothing is cached, at inference too."""
    torch.manual_seed(3)
    subnet = SubnetConvLN(64 + 64, 2 * 64)
    net = FusionSTNets([64, 128])
    calls = []
    for module in (subnet.conv1, subnet.ln, subnet.conv2, net.cross_convs.conv1, net.cross_convs.norm, net.conv_s[0], net.conv_t[1]):
        module.register_forward_hook(lambda m, i, o, name=type(module).__name__: calls.append(name))
    x = torch.randn(2, 64, 16, 16)
    cond = torch.randn(1, 64, 16, 16).expand(2, -1, -1, -1)
    xs = [torch.randn(4, 64, 16, 16), torch.randn(4, 128, 8, 8)]
    with torch.no_grad():
        plain_subnet = subnet.forward_split(x, [cond])
        plain_net = net(xs)
    assert len(calls) == 7 and len(subnet._inference_cache) == 0 and len(net._inference_cache) == 0
    enable_fast_paths(subnet)
    enable_fast_paths(net)
    calls.clear()
    with torch.no_grad():
        fast_subnet = subnet.forward_split(x, [cond])
        fast_net = net(xs)
    assert calls == [], "the fast paths skip the module calls"
    torch.testing.assert_close(fast_subnet, plain_subnet, rtol=2e-5, atol=2e-5 * plain_subnet.abs().max().item())
    for f, p in zip(fast_net, plain_net):
        torch.testing.assert_close(f, p, rtol=2e-5, atol=2e-5 * p.abs().max().item())
    assert enable_fast_paths(subnet, False) == 1
    calls.clear()
    with torch.no_grad():
        subnet.forward_split(x, [cond])
    assert len(calls) == 3
