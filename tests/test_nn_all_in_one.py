"""Drop-in parity of msflow_fast.nn.AllInOneBlock with FrEIA 0.2's AllInOneBlock (the parity oracle)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import FrEIA.framework as Ff
import FrEIA.modules as Fm
from FrEIA.modules.all_in_one_block import AllInOneBlock as FrEIABlock

from msflow_fast import ops
from msflow_fast.nn import AllInOneBlock, FusedAllInOneBlock, SequenceFlow, compat, enable_fast_paths, patch_freia, subnet_conv_ln

from helpers import assert_close_to_reference, max_abs_err

OPTIONS = {
    "hard": {},
    "reverse_perm": {"reverse_permutation": True},
    "gin": {"gin_block": True},
    "soft": {"permute_soft": True},
    "householder": {"learned_householder_permutation": 2},
    "sigmoid": {"global_affine_type": "SIGMOID", "global_affine_init": 0.7},
    "exp_rev_householder": {"global_affine_type": "EXP", "reverse_permutation": True, "learned_householder_permutation": 1},
}


def _build_pair(channels, cond_channels, options, dtype, dims=None, subnet=subnet_conv_ln, seed=0):
    """The FrEIA block and ours, built from the same seeds (numpy permutation, torch init)."""
    dims = dims or (channels, 1, 1)
    dims_c = [(cond_channels, *dims[1:])] if cond_channels else None
    kwargs = dict(subnet_constructor=subnet, affine_clamping=1.9, **options)
    np.random.seed(seed)
    torch.manual_seed(seed)
    theirs = FrEIABlock([dims], dims_c=dims_c or [], **kwargs).to(dtype)
    np.random.seed(seed)
    torch.manual_seed(seed)
    ours = AllInOneBlock([dims], dims_c=dims_c, **kwargs).to(dtype)
    with torch.no_grad():  # move away from the identity init so every term matters
        theirs.global_offset.normal_()
        theirs.global_scale.add_(0.5 * torch.randn_like(theirs.global_scale))
    return theirs, ours


def _inputs(batch, channels, cond_channels, spatial, dtype):
    x = torch.randn(batch, channels, *spatial, dtype=dtype)
    c = [torch.randn(batch, cond_channels, *spatial, dtype=dtype)] if cond_channels else []
    return x, c


def _grads(module, x, c, rev):
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    (y,), logdet = module([x], c, rev=rev)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + 0.3 * logdet.sum()
    loss.backward()
    named = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return y.detach(), logdet.detach(), x.grad.clone(), named


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("channels,cond", [(2, 0), (3, 4), (7, 3), (8, 0)], ids=["C2", "C3c4", "C7c3", "C8"])
def test_seeded_construction_and_state_dict_keys_match_freia(channels, cond, option, dtype):
    _, ours = _build_pair(channels, cond, OPTIONS[option], dtype)
    np.random.seed(0)
    torch.manual_seed(0)
    fresh = FrEIABlock([(channels, 1, 1)], dims_c=[(cond, 1, 1)] if cond else [], subnet_constructor=subnet_conv_ln,
                       affine_clamping=1.9, **OPTIONS[option]).to(dtype)
    sd_theirs, sd_ours = fresh.state_dict(), ours.state_dict()
    assert list(sd_theirs) == list(sd_ours)
    for key in sd_theirs:
        assert sd_theirs[key].shape == sd_ours[key].shape, key
        assert sd_theirs[key].dtype == sd_ours[key].dtype, key
        assert torch.equal(sd_theirs[key], sd_ours[key]), f"{key} differs after the same seeds"


@pytest.mark.parametrize("direction", ["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize(
    "channels,cond,spatial",
    [(2, 0, (4, 4)), (3, 4, (5, 6)), (7, 3, (3, 5)), (8, 2, (1, 1)), (31, 8, (8, 8))],
    ids=["C2-4x4", "C3c4-5x6", "C7c3-3x5", "C8c2-1x1", "C31c8-8x8"],
)
def test_outputs_logdets_and_gradients_match_freia(channels, cond, spatial, option, dtype, direction):
    """float64: tight. float32: error vs FrEIA-in-float64 at most 2x FrEIA-float32's own error (+ atol)."""
    theirs, ours = _build_pair(channels, cond, OPTIONS[option], dtype)
    ours.load_state_dict(theirs.state_dict())
    x, c = _inputs(3, channels, cond, spatial, dtype)
    rev = direction == "rev"
    exact = _grads(copy.deepcopy(theirs).double(), x.double(), [t.double() for t in c], rev)
    eager = _grads(theirs, x, c, rev)
    got = _grads(ours, x, c, rev)
    assert set(got[3]) == set(exact[3])
    pairs = [("y", 0), ("logdet", 1), ("grad x", 2)]
    for name, i in pairs:
        assert_close_to_reference(name, got[i], eager[i], exact[i])
    for name in exact[3]:
        assert_close_to_reference(f"grad {name}", got[3][name], eager[3][name], exact[3][name])


@pytest.mark.parametrize("option", ["hard", "reverse_perm", "gin"])
def test_ours_to_freia_state_dict_round_trip(option):
    theirs, ours = _build_pair(7, 3, OPTIONS[option], torch.float32, seed=1)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    theirs.load_state_dict(ours.state_dict())  # ours -> FrEIA, strict
    x, c = _inputs(2, 7, 3, (4, 5), torch.float32)
    (y_t,), ld_t = theirs([x], c)
    (y_o,), ld_o = ours([x], c)
    torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld_o, ld_t, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dims,shape", [((6,), (5, 6)), ((5, 1), (2, 5, 7)), ((6, 1, 1, 1), (2, 6, 2, 3, 4))],
                         ids=["rank0", "rank1", "rank3"])
def test_other_input_ranks_match_freia(dims, shape):
    np.random.seed(3)
    torch.manual_seed(3)

    def linear_subnet(c_in, c_out):
        if len(dims) == 1:
            return nn.Sequential(nn.Linear(c_in, 8), nn.ReLU(), nn.Linear(8, c_out))
        conv = {2: nn.Conv1d, 4: nn.Conv3d}[len(dims)]
        return nn.Sequential(conv(c_in, 8, 1), nn.ReLU(), conv(8, c_out, 1))

    theirs = FrEIABlock([dims], subnet_constructor=linear_subnet, affine_clamping=2.0).double()
    ours = AllInOneBlock([dims], subnet_constructor=linear_subnet, affine_clamping=2.0).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(*shape, dtype=torch.float64)
    (y_t,), ld_t = theirs([x])
    (y_o,), ld_o = ours([x])
    torch.testing.assert_close(y_o, y_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_o, ld_t, rtol=1e-12, atol=1e-12)
    (x_back,), ld_rev = ours([y_o], rev=True)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld_rev, -ld_o, rtol=1e-12, atol=1e-12)


def test_spatial_inputs_with_dummy_dims_and_any_size():
    block = AllInOneBlock([(5, 1, 1)], dims_c=[(4, 1, 1)], subnet_constructor=subnet_conv_ln, affine_clamping=1.9)
    for h, w in [(1, 1), (7, 9), (13, 17)]:
        x, c = _inputs(2, 5, 4, (h, w), torch.float32)
        (y,), logdet = block([x], c)
        assert y.shape == x.shape and logdet.shape == (2,)
    (y,), _ = block((x,), c)  # tuple input, as FrEIA's SequenceINN passes
    assert y.shape == x.shape


def test_freia_sequence_inn_holding_our_block_matches_freia_blocks():
    def build(block_class, seed):
        np.random.seed(seed)
        torch.manual_seed(seed)
        inn = Ff.SequenceINN(6, 1, 1)
        for _ in range(3):
            inn.append(block_class, cond=0, cond_shape=(4, 1, 1), subnet_constructor=subnet_conv_ln,
                       affine_clamping=1.9, global_affine_type="SOFTPLUS")
        return inn.double()

    theirs, ours = build(FrEIABlock, 5), build(AllInOneBlock, 5)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict())
    x, c = _inputs(2, 6, 4, (5, 4), torch.float64)
    z_t, ld_t = theirs(x, c)
    z_o, ld_o = ours(x, c)
    torch.testing.assert_close(z_o, z_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_o, ld_t, rtol=1e-12, atol=1e-12)
    x_back, ld_rev = ours(z_o, c, rev=True)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld_rev, -ld_o, rtol=1e-10, atol=1e-10)

    ours_seq = SequenceFlow(6, 1, 1)
    np.random.seed(5)
    torch.manual_seed(5)
    for _ in range(3):
        ours_seq.append(AllInOneBlock, cond=0, cond_shape=(4, 1, 1), subnet_constructor=subnet_conv_ln,
                        affine_clamping=1.9, global_affine_type="SOFTPLUS")
    ours_seq.double().load_state_dict(theirs.state_dict())
    z_s, ld_s = ours_seq(x, c)
    torch.testing.assert_close(z_s, z_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_s, ld_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels", [3, 7, 8])
def test_index_form_permutations_load(channels):
    theirs, ours = _build_pair(channels, 2, {}, torch.float64, seed=2)
    state = dict(theirs.state_dict())
    perm = state["w_perm"][:, :, 0, 0].argmax(dim=1)
    state["w_perm"] = perm.clone()
    state["w_perm_inv"] = torch.argsort(perm)
    fresh = AllInOneBlock([(channels, 1, 1)], dims_c=[(2, 1, 1)], subnet_constructor=subnet_conv_ln,
                          affine_clamping=1.9).double()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.perm_index, perm)
    assert fresh.w_perm.shape == (channels, channels, 1, 1) and fresh.w_perm.dtype == torch.float64
    assert torch.equal(fresh.w_perm, theirs.w_perm) and torch.equal(fresh.w_perm_inv, theirs.w_perm_inv)
    x, c = _inputs(2, channels, 2, (3, 3), torch.float64)
    (y_t,), ld_t = theirs([x], c)
    (y_o,), ld_o = fresh([x], c)
    torch.testing.assert_close(y_o, y_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_o, ld_t, rtol=1e-12, atol=1e-12)


def test_bad_permutations_are_rejected_on_load():
    block = AllInOneBlock([(4, 1, 1)], subnet_constructor=subnet_conv_ln)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    with pytest.raises(ValueError, match="not a permutation"):
        block.load_state_dict({**state, "w_perm": torch.tensor([0, 0, 1, 2])})
    with pytest.raises(ValueError, match="3 channels but the block has 4"):
        block.load_state_dict({**state, "w_perm": torch.tensor([0, 1, 2])})
    soft = torch.linalg.qr(torch.randn(4, 4))[0].view(4, 4, 1, 1)
    with pytest.raises(ValueError, match="permutation matrix"):
        block.load_state_dict({**state, "w_perm": soft})
    swapped = compat.permutation_matrix(torch.tensor([1, 0, 3, 2]), 2)
    with pytest.raises(ValueError, match="w_perm_inv"):
        block.load_state_dict({**state, "w_perm": swapped})
    assert torch.equal(block.w_perm, state["w_perm"]), "a rejected load must leave the block untouched"


def test_gather_index_is_a_non_persistent_buffer_derived_from_w_perm():
    block = AllInOneBlock([(9, 1, 1)], subnet_constructor=subnet_conv_ln)
    assert "perm_index" not in block.state_dict()
    assert torch.equal(block.perm_index, block.w_perm[:, :, 0, 0].argmax(dim=1))
    assert not any(name.startswith("w_perm") for name, _ in block.named_parameters())
    assert block.w_perm.dtype == torch.float32 and set(block.w_perm.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("alpha", [1.9, 0.7])
def test_clamp_form_tanh_scaled_matches_the_newer_freia_formula(alpha):
    torch.manual_seed(4)
    np.random.seed(4)
    block = AllInOneBlock([(5, 1, 1)], dims_c=[(2, 1, 1)], subnet_constructor=subnet_conv_ln,
                          affine_clamping=alpha, clamp_form="tanh_scaled").double()
    with torch.no_grad():
        block.global_offset.normal_()
        block.global_scale.add_(torch.randn_like(block.global_scale))
        block.subnet.conv2.weight.mul_(20)
    x, c = _inputs(2, 5, 2, (3, 4), torch.float64)
    a = block.subnet(torch.cat([x[:, :3], *c], dim=1))
    s = alpha * torch.tanh(0.1 * a[:, :2] / alpha)
    u = torch.cat([x[:, :3], x[:, 3:] * torch.exp(s) + 0.1 * a[:, 2:]], dim=1)
    g = 0.1 * nn.functional.softplus(block.global_scale, beta=0.5)
    expected = (u * g + block.global_offset)[:, block.perm_index]
    expected_logdet = s.sum(dim=(1, 2, 3)) + 12 * torch.log(g).sum()
    (y,), logdet = block([x], c)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, expected_logdet, rtol=1e-12, atol=1e-12)
    # the default form is FrEIA 0.2's, a different function for alpha != 1
    default = AllInOneBlock([(5, 1, 1)], dims_c=[(2, 1, 1)], subnet_constructor=subnet_conv_ln, affine_clamping=alpha).double()
    default.load_state_dict(block.state_dict())
    assert max_abs_err(default([x], c)[0][0], y) > 1e-6


def _exact_logdet(block, x, c):
    jac = torch.autograd.functional.jacobian(lambda t: block([t.view_as(x)], c)[0][0].reshape(-1), x.reshape(-1))
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("option", ["hard", "reverse_perm", "gin", "householder", "sigmoid"])
def test_logdet_equals_slogdet_of_the_jacobian(option):
    torch.manual_seed(6)
    np.random.seed(6)
    block = AllInOneBlock([(5, 1, 1)], dims_c=[(2, 1, 1)], subnet_constructor=subnet_conv_ln, affine_clamping=1.9,
                          **OPTIONS[option]).double()
    with torch.no_grad():
        block.global_scale.add_(torch.randn_like(block.global_scale))
        block.subnet.conv2.weight.mul_(10)
    x, c = _inputs(1, 5, 2, (2, 3), torch.float64)
    (_,), logdet = block([x], c)
    torch.testing.assert_close(logdet[0], _exact_logdet(block, x, c), rtol=1e-10, atol=1e-10)


def test_no_inplace_ops_subnet_ending_in_a_saved_output_op():
    """FrEIA 0.2 scales the subnet output in place (``a *= 0.1``), which breaks autograd when the
    subnet's last op saves its output (e.g. tanh); this block must not."""

    def tanh_subnet(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.Tanh())

    block = AllInOneBlock([(4, 1, 1)], subnet_constructor=tanh_subnet)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    (y,), logdet = block([x])
    (y.square().sum() - logdet.sum()).backward()
    assert torch.isfinite(x.grad).all()
    (y,), logdet = block([x.detach()], rev=True)
    assert torch.isfinite(y).all()


def test_conditions_are_concatenated_to_the_passive_half():
    seen = {}

    class Spy(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.conv = nn.Conv2d(c_in, c_out, 1)

        def forward(self, t):
            seen["input"] = t
            return self.conv(t)

    block = AllInOneBlock([(5, 1, 1)], dims_c=[(2, 1, 1), (1, 1, 1)], subnet_constructor=Spy)
    x = torch.randn(2, 5, 3, 3)
    c = [torch.randn(2, 2, 3, 3), torch.randn(2, 1, 3, 3)]
    block([x], c)
    torch.testing.assert_close(seen["input"], torch.cat([x[:, :3], *c], dim=1))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="subnet_constructor"):
        AllInOneBlock([(4, 1, 1)])
    with pytest.raises(ValueError, match="at least 2 channels"):
        AllInOneBlock([(1, 1, 1)], subnet_constructor=subnet_conv_ln)
    with pytest.raises(ValueError, match="global_affine_type"):
        AllInOneBlock([(4, 1, 1)], subnet_constructor=subnet_conv_ln, global_affine_type="RELU")
    with pytest.raises(ValueError, match="clamp_form"):
        AllInOneBlock([(4, 1, 1)], subnet_constructor=subnet_conv_ln, clamp_form="atan")
    with pytest.raises(ValueError, match="dims_c"):
        AllInOneBlock([(4, 3, 3)], dims_c=[(2, 1, 1)], subnet_constructor=subnet_conv_ln)
    block = AllInOneBlock([(4, 1, 1)], dims_c=[(2, 1, 1)], subnet_constructor=subnet_conv_ln)
    with pytest.raises(ValueError, match=r"\[B, 4, \.\.\.\]"):
        block([torch.randn(2, 5, 3, 3)], [torch.randn(2, 2, 3, 3)])
    with pytest.raises(ValueError, match="condition"):
        block([torch.randn(2, 4, 3, 3)])
    with pytest.raises(TypeError, match="one tensor"):
        block([torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)], [torch.randn(2, 2, 3, 3)])


def test_alias_and_paths():
    assert FusedAllInOneBlock is AllInOneBlock
    assert "path=fused" in repr(AllInOneBlock([(4, 1, 1)], subnet_constructor=subnet_conv_ln))
    assert "path=plain" in repr(AllInOneBlock([(4, 1, 1)], subnet_constructor=subnet_conv_ln, gin_block=True))


def test_fused_path_calls_the_public_ops(monkeypatch):
    calls = []
    for name in ("coupling_affine_permute", "global_affine_permute", "affine_coupling"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    block = AllInOneBlock([(6, 1, 1)], subnet_constructor=subnet_conv_ln)
    (y,), _ = block([torch.randn(2, 6, 3, 3)])
    assert calls == ["coupling_affine_permute"]
    block([y], rev=True)
    assert calls[1:] == ["global_affine_permute", "affine_coupling"]


def test_patch_freia_swaps_and_restores():
    original = Fm.AllInOneBlock
    with patch_freia():
        assert Fm.AllInOneBlock is AllInOneBlock
        import FrEIA.modules.all_in_one_block as mod

        assert mod.AllInOneBlock is AllInOneBlock
        inn = Ff.SequenceINN(4, 1, 1)
        inn.append(Fm.AllInOneBlock, subnet_constructor=subnet_conv_ln)
        assert isinstance(inn.module_list[0], AllInOneBlock)
    assert Fm.AllInOneBlock is original is FrEIABlock
    with pytest.raises(RuntimeError):
        with patch_freia():
            raise RuntimeError("boom")
    assert Fm.AllInOneBlock is FrEIABlock


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_torch_compile_fullgraph_block_forward(backend):
    # The backend is resolved once at trace time, so the whole block traces as one graph.
    torch._dynamo.reset()
    block = AllInOneBlock([(6, 1, 1)], dims_c=[(4, 1, 1)], subnet_constructor=subnet_conv_ln, affine_clamping=1.9)
    x, c = _inputs(2, 6, 4, (5, 5), torch.float32)

    def run(t, cond):
        (y,), logdet = block([t], [cond])
        return y, logdet

    with ops.use_backend(backend):
        compiled = torch.compile(run, fullgraph=True)
        y_c, ld_c = compiled(x, c[0])
        y_e, ld_e = run(x, c[0])
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld_c, ld_e, rtol=1e-5, atol=1e-4)


def test_autocast_keeps_the_coupling_in_the_input_dtype():
    block = AllInOneBlock([(6, 1, 1)], dims_c=[(4, 1, 1)], subnet_constructor=subnet_conv_ln, affine_clamping=1.9)
    x, c = _inputs(2, 6, 4, (5, 5), torch.float32)
    (y_ref,), ld_ref = block([x], c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y,), logdet = block([x], c)
        (x_back,), ld_rev = block([y], c, rev=True)
    assert y.dtype == logdet.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=0.05, atol=0.05)
    torch.testing.assert_close(logdet, ld_ref, rtol=0.05, atol=0.5)
    torch.testing.assert_close(x_back, x, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("rev", [False, True], ids=["fwd", "rev"])
def test_autocast_bf16_input_uses_the_float32_parameters_unrounded(backend, rev):
    # A bfloat16 input under CPU autocast (features of a bf16 backbone): the fused ops get bf16 x and
    # the block's float32 global_scale / global_offset, which stay float32 and are used unrounded
    # (gamma = 9.9865 would round to 10.0 in bf16: ~1.3e-3 nats per channel and pixel).
    torch.manual_seed(7)
    channels, spatial = 64, (9, 11)
    block = AllInOneBlock([(channels, 1, 1)], subnet_constructor=subnet_conv_ln, affine_clamping=1.9)
    with torch.no_grad():
        block.global_scale.copy_(9.9865 + 1e-3 * torch.randn_like(block.global_scale))
        block.global_offset.normal_(0.3, 0.1)
    x = torch.randn(2, channels, *spatial).to(torch.bfloat16)
    subnet_out = []
    block.subnet.register_forward_hook(lambda module, inputs, out: subnet_out.append(out.detach()))
    with ops.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        (y,), logdet = block([x], rev=rev)
    assert block.global_scale.dtype == block.global_offset.dtype == torch.float32
    assert y.dtype == torch.bfloat16, y.dtype
    assert logdet.dtype == torch.float32, logdet.dtype
    (y.float().square().sum() - logdet.sum()).backward()
    assert block.global_scale.grad.dtype == block.global_offset.grad.dtype == torch.float32
    assert torch.isfinite(block.global_scale.grad).all() and torch.isfinite(block.global_offset.grad).all()
    # float64 oracle on the same (rounded) input and subnet output, with the float32 parameters
    a = subnet_out[0].to(torch.bfloat16).double()
    gamma, offset, perm = block.global_scale.double(), block.global_offset.double(), block.perm_index
    if rev:
        u, ld_global = ops.reference.global_affine_permute(x.double(), gamma, offset, perm, reverse=True)
        passive = channels - channels // 2
        _, ld_coupling = ops.reference.affine_coupling(u[:, passive:], a, clamp=1.9, reverse=True)
        expected = ld_global + ld_coupling
    else:
        _, expected = ops.reference.coupling_affine_permute(x.double(), a, gamma, offset, perm, clamp=1.9)
    tol = 2e-6 * channels * spatial[0] * spatial[1]  # float32 arithmetic; a bf16-rounded gamma is off by ~8 nats
    err = (logdet.double() - expected).abs().max().item()
    assert err <= tol, f"logdet: max error {err:.3e} nats > {tol:.3e}"


def test_deepcopy_and_pickle_keep_the_load_hooks(tmp_path):
    block = AllInOneBlock([(5, 1, 1)], subnet_constructor=subnet_conv_ln)
    clone = copy.deepcopy(block)
    other = AllInOneBlock([(5, 1, 1)], subnet_constructor=subnet_conv_ln)
    clone.load_state_dict(other.state_dict())
    assert torch.equal(clone.perm_index, other.perm_index)
    torch.save(block, tmp_path / "block.pt")
    loaded = torch.load(tmp_path / "block.pt", weights_only=False)
    state = other.state_dict()
    state["w_perm"] = other.perm_index.clone()
    state["w_perm_inv"] = other.perm_index_inv.clone()
    loaded.load_state_dict(state)
    assert torch.equal(loaded.perm_index, other.perm_index)


@pytest.mark.parametrize("rev", [False, True], ids=["fwd", "rev"])
def test_batch_constant_condition_takes_the_split_subnet_path_with_the_same_result(rev):
    # An expanded (batch-stride 0) condition, as MSFlow's positional encoding, runs its share of
    # conv1 once; the result and every gradient equal those of the concatenated condition.
    torch.manual_seed(5)
    block = AllInOneBlock([(7, 1, 1)], dims_c=[(4, 1, 1)], subnet_constructor=subnet_conv_ln, affine_clamping=1.9)
    enable_fast_paths(block)
    block = block.double()
    x = torch.randn(3, 7, 5, 6, dtype=torch.float64)
    shared = torch.randn(1, 4, 5, 6, dtype=torch.float64).expand(3, -1, -1, -1)
    calls = []
    handle = block.subnet.conv1.register_forward_hook(lambda *args: calls.append(1))
    try:
        y_split, ld_split, gx_split, gp_split = _grads(block, x, [shared], rev)
        assert not calls, "the expanded condition should not go through the concatenating conv1"
        y_cat, ld_cat, gx_cat, gp_cat = _grads(block, x, [shared.contiguous()], rev)
        assert calls, "a per-sample condition goes through conv1 on the concatenation"
    finally:
        handle.remove()
    torch.testing.assert_close(y_split, y_cat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_split, ld_cat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_split, gx_cat, rtol=1e-12, atol=1e-12)
    for name in gp_cat:
        torch.testing.assert_close(gp_split[name], gp_cat[name], rtol=1e-10, atol=1e-12, msg=name)


def test_inference_caches_the_condition_term_until_an_input_changes():
    # Without autograd the batch-constant share of conv1 is computed once and reused; any change
    # of the condition or of conv1's weights (in place or replaced) recomputes it.
    torch.manual_seed(6)
    subnet = subnet_conv_ln(3 + 4, 6).double()
    enable_fast_paths(subnet)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    cond = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    calls = []
    real_conv2d = torch.nn.functional.conv2d

    def counting_conv2d(inp, weight, *args, **kwargs):
        calls.append(inp.shape[0])
        return real_conv2d(inp, weight, *args, **kwargs)

    def expected():
        return subnet(torch.cat([x, cond.expand(2, -1, -1, -1)], dim=1))

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "conv2d", counting_conv2d)
        first = subnet.forward_split(x, [cond.expand(2, -1, -1, -1)])
        again = subnet.forward_split(x, [cond.expand(2, -1, -1, -1)])
        assert calls.count(1) == 1, "the condition term must be computed once and then reused"
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        torch.testing.assert_close(first, expected(), rtol=1e-12, atol=1e-12)
        cond.add_(0.5)  # in place: new version
        torch.testing.assert_close(subnet.forward_split(x, [cond.expand(2, -1, -1, -1)]), expected(), rtol=1e-12, atol=1e-12)
        subnet.conv1.weight.mul_(0.9)
        torch.testing.assert_close(subnet.forward_split(x, [cond.expand(2, -1, -1, -1)]), expected(), rtol=1e-12, atol=1e-12)
        subnet.conv1.bias.data = subnet.conv1.bias.data + 1.0  # replaced storage
        torch.testing.assert_close(subnet.forward_split(x, [cond.expand(2, -1, -1, -1)]), expected(), rtol=1e-12, atol=1e-12)
        cond = torch.randn(1, 4, 5, 6, dtype=torch.float64)  # a new tensor
        torch.testing.assert_close(subnet.forward_split(x, [cond.expand(2, -1, -1, -1)]), expected(), rtol=1e-12, atol=1e-12)
        assert calls.count(1) == 5
    # With autograd nothing is cached: gradients reach conv1 through the condition term.
    out = subnet.forward_split(x, [cond.expand(2, -1, -1, -1)])
    out.sum().backward()
    assert subnet.conv1.bias.grad is not None and subnet.conv1.bias.grad.abs().sum() > 0


def test_condition_cache_follows_autocast():
    torch.manual_seed(7)
    subnet = subnet_conv_ln(3 + 4, 6)
    enable_fast_paths(subnet)
    x = torch.randn(2, 3, 5, 6)
    cond = torch.randn(1, 4, 5, 6).expand(2, -1, -1, -1)
    with torch.no_grad():
        plain = subnet.forward_split(x, [cond])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = subnet.forward_split(x, [cond])
        again = subnet.forward_split(x, [cond])
    assert low.dtype == torch.bfloat16 and plain.dtype == again.dtype == torch.float32
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    torch.testing.assert_close(low.float(), plain, rtol=0.05, atol=0.05)


def test_condition_cache_is_safe_in_inference_mode_and_dropped_on_copy_and_move():
    torch.manual_seed(8)
    subnet = subnet_conv_ln(3 + 4, 6)
    enable_fast_paths(subnet)
    x = torch.randn(2, 3, 5, 6)
    with torch.inference_mode():  # conditions made in inference mode carry no version counter
        cond = torch.randn(1, 4, 5, 6)
        first = subnet.forward_split(x, [cond.expand(2, -1, -1, -1)])
        again = subnet.forward_split(x, [cond.expand(2, -1, -1, -1)])
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert len(subnet._inference_cache) == 0, "inference mode must not fill the cache"
    # A constant computed under inference mode must not leak into autograd later.
    x_grad = x.clone().requires_grad_()
    out = subnet.forward_split(x_grad, [cond.clone().expand(2, -1, -1, -1)])
    out.sum().backward()
    assert x_grad.grad is not None
    plain_cond = torch.randn(1, 4, 5, 6)
    with torch.no_grad():
        subnet.forward_split(x, [plain_cond.expand(2, -1, -1, -1)])
    assert len(subnet._inference_cache) == 2  # conv1's x-weight slice and the condition term
    assert len(copy.deepcopy(subnet)._inference_cache) == 0
    assert len(pickle.loads(pickle.dumps(subnet))._inference_cache) == 0
    subnet.double()
    assert len(subnet._inference_cache) == 0
    with torch.no_grad():
        out = subnet.forward_split(x.double(), [plain_cond.double().expand(2, -1, -1, -1)])
    assert out.dtype == torch.float64
