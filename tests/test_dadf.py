"""DADF (models/dadf): the transformer's sizes for WRN50 and R18, memorial attention as a convex
combination of memory values (float64), the flow's inverse and log-det against the exact Jacobian,
gradcheck, the stage-1 loss in token space, the stage-2 norm, loss, map and scores from their
definitions, bf16 with float32 flows, the eager composition (torch MultiheadAttention, FrEIA 0.2) on
the same weights, the two-stage recipe through ``fit`` with per-stage memory and disk caches,
checkpoints, the official code's weight files, ``torch.export``, and the command line on the demo
data and on a LOCO-shaped folder."""

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
from msflow_fast.engine.feature_cache import cache_key
from msflow_fast.engine.train import seed_everything
from msflow_fast.models import export_predict, load_model, output_names, save
from msflow_fast.models.dadf import (
    DADF,
    OFFICIAL_RECIPE,
    DADFConfig,
    DualAttention,
    DualAttentionTransformer,
    build_scale_flow,
    load_official,
    sincos_positions_2d,
)
from test_loco import CATEGORY as LOCO_CATEGORY
from test_loco import write_loco

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ lives beside the package in the checkout
    sys.path.insert(0, str(REPO))

from benchmarks.dadf import EagerDADF  # noqa: E402  (the eager composition, shared with the benchmark)

F64 = torch.float64
TINY = dict(input_size=64, backbone="resnet18", pretrained=False, embed_dim=16, depth=1, num_heads=2, flow_steps=2)
TINY_FLAGS = ["--input-size", "64", "--backbone", "resnet18", "--no-pretrained", "--embed-dim", "16", "--depth", "1",
              "--num-heads", "2", "--flow-steps", "2"]
WRN50 = ([256, 512, 1024], [(64, 64), (32, 32), (16, 16)])
R18 = ([64, 128, 256], [(64, 64), (32, 32), (16, 16)])


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randomize(module: nn.Module, scale: float = 0.2, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.add_(0.3 * noise) if "global_" in name else p.copy_(noise * scale)


@pytest.fixture(scope="module")
def _tiny_model() -> DADF:
    torch.manual_seed(0)
    model = DADF(**TINY)
    _randomize(model.transformer, 0.1, seed=1)
    _randomize(model.flows, 0.05, seed=2)
    return model.eval()


@pytest.fixture
def tiny(_tiny_model) -> DADF:
    """The module's tiny model, in stage 1 whatever stage an earlier test left it in."""
    _tiny_model.set_stage("reconstruction")
    return _tiny_model


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name, maps, total, embed, heads", [
    ("wide_resnet50_2", WRN50, 213_358_048, 3_442_080, 10_329_088),
    ("resnet18", R18, 203_030_752, 861_600, 2_582_272),
])
def test_transformer_parameter_counts(name, maps, total, embed, heads):
    """The code's shapes at 256 px (MODELS_SPEC: about 213 M / 203 M; 24.9 M per dual block)."""
    with torch.device("meta"):
        t = DualAttentionTransformer(*maps)
    assert (t.tokens, t.dim, t.patches) == (256, 1440, [4, 2, 1])
    assert _count(t.blocks[0]) == 24_901_920 and _count(t.blocks) == 8 * 24_901_920
    assert (_count(t.embed), _count(t.heads), t.memory.shape) == (embed, heads, (1, 256, 1440))
    assert [h.out_features for h in t.heads] == [16 * maps[0][0], 4 * maps[0][1], maps[0][2]]
    assert _count(t) == total == _count(t.blocks) + embed + heads + 256 * 1440 + 2 * 1440
    assert not any(b.requires_grad for b in t.buffers()) and "positions" not in t.state_dict()


@pytest.mark.parametrize(("maps", "flow_params", "norm_params"), [(WRN50, 49_803_264, 11_010_048), (R18, 3_161_088, 2_752_512)],
                         ids=["wide_resnet50_2", "resnet18"])
def test_flow_and_norm_parameter_counts(maps, flow_params, norm_params):
    channels, grids = maps
    flows = [build_scale_flow(3 * c, h, w, 8) for c, (h, w) in zip(channels, grids)]
    kernels = [[m.subnet[0].kernel_size[0] for m in f] for f in flows]
    assert kernels == [[3, 1] * 4] * 3 and all(m.subnet[0].groups == m.subnet[0].in_channels for f in flows for m in f)
    assert sum(_count(f) for f in flows) == flow_params
    assert sum(2 * 3 * c * h * w for c, (h, w) in zip(channels, grids)) == norm_params


def test_shapes_per_stage(tiny):
    images = torch.randn(2, 3, 64, 64)
    assert tiny.channels == [64, 128, 256] and tiny.grids == [(16, 16), (8, 8), (4, 4)] and tiny.transformer.patches == [4, 2, 1]
    tiny.set_stage("reconstruction")
    prior = tiny.frozen_features(images)
    assert [tuple(f.shape) for f in prior] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    rec = tiny.transformer(prior)
    assert [r.shape for r in rec.own] == [p.shape for p in prior] and [r.shape for r in rec.memory] == [p.shape for p in prior]
    with pytest.raises(ValueError, match=r"\(h, w\) = \[\(16, 16\)"):
        tiny.loss({"features": [p[..., :-1, :] for p in prior]})  # cached maps of another grid
    tiny.set_stage("flow")
    fused = tiny.frozen_features(images)
    assert [tuple(f.shape) for f in fused] == [(2, 192, 16, 16), (2, 384, 8, 8), (2, 768, 4, 4)]
    for f, e, own, mem in zip(fused, prior, rec.own, rec.memory):
        assert torch.equal(f, torch.cat([e, own, mem], 1))
    latents, logdets = tiny(images)
    assert [z.shape for z in latents] == [f.shape for f in fused] and all(ld.shape == (2,) for ld in logdets)
    tiny.set_stage("reconstruction")


def test_positions_are_the_2d_sincos_table():
    pe = sincos_positions_2d(8, 2, 3)  # quarter 2: omega = [1, 1e-2]
    row, col = 1, 2
    token = pe[row * 3 + col]
    expected = torch.tensor([math.sin(col), math.sin(col * 1e-2), math.cos(col), math.cos(col * 1e-2),
                             math.sin(row), math.sin(row * 1e-2), math.cos(row), math.cos(row * 1e-2)], dtype=F64)
    assert torch.allclose(token, expected, atol=1e-12)
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_positions_2d(6, 2, 2)


# ---------------------------------------------------------------------------------------------- attention


def _attention(dim=8, heads=2):
    torch.manual_seed(3)
    attn = DualAttention(dim, heads).double()
    _randomize(attn, 0.5, seed=4)
    return attn


def test_memorial_attention_is_a_convex_combination_of_memory_values():
    attn = _attention()
    x, memory = torch.randn(2, 5, 8, dtype=F64), torch.randn(2, 5, 8, dtype=F64)
    own, recalled = attn.mixed(x, memory)
    d, h = 8, 2
    w, b = attn.qkv.weight, attn.qkv.bias
    split = lambda t: t.view(2, 5, h, d // h).transpose(1, 2)  # noqa: E731
    q_m, k_x, v_m = split(memory @ w[:d].T + b[:d]), split(x @ w[d : 2 * d].T + b[d : 2 * d]), split(memory @ w[2 * d :].T + b[2 * d :])
    weights = torch.softmax(q_m @ k_x.transpose(-1, -2) / math.sqrt(d // h), dim=-1)  # queries: memory; keys: features
    assert torch.allclose(recalled, (weights @ v_m).transpose(1, 2).reshape(2, 5, d), atol=1e-12)
    # inside the convex hull of the memory's value rows, coordinate by coordinate
    values = (memory @ w[2 * d :].T + b[2 * d :]).unsqueeze(1)
    assert bool((recalled >= values.amin(2) - 1e-12).all() and (recalled <= values.amax(2) + 1e-12).all())
    # one memory value for every token: the features change the weights only, so the output is that value
    same = memory[:, :1].expand(-1, 5, -1)
    for features in (x, 10 * torch.randn_like(x)):
        _, out = attn.mixed(features, same)
        assert torch.allclose(out, (same @ w[2 * d :].T + b[2 * d :]), atol=1e-12)
    # ... while the self stream's output does depend on the features' values
    assert not torch.allclose(attn.mixed(x, same)[0], attn.mixed(2 * x, same)[0])
    # the self stream: ordinary attention on the features
    q_x, v_x = split(x @ w[:d].T + b[:d]), split(x @ w[2 * d :].T + b[2 * d :])
    ref = torch.softmax(q_x @ k_x.transpose(-1, -2) / math.sqrt(d // h), -1) @ v_x
    assert torch.allclose(own, ref.transpose(1, 2).reshape(2, 5, d), atol=1e-12)
    with pytest.raises(ValueError, match="as many memory tokens as feature tokens"):
        attn.mixed(x, memory[:, :4])


def test_dual_attention_passes_gradcheck():
    attn = _attention()
    x = torch.randn(1, 3, 8, dtype=F64, requires_grad=True)
    memory = torch.randn(1, 3, 8, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, m: attn(a, m), (x, memory))


# ---------------------------------------------------------------------------------------------- flow


def _tiny_flow(kernel3_only=False):
    seed_everything(5)  # the permutations come from NumPy's RNG
    flow = build_scale_flow(4, 3, 3, 2, conv3x3_only=kernel3_only).double()
    _randomize(flow, 0.3, seed=6)
    return flow


def test_flow_inverse_and_log_det_against_the_exact_jacobian():
    flow = _tiny_flow()
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    z, logdet = flow(x)
    back, _ = flow(z, rev=True)
    assert torch.allclose(back, x, atol=1e-10) and not torch.allclose(z, x)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 4, 3, 3))[0].flatten(), x[i].flatten())
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0 and logabs.item() == pytest.approx(logdet[i].item(), abs=1e-9)  # the permutations' sign is +-1


def test_flow_passes_gradcheck():
    flow = _tiny_flow()
    x = torch.randn(1, 4, 3, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: flow(v), (x,))


# ---------------------------------------------------------------------------------------------- losses, maps, scores


def _patchify(e: torch.Tensor, p: int) -> torch.Tensor:
    """The code's patchify: ``[B, C, h p, w p] -> [B, h w, p p C]``, per token ``(p_row, p_col, c)``."""
    b, c, hp, wp = e.shape
    h, w = hp // p, wp // p
    return torch.einsum("nchpwq->nhwpqc", e.reshape(b, c, h, p, w, p)).reshape(b, h * w, p * p * c)


def test_stage1_loss_is_the_six_token_space_mses(tiny):
    tiny.set_stage("reconstruction")
    images = torch.randn(2, 3, 64, 64)
    prior = tiny.frozen_features(images)
    t = tiny.transformer
    x = torch.cat([emb(f).flatten(2).transpose(1, 2) for emb, f in zip(t.embed, prior)], -1) + t.positions
    memory = (t.memory + t.positions).expand(2, -1, -1)
    for block in t.blocks:
        x, memory = block(x, memory)
    expected = 0.0
    for k, (head, e) in enumerate(zip(t.heads, prior)):
        target = _patchify(e, t.patches[k])
        expected = expected + ((head(t.norm(memory)) - target) ** 2).mean() + ((head(t.norm(x)) - target) ** 2).mean()
    assert torch.allclose(tiny.loss(images), expected, rtol=1e-5)
    assert torch.equal(tiny.loss({"features": prior}), tiny.loss(images))
    with pytest.raises(ValueError, match="stage 'reconstruction' takes 3 maps"):
        tiny.loss({"features": [torch.cat([p, p, p], 1) for p in prior]})


def test_stage2_norm_loss_map_and_scores_from_their_definitions(tiny):
    tiny.set_stage("flow")
    images = torch.randn(2, 3, 64, 64)
    fused = tiny.frozen_features(images)
    latents, logdets = tiny.flows_of(fused)
    for k, (f, z) in enumerate(zip(fused, latents)):
        normed = F.layer_norm(f, f.shape[1:], tiny.norms[k].weight, tiny.norms[k].bias, eps=1e-5)
        assert torch.allclose(tiny.flows[k](normed)[0], z, atol=1e-5)
    expected = sum((0.5 * z.square().flatten(1).sum(1) - ld).mean() for z, ld in zip(latents, logdets))
    assert torch.allclose(tiny.loss({"features": fused}), expected, rtol=1e-5)
    assert torch.allclose(tiny.loss(images), expected, rtol=1e-5)

    pred = tiny.predict(images)
    zs = [z.double() for z in latents]
    ups = [F.interpolate((-torch.exp(1 - 0.5 * z.square().mean(1, keepdim=True))), size=(64, 64), mode="bilinear", align_corners=False)
           for z in zs]
    amap = torch.cat(ups, 1).mean(1)
    assert pred.anomaly_map.shape == (2, 64, 64) and bool((pred.anomaly_map <= 0).all() and (pred.anomaly_map >= -math.e).all())
    assert torch.allclose(pred.anomaly_map.double(), amap, rtol=1e-5, atol=1e-6)
    assert torch.allclose(pred.score.double(), amap.flatten(1).amax(1), rtol=1e-5)
    assert torch.equal(pred.score, pred.maps["score_max"])
    assert torch.allclose(pred.maps["score_log_space"].double(), (-torch.log(-amap)).flatten(1).amax(1), rtol=1e-5)
    other = DADF(tiny.config.replace(score="log_space"))
    other.load_state_dict(tiny.state_dict())
    assert torch.equal(other.eval().predict(images).score, pred.maps["score_log_space"])
    with pytest.raises(ValueError, match="stage 'flow' takes 3 maps"):
        tiny.loss({"features": tiny.extractor(images)})
    tiny.set_stage("reconstruction")


def test_bf16_transformer_with_float32_flows_and_log_dets(tiny):
    model = DADF(tiny.config.replace(transformer_precision="bfloat16"))
    model.load_state_dict(tiny.state_dict())
    model.eval().set_stage("flow")
    images = torch.randn(2, 3, 64, 64)
    tiny.set_stage("flow")
    ref, bf = tiny.frozen_features(images), model.frozen_features(images)
    assert all(f.dtype == torch.float32 for f in bf)
    assert not all(torch.equal(a, b) for a, b in zip(ref, bf))  # the transformer ran in bf16
    assert all((a - b).norm() <= 0.05 * a.norm() for a, b in zip(ref, bf))
    for run, fused in ((model, bf), (tiny, ref)):  # a bf16 run's autocast does not reach the flows
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latents, logdets = run.flows_of(fused)
            loss = run.loss({"features": fused})
        assert all(z.dtype == torch.float32 for z in latents) and all(ld.dtype == torch.float32 for ld in logdets)
        assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert model.predict(images).score.dtype == torch.float32
    tiny.set_stage("reconstruction")


# ---------------------------------------------------------------------------------------------- protocol


def test_registry_recipe_presets_and_bad_configs():
    assert models.get("dadf") is DADF and "dadf" in models.available()
    first, second = OFFICIAL_RECIPE.stages
    assert (first.name, first.optimizer, first.lr, first.betas, first.weight_decay, first.epochs, first.batch_size) == (
        "reconstruction", "adamw", 1e-4, (0.9, 0.95), 0.01, 200, 8)
    assert (second.name, second.optimizer, second.lr, second.weight_decay, second.epochs, second.batch_size) == (
        "flow", "adam", 1e-3, 1e-5, 15, 16)
    assert first.grad_clip is None and second.grad_clip is None and DADF.recipe_for(DADFConfig()) is OFFICIAL_RECIPE
    c = DADFConfig()
    assert (c.backbone, c.weights_tag, c.token_dim, c.depth, c.num_heads, c.flow_steps, c.clamp_alpha, c.conv3x3_only) == (
        "wide_resnet50_2", "tv_in1k", 1440, 8, 8, 8, 2.0, False)
    assert set(DADF.presets) == {"wide_resnet50_2", "resnet18", "resnet34"}
    with pytest.raises(ValueError, match="unknown DADF preset 'r50'; presets: wide_resnet50_2, resnet18, resnet34"):
        DADF.from_preset("r50")
    for field, value, match in [
        ("embed_dim", 15, "multiple of 4"),
        ("num_heads", 7, "num_heads=7 must divide"),
        ("depth", 0, "depth must be an int >= 1"),
        ("score", "mean", "score must be one of"),
        ("transformer_precision", "fp16", "transformer_precision must be one of"),
        ("clamp_alpha", 0, "clamp_alpha must be a finite number > 0"),
        ("clamp_alpha", float("inf"), "clamp_alpha must be a finite number > 0"),
        ("mlp_ratio", float("inf"), "mlp_ratio must be a finite number"),
        ("mlp_ratio", 1e-6, "gives the dual blocks' MLP no hidden unit"),
        ("out_indices", (1, 1, 2), "increasing without repeats"),
        ("out_indices", (), "out_indices must be a non-empty"),
        ("weights_tag", "", "weights_tag must be"),
        ("pretrained", 1, "pretrained must be a bool"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            DADFConfig(**{field: value})
    with pytest.raises(ValueError, match="divisible by the backbone's largest stride 16"):
        DADF(**{**TINY, "input_size": 72})
    with pytest.raises(ValueError, match="no DADF stage 'train'"):
        DADF.set_stage(DADF.__new__(DADF), "train")


def test_stages_set_what_trains_and_the_frozen_fingerprint(tiny):
    model = DADF(tiny.config)
    model.load_state_dict(tiny.state_dict())
    model.set_stage("reconstruction")
    assert model.stage_parameters("reconstruction") == list(model.transformer.parameters())
    assert all(p.requires_grad for p in model.transformer.parameters()) and not any(p.requires_grad for p in model.flows.parameters())
    first = model.frozen_fingerprint()
    model.set_stage("flow")
    assert not any(p.requires_grad for p in model.transformer.parameters()) and all(p.requires_grad for p in model.norms.parameters())
    second = model.frozen_fingerprint()
    assert second != first
    with torch.no_grad():
        model.transformer.memory.add_(1.0)
    assert model.frozen_fingerprint() != second  # stage 2's cache depends on the trained transformer
    model.set_stage("reconstruction")
    assert model.frozen_fingerprint() == first  # stage 1's does not
    with pytest.raises(ValueError, match="images must be 64x64"):
        model.predict(torch.randn(1, 3, 128, 128))


def test_both_stages_through_fit_with_the_feature_cache():
    data = SyntheticDefects("train", 4, 64, seed=0)
    runs = {}
    for mode in ("off", "memory"):
        seed_everything(0)  # the flows' permutations come from NumPy's RNG
        model = DADF(**TINY)
        frozen = {k: v.clone() for k, v in model.transformer.state_dict().items()}
        runs[mode] = (fit(model, data, epochs=2, batch_size=2, seed=0, progress=False, feature_cache=mode, lr=1e-3), model)
        assert any(not torch.equal(frozen[k], v) for k, v in model.transformer.state_dict().items())
    result, model = runs["memory"]
    assert result.stages == [("reconstruction", 2), ("flow", 2)]
    reports = result.feature_cache
    assert reports["reconstruction"].storage == "memory" and reports["flow"].storage == "memory"
    assert reports["flow"].bytes == 3 * reports["reconstruction"].bytes == 3 * 4 * 4 * (64 * 256 + 128 * 64 + 256 * 16)
    assert result.losses == pytest.approx(runs["off"][0].losses, rel=1e-4)
    # stage 2 trained the flows on the frozen transformer: resuming only stage 2 leaves it untouched
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    flows_before = {k: v.clone() for k, v in model.flows.state_dict().items()}
    fit(model, data, stages=["flow"], epochs=1, batch_size=2, seed=0, progress=False, feature_cache="memory", lr=1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.transformer.state_dict().items())
    assert any(not torch.equal(flows_before[k], v) for k, v in model.flows.state_dict().items())


def test_both_stages_train_under_bf16_autocast():
    seed_everything(0)
    model = DADF(**TINY)
    result = fit(model, SyntheticDefects("train", 4, 64, seed=0), epochs=1, batch_size=2, seed=0, progress=False, amp="bf16",
                 feature_cache="memory", lr=1e-3)
    assert result.stages == [("reconstruction", 1), ("flow", 1)] and all(math.isfinite(v) for v in result.losses)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, logdets = model(torch.randn(2, 3, 64, 64))
    assert all(ld.dtype == torch.float32 for ld in logdets)


def test_disk_cache_is_per_stage(tmp_path):
    data = SyntheticDefects("train", 4, 64, seed=0)
    seed_everything(0)
    model = DADF(**TINY)
    out = tmp_path / "run"
    options = dict(epochs=1, batch_size=2, seed=0, progress=False, feature_cache="disk", out_dir=out, lr=1e-3, overwrite=True)
    first = fit(model, data, **options)
    assert [(r.storage, r.reused) for r in first.feature_cache.values()] == [("disk", False), ("disk", False)]
    meta = json.loads((out / "feature_cache" / "meta.json").read_text())
    model.set_stage("flow")
    assert meta["key"] == cache_key(model, data, "flow", None, None) and [m["shape"][0] for m in meta["maps"]] == [192, 384, 768]
    assert fit(model, data, stages=["flow"], **options).feature_cache["flow"].reused  # same transformer: stage 2's features
    back = fit(model, data, stages=["reconstruction"], **options)  # stage 1 never takes stage 2's entries
    assert not back.feature_cache["reconstruction"].reused and math.isfinite(back.losses[0])


def test_equals_the_eager_composition_on_the_same_weights(tiny):
    """torch MultiheadAttention dual blocks, FrEIA 0.2 SequenceINN / AllInOneBlock flows, nn.LayerNorm and
    the map in plain PyTorch (the benchmark's baseline) give what DADF gives."""
    tiny.set_stage("flow")  # a frozen transformer: the copies must train all the same
    eager = EagerDADF(tiny)
    trainable = sum(p.numel() for n, p in eager.named_parameters() if p.requires_grad)
    assert trainable == _count(tiny.transformer) + _count(tiny.norms) + _count(tiny.flows)  # permutations: buffers / fixed
    images = torch.randn(2, 3, 64, 64)
    prior = tiny.extractor(images)
    own, memory = eager.reconstruct(prior)
    rec = tiny.transformer(prior)
    for a, b in zip([*own, *memory], [*rec.own, *rec.memory]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    tiny.set_stage("reconstruction")
    assert torch.allclose(eager.loss_reconstruction(prior), tiny.loss({"features": prior}), rtol=1e-5)
    tiny.set_stage("flow")
    fused = tiny.frozen_features(images)
    assert torch.allclose(eager.loss_flow(fused), tiny.loss({"features": fused}), rtol=1e-4)
    amap, score = eager.predict(images)
    pred = tiny.predict(images)
    assert torch.allclose(amap, pred.anomaly_map, rtol=1e-4, atol=1e-5) and torch.allclose(score, pred.score, rtol=1e-4)
    tiny.set_stage("reconstruction")


def test_torch_export_of_predict_with_a_dynamic_batch(tiny):
    images = torch.randn(2, 3, 64, 64)
    program = export_predict(tiny, images)
    for batch in (images, torch.randn(3, 3, 64, 64)):
        pred = tiny.predict(batch)
        names = output_names(pred, batch.shape[0])
        assert names[:2] == ["anomaly_map", "score"] and "score_log_space" in names
        for name, value in zip(names, program.module()(batch)):
            torch.testing.assert_close(value, pred.get(name), msg=lambda m, n=name: f"{n}: {m}")


def test_checkpoint_round_trip(tiny, tmp_path):
    save(tiny, tmp_path / "dadf.pt")
    again = load_model(tmp_path / "dadf.pt").eval()
    images = torch.randn(2, 3, 64, 64)
    assert type(again) is DADF and again.config == tiny.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), tiny.state_dict().values()))
    assert torch.equal(again.predict(images).score, tiny.predict(images).score)


def _official_files(model: DADF, folder):
    """The model's weights under the official code's names: its VIT state dict and its fuseflow file."""
    t = model.transformer
    vit = {"sem_token": t.memory, "pos_embed": torch.cat([torch.zeros(1, 1, t.dim), t.positions], 1),
           "norm.weight": t.norm.weight, "norm.bias": t.norm.bias}
    for k in range(3):
        vit |= {f"patch_embed{k + 1}.proj.weight": t.embed[k].weight, f"patch_embed{k + 1}.proj.bias": t.embed[k].bias,
                f"decoder_pred{k + 1}.weight": t.heads[k].weight, f"decoder_pred{k + 1}.bias": t.heads[k].bias}
    for i, b in enumerate(t.blocks):
        parts = {"norm1": b.norm1, "attn.qkv": b.attn.qkv, "attn.proj": b.attn.proj, "norm2": b.norm2, "mlp.fc1": b.mlp[0], "mlp.fc2": b.mlp[2]}
        for name, m in parts.items():
            vit |= {f"blocks.{i}.{name}.weight": m.weight, f"blocks.{i}.{name}.bias": m.bias}
    vit = {k: v.detach().clone() for k, v in vit.items()}
    torch.save(vit, folder / "WResnet50_toy_LightCC.pth")
    torch.save({"model_norms_state_dict": model.norms.state_dict(), "model_nf_flows": model.flows.state_dict()}, folder / "WResnet50_fuseflow.pt")
    return vit


def test_official_files_load_and_give_the_same_predictions(tiny, tmp_path):
    vit = _official_files(tiny, tmp_path)
    fresh = DADF(tiny.config)  # other random weights and permutations
    images = torch.randn(2, 3, 64, 64)
    load_official(fresh, tmp_path / "WResnet50_toy_LightCC.pth", tmp_path / "WResnet50_fuseflow.pt")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), tiny.state_dict().values()))
    assert torch.equal(fresh.eval().predict(images).anomaly_map, tiny.predict(images).anomaly_map)
    shifted = dict(vit, pos_embed=vit["pos_embed"] + 0.1)
    with pytest.raises(ValueError, match="fixed positions"):
        load_official(fresh, shifted)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_official(fresh, dict(vit, cls_token=torch.zeros(1, 1, 48)))
    with pytest.raises(ValueError, match="does not match the model"):
        load_official(DADF(tiny.config.replace(embed_dim=20, num_heads=4)), {k: v for k, v in vit.items() if k != "pos_embed"})
    with pytest.raises(ValueError, match="not a DADF flow file"):
        load_official(fresh, flows={"state_dict": {}})


def test_bad_official_files_say_so_and_leave_the_model_as_it_was(tiny, tmp_path):
    vit = _official_files(tiny, tmp_path)
    flows_file = tmp_path / "WResnet50_fuseflow.pt"
    model = DADF(tiny.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nan_memory = dict(vit, sem_token=torch.full_like(vit["sem_token"], float("nan")))
    missing_head = {k: v for k, v in vit.items() if k != "decoder_pred1.bias"}
    good_flows = torch.load(flows_file, weights_only=True)
    bad_norms = dict(good_flows, model_norms_state_dict={"0.weight": torch.zeros(1)})
    torch.save([1, 2, 3], tmp_path / "a_list.pth")
    cases = [
        ((nan_memory, None), "NaN or inf"),
        ((missing_head, None), "missing"),
        ((tmp_path / "a_list.pth", None), "must be a state dict"),
        ((dict(vit, sem_token=3), None), "not a tensor"),
        ((None, dict(good_flows, model_nf_flows=5)), "must be a state dict"),
        ((vit, bad_norms), "does not match the model"),  # a good stage-1 file with a bad stage-2 file: nothing loads
    ]
    for (transformer, flows), message in cases:
        with pytest.raises(ValueError, match=message):
            load_official(model, transformer, flows)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"{message}: a failed load changed the model"
    class Payload:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"sem_token": Payload()}, tmp_path / "hostile.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError):
        load_official(model, tmp_path / "hostile.pth")


# ---------------------------------------------------------------------------------------------- command line


def test_cli_train_eval_predict_on_the_demo_data(tmp_path, capsys):
    root = tmp_path / "data"
    write_synthetic_dataset(root, "syn", num_train=4, num_test=4, input_size=64, seed=2)
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "dadf", "--data", str(root), "--category", "syn", "--out", str(out), "--epochs", "1",
                   "--batch-size", "4", "--no-progress", *TINY_FLAGS])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and 0.0 <= metrics["image_auroc"] <= 1.0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["training"]["stage"] == "flow" and set(state["training"]["history"]) == {"reconstruction", "flow"}
    rc = cli.main(["eval", "--data", str(root), "--category", "syn", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "ev"),
                   "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["image_auroc"] == pytest.approx(metrics["image_auroc"])
    rc = cli.main(["predict", "--checkpoint", str(out), "--input", str(root / "syn" / "test" / "good"), "--out", str(tmp_path / "pred"),
                   "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "pred" / "scores.csv").open()))
    assert len(rows) == len(list((root / "syn" / "test" / "good").glob("*.png")))
    assert all(-math.e <= float(r["score"]) <= 0 for r in rows)


def test_cli_train_eval_predict_on_a_loco_folder(tmp_path, capsys):
    loco = write_loco(tmp_path / "mvtec_loco")
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "dadf", "--data", str(loco), "--category", LOCO_CATEGORY, "--layout", "loco", "--out", str(out),
                   "--epochs", "1", "--batch-size", "4", "--no-progress", *TINY_FLAGS])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "sPRO (FPR limit 0.05) all" in text and "image AUROC logical" in text, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["spro"]["0.05"]["all"] <= 1.0
    rc = cli.main(["eval", "--data", str(loco), "--category", LOCO_CATEGORY, "--layout", "loco", "--checkpoint", str(out / "last.pt"),
                   "--out", str(tmp_path / "ev"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)
    assert again["spro"]["0.05"]["all"] == pytest.approx(metrics["spro"]["0.05"]["all"], abs=1e-6)
    rc = cli.main(["predict", "--checkpoint", str(out), "--input", str(loco / LOCO_CATEGORY / "test" / "logical_anomalies"),
                   "--out", str(tmp_path / "pred"), "--no-progress"])
    assert rc == 0
    assert len(list(csv.DictReader((tmp_path / "pred" / "scores.csv").open()))) == 2
