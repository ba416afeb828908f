"""msflow_aas (models/msflow_aas), the INTERPRETATION of MS-Flow (Acta Automatica Sinica 2024): the
hierarchical perception module against its formula, both level wirings exactly invertible with the
log-det of the exact Jacobian and gradients by gradcheck, the block-triangular structure, the loss,
maps and scores from their definitions, the measured 1/8 FLOP sizing against CS-Flow, the model
protocol, checkpoints and the command line."""

from __future__ import annotations

import csv
import json
import math

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msflow_fast import cli, models
from msflow_fast.engine import SyntheticDefects, fit, write_synthetic_dataset
from msflow_fast.models import complexity, load_model, save
from msflow_fast.models.csflow import CrossScaleFlow
from msflow_fast.models.msflow_aas import (
    HierarchicalFlow,
    HierarchicalPerceptionModule,
    MSFlowAAS,
    MSFlowAASConfig,
    carried_channels,
    up2,
)
from msflow_fast.nn import enable_fast_paths

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ lives beside the package in the checkout
    sys.path.insert(0, str(REPO))

from benchmarks.msflow_aas import freia_composition  # noqa: E402  (the eager composition, shared with the benchmark)

F64 = torch.float64
WIRINGS = ("conditional", "split")


def _randomize(module: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Subnet weights random; the global affines moved randomly around their init (scale 1), so the
    log-det has every term; permutation buffers untouched."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "global_" in name:
                p.add_(0.3 * noise)
            else:
                p.copy_(noise * scale)


def _features(batch: int, channels: int, grid: int, dtype=F64, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, grid // 2**k, grid // 2**k, generator=gen, dtype=dtype) for k in range(3)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _flow(wiring: str, channels: int = 8, dtype=F64, seed: int = 3) -> HierarchicalFlow:
    torch.manual_seed(seed)
    return HierarchicalFlow(channels, blocks_per_level=2, hpm_mid=8, hpm_groups=4, wiring=wiring).to(dtype)


# ---------------------------------------------------------------------------------------------- the HPM subnet


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_hpm_is_its_formula_in_float64(groups):
    torch.manual_seed(0)
    hpm = HierarchicalPerceptionModule(5, 6, mid=4 * groups, groups=groups).to(F64)
    u = torch.randn(2, 5, 7, 9, dtype=F64)
    h = F.relu(F.conv2d(u, hpm.conv_in.weight, hpm.conv_in.bias))
    g = torch.split(h, 4, dim=1)
    ys = [g[0]]
    for i in range(1, groups):
        conv = hpm.convs[i - 1]
        ys.append(F.relu(F.conv2d(g[i] + ys[-1], conv.weight, conv.bias, padding=1)))
    expected = F.conv2d(torch.cat(ys, dim=1), hpm.conv_out.weight, hpm.conv_out.bias)
    assert torch.allclose(hpm(u), expected, rtol=1e-12, atol=1e-12)
    assert sorted(hpm.state_dict()) == sorted(
        ["conv_in.weight", "conv_in.bias", "conv_out.weight", "conv_out.bias"]
        + [f"convs.{i}.{p}" for i in range(groups - 1) for p in ("weight", "bias")]
    )


def test_hpm_receptive_field_grows_group_by_group():
    """Group i sees 2i - 1 pixels: the output's dependence on the input spans 2s - 1 pixels in all."""
    torch.manual_seed(1)
    for groups in (1, 2, 4):
        hpm = HierarchicalPerceptionModule(3, 3, mid=2 * groups, groups=groups).to(F64)
        with torch.no_grad():
            for p in hpm.parameters():
                p.abs_().add_(0.1)  # positive weights and biases: every ReLU open, the footprint is the architecture's
        u = torch.rand(1, 3, 15, 15, dtype=F64).add_(0.1).requires_grad_(True)
        hpm(u)[0, :, 7, 7].sum().backward()
        rows = (u.grad[0].abs().sum(dim=(0, 2)) > 0).nonzero().flatten()
        assert int(rows.max() - rows.min()) + 1 == 2 * groups - 1


def test_hpm_refuses_bad_sizes():
    with pytest.raises(ValueError, match="multiple of groups"):
        HierarchicalPerceptionModule(4, 4, mid=10, groups=4)
    with pytest.raises(ValueError, match="positive sizes"):
        HierarchicalPerceptionModule(4, 0, mid=8, groups=4)


# ---------------------------------------------------------------------------------------------- the flow


@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (F64, 1e-10)])
def test_inverse_of_forward_returns_the_input(wiring, dtype, tol):
    flow = _flow(wiring, channels=10, dtype=dtype)
    _randomize(flow, seed=4)
    xs = _features(3, 10, 8, dtype=dtype, seed=5)
    z, logdet = flow(xs)
    assert [t.shape[1] for t in z] == flow.latent_channels()
    assert sum(t[0].numel() for t in z) == sum(x[0].numel() for x in xs)  # a bijection of R^D
    back, logdet_rev = flow(z, rev=True)
    assert max(_rel(a, b) for a, b in zip(back, xs)) <= tol
    assert torch.allclose(logdet_rev, -logdet, rtol=tol, atol=tol)
    assert logdet.abs().min() > 1e-3 and min((a[:, : b.shape[1]] - b[:, : a.shape[1]]).abs().max().item() for a, b in zip(z, xs)) > 1e-3


@pytest.mark.parametrize("wiring", WIRINGS)
def test_log_det_equals_the_exact_jacobian_and_gradients_pass_gradcheck(wiring):
    flow = _flow(wiring, channels=8)
    _randomize(flow, scale=0.3, seed=6)
    shapes = [(1, 8, 4, 4), (1, 8, 2, 2), (1, 8, 1, 1)]
    sizes = [math.prod(s) for s in shapes]

    def flat_forward(v: torch.Tensor) -> torch.Tensor:
        z, _ = flow([t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes)])
        return torch.cat([t.flatten() for t in z])

    v = torch.randn(sum(sizes), dtype=F64, generator=torch.Generator().manual_seed(7))
    jacobian = torch.autograd.functional.jacobian(flat_forward, v)
    _, logdet = flow([t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes)])
    slogdet = torch.linalg.slogdet(jacobian)
    assert slogdet.sign.abs().item() == 1.0
    assert abs(slogdet.logabsdet.item() - logdet.item()) <= 1e-9 * max(1.0, abs(logdet.item()))

    xs = [torch.randn((2, *s[1:]), dtype=F64, requires_grad=True) for s in shapes]

    def outputs(*inputs):
        z, ld = flow(list(inputs))
        return (*z, ld)

    assert torch.autograd.gradcheck(outputs, tuple(xs), eps=1e-6, atol=1e-6)
    # and with respect to parameters of every kind (global affine, subnet convs)
    names = [n for n, p in flow.named_parameters() if p.requires_grad][:4]
    base = dict(flow.named_parameters())

    def functional(*values):
        state = {**base, **dict(zip(names, values))}
        z, ld = torch.func.functional_call(flow, state, ([x.detach() for x in xs],))
        return (*z, ld)

    inputs = tuple(base[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(functional, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("wiring", WIRINGS)
def test_equals_the_freia_composition_on_the_same_weights(wiring):
    """The same maths composed eagerly from FrEIA 0.2's AllInOneBlock (permutations as 1x1 convs,
    conditions concatenated by FrEIA) with the HPMs' plain path: latents, log-dets and inverse equal
    in float64; the FrEIA blocks take the same state_dict keys."""
    flow = _flow(wiring, channels=9 if wiring == "conditional" else 16)
    _randomize(flow, seed=12)
    eager = freia_composition(flow)
    assert sorted(eager.state_dict()) == sorted(flow.state_dict())
    xs = _features(2, flow.channels, 8, seed=13)
    z, logdet = flow(xs)
    z_ref, logdet_ref = eager(xs)
    assert max(_rel(a, b) for a, b in zip(z, z_ref)) <= 1e-12
    assert torch.allclose(logdet, logdet_ref, rtol=1e-12)
    back, _ = eager(z, rev=True)
    assert max(_rel(a, b) for a, b in zip(back, xs)) <= 1e-10


def test_conditional_wiring_is_block_triangular_coarse_to_fine():
    flow = _flow("conditional")
    _randomize(flow, seed=8)
    xs = _features(2, 8, 8, seed=9)
    z, _ = flow(xs)
    moved = [xs[0], xs[1] + 0.5, xs[2]]  # change level 1 only
    z2, _ = flow(moved)
    assert torch.equal(z2[2], z[2])  # coarser level: untouched
    assert not torch.allclose(z2[1], z[1]) and not torch.allclose(z2[0], z[0])  # finer levels: conditioned on it
    z3, _ = flow([xs[0] + 0.5, xs[1], xs[2]])
    assert torch.equal(z3[1], z[1]) and torch.equal(z3[2], z[2])
    # the condition is the upsampled coarser latent: level 0 alone, given Up(z_1), gives z_0
    alone, _ = flow.levels[0](xs[0], c=[up2(z[1], xs[0].shape[-2:])])
    assert torch.equal(alone, z[0])


def test_split_wiring_factors_out_and_depth_to_space():
    flow = _flow("split", channels=16)
    _randomize(flow, seed=10)
    xs = _features(2, 16, 8, seed=11)
    z, logdet = flow(xs)
    r = carried_channels(16)
    assert r == 8 and flow.level_channels == [18, 18, 16] and flow.latent_channels() == [18, 10, 8]
    h2, ld2 = flow.levels[2](xs[2])
    assert torch.equal(z[2], h2[:, : 16 - r])
    h1, ld1 = flow.levels[1](torch.cat([xs[1], F.pixel_shuffle(h2[:, 16 - r :], 2)], dim=1))
    assert torch.equal(z[1], h1[:, : 18 - r])
    h0, ld0 = flow.levels[0](torch.cat([xs[0], F.pixel_shuffle(h1[:, 18 - r :], 2)], dim=1))
    assert torch.equal(z[0], h0)
    assert torch.allclose(logdet, ld0 + ld1 + ld2, rtol=1e-12)


def test_flow_refuses_bad_inputs():
    flow = _flow("conditional")
    xs = _features(1, 8, 8)
    with pytest.raises(ValueError, match="takes 3 feature maps"):
        flow(xs[:2])
    with pytest.raises(ValueError, match=r"feature maps 1 must be \[B, 8, h, w\]"):
        flow([xs[0], xs[1][:, :4], xs[2]])
    with pytest.raises(ValueError, match="twice the next one's"):
        flow([xs[0], xs[0], xs[2]])
    with pytest.raises(ValueError, match="wiring"):
        HierarchicalFlow(8, wiring="dense")
    with pytest.raises(ValueError, match="at least 8 feature channels"):
        HierarchicalFlow(6, wiring="split")


# ---------------------------------------------------------------------------------------------- FLOPs


def _flow_flops(flow: nn.Module, channels: int, grid: int) -> int:
    xs = [torch.randn(1, channels, grid // 2**k, grid // 2**k) for k in range(3)]
    with torch.no_grad():
        return complexity.count_flops(flow, xs).flops


@pytest.mark.parametrize("grid", [8])  # 256 px; 768 px (grid 24) is in the README and MSFlowAASConfig's docstring
def test_default_flows_cost_about_an_eighth_of_cs_flows(grid):
    torch.manual_seed(0)
    defaults = MSFlowAASConfig()
    ours = HierarchicalFlow(304, blocks_per_level=defaults.blocks_per_level, hpm_mid=defaults.hpm_mid, hpm_groups=defaults.hpm_groups)
    cs = CrossScaleFlow(304)
    with complexity.without_fast_paths(ours), complexity.without_fast_paths(cs):
        ratio = _flow_flops(cs, 304, grid) / _flow_flops(ours, 304, grid)
    assert 7.5 <= ratio <= 8.5, ratio
    # the HPM's closed form: per pixel dim_in * mid + (s - 1) * 9 * w^2 + mid * dim_out multiply-adds
    pixels = sum((grid // 2**k) ** 2 for k in range(3))
    conditioned = sum((grid // 2**k) ** 2 for k in range(2))
    mid, s = defaults.hpm_mid, defaults.hpm_groups
    macs = defaults.blocks_per_level * ((152 * mid + (s - 1) * 9 * (mid // s) ** 2 + mid * 304) * pixels + 304 * mid * conditioned)
    with complexity.without_fast_paths(ours):
        assert _flow_flops(ours, 304, grid) == 2 * macs


# ---------------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = MSFlowAAS(input_size=128, backbone="efficientnet_b0", pretrained=False, blocks_per_level=2, hpm_mid=16)
    return model.eval()


def test_registered_as_an_interpretation(capsys):
    assert "msflow_aas" in models.available()
    cls = models.get("msflow_aas")
    assert cls is MSFlowAAS and cls.interpretation is True
    for text in (cls.__doc__, MSFlowAASConfig.__doc__, cls.summary):
        assert "interpretation" in text.lower()
    assert cli.main(["models"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if "msflow_aas" in row)
    assert "interpretation" in line.lower()


def test_loss_maps_and_scores_from_their_definitions(tiny):
    images = torch.randn(2, 3, 128, 128)
    feats = tiny.frozen_features(images)
    assert [tuple(f.shape) for f in feats] == [(2, 192, 4, 4), (2, 192, 2, 2), (2, 192, 1, 1)]
    for k, f in enumerate(feats):
        scaled = images if k == 0 else F.interpolate(images, size=(128 // 2**k,) * 2, mode="nearest")
        assert torch.equal(f, tiny.extractor(scaled)[0])
    z, logdet = tiny.flow(feats)
    dims = sum(t[0].numel() for t in z)
    expected = (0.5 * sum(t.square().flatten(1).sum(1) for t in z) - logdet).mean() / dims
    assert torch.allclose(tiny.loss({"features": feats}), expected, rtol=1e-5)
    assert torch.equal(tiny.loss(images), tiny.loss({"features": feats}))

    pred = tiny.predict(images)
    ups = [F.interpolate(t.square().mean(1, keepdim=True), size=(128, 128), mode="bilinear", align_corners=False)[:, 0] for t in z]
    assert torch.allclose(pred.maps["anomaly_map_sum"], ups[0] + ups[1] + ups[2], rtol=1e-5, atol=1e-6)
    assert torch.allclose(pred.maps["anomaly_map_product"], ups[0] * ups[1] * ups[2], rtol=1e-5, atol=1e-6)
    assert torch.equal(pred.anomaly_map, pred.maps["anomaly_map_sum"])
    score = 0.5 * torch.cat([t.square().flatten(1) for t in z], 1).mean(1)
    assert torch.allclose(pred.score, score, rtol=1e-5)
    k = max(1, int(0.03 * 128 * 128))
    top = pred.maps["anomaly_map_sum"].flatten(1).topk(k, dim=1).values.mean(1)
    assert torch.allclose(pred.maps["score_top_k"], top, rtol=1e-5)

    other = MSFlowAAS(tiny.config.replace(anomaly_map="product", score="top_k"))
    other.load_state_dict(tiny.state_dict())
    again = other.eval().predict(images)
    assert torch.equal(again.anomaly_map, pred.maps["anomaly_map_product"])
    assert torch.allclose(again.score, pred.maps["anomaly_map_product"].flatten(1).topk(k, dim=1).values.mean(1), rtol=1e-5)


def test_fast_paths_change_only_rounding(tiny):
    images = torch.randn(4, 3, 256, 256)
    model = MSFlowAAS(tiny.config.replace(input_size=256))
    model.load_state_dict(tiny.state_dict())
    model.eval()
    fast = model.predict(images)
    enable_fast_paths(model, False)
    plain = model.predict(images)
    assert _rel(fast.score, plain.score) <= 1e-4 and _rel(fast.anomaly_map, plain.anomaly_map) <= 1e-4


def test_recipe_and_bad_configs():
    stage = MSFlowAAS.recipe_for(MSFlowAASConfig()).stages[0]
    assert (stage.epochs, stage.batch_size, stage.lr, stage.eps, stage.weight_decay, stage.grad_clip) == (240, 16, 2e-4, 1e-4, 1e-5, 1.0)
    for field, value, match in [
        ("hpm_mid", 10, "multiple of hpm_groups"),
        ("wiring", "dense", "wiring must be one of"),
        ("score", "max", "score must be one of"),
        ("anomaly_map", "mean", "anomaly_map must be one of"),
        ("top_k", 0.0, r"top_k must be a finite number in \(0, 1\]"),
        ("clamp", -1.0, "clamp must be a finite number > 0"),
        ("blocks_per_level", 0, "blocks_per_level must be an int >= 1"),
        ("pretrained", 1, "pretrained must be a bool"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            MSFlowAASConfig(**{field: value})
    with pytest.raises(ValueError, match="multiples of 128"):
        MSFlowAAS(input_size=192, backbone=nn.Conv2d(3, 8, 32, stride=32), hpm_mid=4)


@pytest.mark.parametrize("wiring", WIRINGS)
def test_checkpoint_round_trip(tiny, tmp_path, wiring):
    model = tiny if wiring == "conditional" else MSFlowAAS(tiny.config.replace(wiring="split")).eval()
    save(model, tmp_path / "aas.pt")
    again = load_model(tmp_path / "aas.pt").eval()
    images = torch.randn(2, 3, 128, 128)
    assert type(again) is MSFlowAAS and again.config == model.config
    assert torch.equal(again.predict(images).score, model.predict(images).score)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_feature_cache_gives_the_same_training():
    data = SyntheticDefects("train", 6, 128, seed=0)
    runs = {}
    for mode in ("off", "memory"):
        torch.manual_seed(0)
        model = MSFlowAAS(input_size=128, backbone="efficientnet_b0", pretrained=False, blocks_per_level=1, hpm_mid=8)
        runs[mode] = fit(model, data, epochs=2, batch_size=4, seed=0, progress=False, feature_cache=mode, lr=1e-3)
    assert runs["memory"].feature_cache["train"].storage == "memory"
    assert runs["memory"].losses == pytest.approx(runs["off"].losses, rel=1e-5)
    assert runs["off"].losses[-1] < runs["off"].losses[0]


@pytest.mark.parametrize("wiring", WIRINGS)
def test_cli_train_eval_predict_on_the_demo_data(tmp_path, capsys, wiring):
    root = tmp_path / "data"
    write_synthetic_dataset(root, "syn", num_train=4, num_test=4, input_size=128, seed=2)
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "msflow_aas", "--data", str(root), "--category", "syn", "--out", str(out), "--epochs", "1",
                   "--batch-size", "4", "--no-progress", "--input-size", "128", "--backbone", "efficientnet_b0", "--no-pretrained",
                   "--blocks-per-level", "1", "--hpm-mid", "8", "--wiring", wiring])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and 0.0 <= metrics["image_auroc"] <= 1.0
    assert load_model(out / "last.pt").config.wiring == wiring
    rc = cli.main(["eval", "--data", str(root), "--category", "syn", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "ev"), "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["image_auroc"] == pytest.approx(metrics["image_auroc"])
    rc = cli.main(["predict", "--checkpoint", str(out), "--input", str(root / "syn" / "test" / "good"), "--out", str(tmp_path / "pred"), "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "pred" / "scores.csv").open()))
    assert len(rows) == len(list((root / "syn" / "test" / "good").glob("*.png"))) and all(float(r["score"]) >= 0 for r in rows)
