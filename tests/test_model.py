"""MSFlow model: shapes, predict vs the reference composition, config, checkpoints (official read and
written, own format), bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import FrEIA.framework as Ff
import FrEIA.modules as Fm

import msflow_fast
from helpers import TinyBackbone
from msflow_fast import MSFlow, MSFlowConfig, ops
from msflow_fast.models import FeatureExtractor, PositionalEncoding2d, positional_encoding_2d
from msflow_fast.models.checkpoint import checkpoint_state, load_model as load_checkpoint, read as read_checkpoint, save as save_checkpoint
from msflow_fast.models.msflow import FusionFlow, build_parallel_flows, load_official as load_official_checkpoint, official_state, save_official
from msflow_fast.nn import FusionCouplingLayer, subnet_conv_ln

CHANNELS = (8, 16, 32)
SMALL = dict(c_cond=8, parallel_blocks=(1, 2, 2), pretrained=False)


def _model(**overrides) -> MSFlow:
    torch.manual_seed(0)
    np.random.seed(0)
    model = MSFlow(backbone=TinyBackbone(), **{**SMALL, **overrides})
    with torch.no_grad():  # move away from the identity init
        for name, p in model.named_parameters():
            if "global_offset" in name:
                p.normal_(0, 0.1)
    return model


def _images(batch=2, size=64):
    return torch.randn(batch, 3, size, size)


@pytest.mark.parametrize("size", [64, 128])
def test_output_shapes(size):
    model = _model()
    x = _images(2, size)
    latents, logdet = model(x)
    grids = [math.ceil(size / s / 2) for s in (4, 8, 16)]
    assert [tuple(z.shape) for z in latents] == [(2, c, g, g) for c, g in zip(CHANNELS, grids)]
    assert logdet.shape == (2,)
    pred = model.predict(x)
    assert pred.anomaly_map.shape == pred.maps["anomaly_map_mul"].shape == (2, size, size)
    assert pred.score.shape == pred.maps["score_log_space"].shape == pred.maps["score_official"].shape == (2,)
    assert [tuple(pred.maps[f"log_likelihood_{k}"].shape) for k in range(3)] == [(2, g, g) for g in grids]
    assert torch.isfinite(pred.anomaly_map).all() and (pred.anomaly_map >= 0).all()


def test_predict_equals_the_reference_composition():
    model = _model()
    x = _images(3, 64)
    pred = model.predict(x)  # whatever backend is picked automatically
    with ops.use_backend("reference"):
        latents, logdet = model(x)
        feats = [F.avg_pool2d(f, 3, 2, 1) for f in model.extractor(x)]
        maps = [ops.reference.log_likelihood_map(z) for z in latents]
        add, mul, score = ops.reference.aggregate_anomaly_maps(maps, (64, 64), top_k=0.03)
        log_score = ops.reference.log_space_score(maps, (64, 64), top_k=0.03)
        loss = model.loss(x)
    torch.testing.assert_close(pred.anomaly_map, add, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred.maps["anomaly_map_mul"], mul, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred.score, score, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred.maps["score_official"], score, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred.maps["score_log_space"], log_score, rtol=1e-4, atol=1e-4)
    expected_loss = (0.5 * sum(z.square().flatten(1).sum(1) for z in latents) - logdet).mean()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-3)
    assert [f.shape for f in feats] == [z.shape for z in latents]

    log_model = _model(score="log_space")
    torch.testing.assert_close(log_model.predict(x).score, log_score, rtol=1e-4, atol=1e-4)


def test_training_step_backbone_frozen_and_in_eval():
    model = _model()
    model.train()
    assert not model.extractor.backbone.training
    assert all(not p.requires_grad for p in model.extractor.parameters())
    running = model.extractor.backbone.stem[1].running_mean.clone()
    loss = model.loss(_images())
    loss.backward()
    assert torch.equal(running, model.extractor.backbone.stem[1].running_mean)
    assert all(p.grad is None for p in model.extractor.parameters())
    flow_params = [p for n, p in model.named_parameters() if not n.startswith("extractor.")]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flow_params)


def test_flows_are_invertible_end_to_end():
    model = _model().double()
    feats = [f.double() for f in model.features(_images().double())]
    latents, logdet = model.flows(feats)
    outs, logdet_fusion_rev = model.fusion_flow(latents, rev=True)
    conds = [model.positional(f.shape[0], f.shape[2], f.shape[3], f.device, f.dtype) for f in feats]
    back, logdets_rev = model.parallel_flows(outs, conds, rev=True)
    for b, f in zip(back, feats):
        torch.testing.assert_close(b, f, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sum(logdets_rev) + logdet_fusion_rev, -logdet, rtol=1e-9, atol=1e-9)


def test_bad_inputs_raise_clear_errors():
    model = _model()
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.predict([_images()])
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="divisible by the backbone's largest stride 16"):
        model(torch.randn(1, 3, 64, 70))
    bad = _images(1)
    bad[0, 0, 3, 3] = float("nan")
    model.check_finite = True  # the NaN/inf check is opt-in: see test_non_finite_image_check_is_opt_in
    with pytest.raises(ValueError, match="NaN"):
        model.predict(bad)
    model.check_finite = None
    with pytest.raises(ValueError, match="empty"):
        model(torch.randn(0, 3, 64, 64))
    with pytest.raises(ValueError, match="parallel_blocks"):
        MSFlow(backbone=TinyBackbone(), **{**SMALL, "parallel_blocks": (1, 1)})
    with pytest.raises(TypeError, match="unknown MSFlowConfig"):
        MSFlow(backbone=TinyBackbone(), blocks=3)
    class ScalarBackbone(nn.Module):
        def forward(self, x):
            return x.mean()

    with pytest.raises(TypeError, match="feature maps"):
        MSFlow(backbone=ScalarBackbone(), **SMALL)


def test_non_finite_image_check_is_opt_in(monkeypatch):
    """NaN/inf images: no full pass and device sync per forward by default (the ops' policy);
    checked with model.check_finite=True or MSFLOW_FAST_CHECK_FINITE=1, and by a direct check_images call."""
    monkeypatch.delenv("MSFLOW_FAST_CHECK_FINITE", raising=False)
    model = _model()
    bad = _images(2)
    bad[1, 0, 3, 3] = float("nan")
    bad[1, 2, 5, 5] = float("inf")
    reads = []
    real_isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: reads.append(x.shape) or real_isfinite(x))
    model.predict(bad)  # default: not checked, so no error
    model.loss(bad)
    assert not [shape for shape in reads if shape == bad.shape], "forward read the whole image batch"
    monkeypatch.setattr(torch, "isfinite", real_isfinite)
    with pytest.raises(ValueError, match=r"NaN or infinite values \(2 of .*image\(s\) \[1\]"):
        model.check_images(bad, check_finite=True)
    assert model.check_images(bad, check_finite=False) is bad
    model.check_finite = True
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.predict(bad)
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.loss(bad)
    model.check_finite = None
    monkeypatch.setenv("MSFLOW_FAST_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="MSFLOW_FAST_CHECK_FINITE"):
        model(bad)
    model.check_finite = False  # the model's own setting wins over the environment
    assert model.check_images(bad, check_finite=None) is bad
    with pytest.raises(ValueError, match="NaN or infinite"):  # a direct call validates fully by default
        model.check_images(bad)
    assert model.check_images(_images(1)) is not None  # finite images pass


def test_config_defaults_round_trip_and_validation():
    cfg = MSFlowConfig()
    assert cfg.input_size == (512, 512) and cfg.backbone == "wide_resnet50_2" and cfg.pool_type == "avg"
    assert cfg.c_cond == 64 and cfg.parallel_blocks == (2, 5, 8) and cfg.clamp_alpha == 1.9
    assert cfg.clamp_form == "tanh" and cfg.top_k == 0.03 and cfg.score == "official" and cfg.reflect_padding
    custom = MSFlowConfig(input_size=256, parallel_blocks=[1, 2, 3], score="log_space")
    assert custom.input_size == (256, 256) and custom.parallel_blocks == (1, 2, 3)
    data = json.loads(json.dumps(custom.to_dict()))
    assert MSFlowConfig.from_dict(data) == custom
    assert custom.replace(top_k=0.1).top_k == 0.1
    with pytest.raises(dataclasses_frozen()):
        custom.top_k = 0.5
    for bad in [dict(c_cond=6), dict(pool_type="mean"), dict(top_k=0), dict(clamp_alpha=-1.0), dict(score="max"),
                dict(parallel_blocks=(0, 1)), dict(input_size=(0, 4)), dict(clamp_form="atan")]:
        with pytest.raises(ValueError):
            MSFlowConfig(**bad)
    with pytest.raises(TypeError):
        MSFlowConfig.from_dict({"nope": 1})
    with pytest.raises(TypeError):
        MSFlowConfig(parallel_blocks="258")


def dataclasses_frozen():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_positional_encoding_formula_and_cache():
    pe = positional_encoding_2d(8, 3, 5)
    half = 4
    for j in range(2):
        w = math.exp(-(2 * j) * math.log(1e4) / half)
        for y in range(3):
            for x in range(5):
                assert pe[2 * j, y, x].item() == pytest.approx(math.sin(x * w), abs=1e-6)
                assert pe[2 * j + 1, y, x].item() == pytest.approx(math.cos(x * w), abs=1e-6)
                assert pe[half + 2 * j, y, x].item() == pytest.approx(math.sin(y * w), abs=1e-6)
                assert pe[half + 2 * j + 1, y, x].item() == pytest.approx(math.cos(y * w), abs=1e-6)
    module = PositionalEncoding2d(8)
    a = module(2, 3, 5, torch.device("cpu"), torch.float32)
    b = module(4, 3, 5, torch.device("cpu"), torch.float32)
    assert a.shape == (2, 8, 3, 5) and b.data_ptr() == a.data_ptr()
    assert module(1, 3, 5, torch.device("cpu"), torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="multiple of 4"):
        PositionalEncoding2d(6)


def test_extractor_from_timm_name_without_download():
    extractor = FeatureExtractor("resnet18", out_indices=(1, 2, 3), pretrained=False, reflect_padding=True)
    assert extractor.channels == [64, 128, 256] and extractor.strides == [4, 8, 16]
    convs = [m for m in extractor.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.padding_mode == ("reflect" if any(m.padding) else "zeros") for m in convs)
    with pytest.raises(TypeError):
        FeatureExtractor(3)


def test_official_parameter_counts():
    flows = build_parallel_flows((256,), (2,), 64, 1.9)
    assert sum(p.numel() for p in flows.parameters() if p.requires_grad) == 1_550_976
    fusion = FusionFlow((256, 512, 1024))
    assert sum(p.numel() for p in fusion.parameters() if p.requires_grad) == 19_618_368


# ---------------------------------------------------------------------------------------------- checkpoints


def _official_pe(channels, height, width):
    """positionalencoding2d as specified in MSFLOW_SPEC §1.4, written out independently."""
    d = channels // 2
    div = torch.exp(torch.arange(0.0, d, 2) * -(math.log(10000.0) / d))
    pe = torch.zeros(channels, height, width)
    pos_w = torch.arange(0.0, width).unsqueeze(1)
    pos_h = torch.arange(0.0, height).unsqueeze(1)
    pe[0:d:2] = torch.sin(pos_w * div).T.unsqueeze(1).repeat(1, height, 1)
    pe[1:d:2] = torch.cos(pos_w * div).T.unsqueeze(1).repeat(1, height, 1)
    pe[d::2] = torch.sin(pos_h * div).T.unsqueeze(2).repeat(1, 1, width)
    pe[d + 1 :: 2] = torch.cos(pos_h * div).T.unsqueeze(2).repeat(1, 1, width)
    return pe


def _official_structure(channels, blocks, c_cond, clamp=1.9):
    """Flows built like the official code: FrEIA 0.2 SequenceINNs of AllInOneBlocks and a GraphINN fusion."""
    parallel = []
    for c, n in zip(channels, blocks):
        inn = Ff.SequenceINN(c, 1, 1)
        for _ in range(n):
            inn.append(Fm.AllInOneBlock, cond=0, cond_shape=(c_cond, 1, 1), subnet_constructor=subnet_conv_ln,
                       affine_clamping=clamp, global_affine_type="SOFTPLUS")
        parallel.append(inn)
    nodes = [Ff.InputNode(c, 1, 1, name=f"input{i}") for i, c in enumerate(channels)]
    perms = [Ff.Node(nodes[i], Fm.PermuteRandom, {}, name=f"permute_{i}") for i in range(len(channels))]
    fusion = Ff.Node([(p, 0) for p in perms], FusionCouplingLayer, {"clamp": clamp}, name="fusion flow")
    outs = [Ff.OutputNode(fusion.out0 if i == 0 else getattr(fusion, f"out{i}"), name=f"output_{i}")
            for i in range(len(channels))]
    graph = Ff.GraphINN(nodes + perms + [fusion] + outs)
    with torch.no_grad():
        for module in [*parallel, graph]:
            for name, p in module.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    return parallel, graph


def _official_forward(backbone, parallel, graph, images, c_cond):
    with torch.no_grad():
        feats = [F.avg_pool2d(f, 3, 2, 1) for f in backbone(images)]
        outs, logdets = [], []
        for inn, f in zip(parallel, feats):
            cond = _official_pe(c_cond, f.shape[2], f.shape[3]).unsqueeze(0).repeat(f.shape[0], 1, 1, 1)
            z, ld = inn(f, [cond])
            outs.append(z)
            logdets.append(ld)
        latents, ld_fusion = graph(outs)
    return list(latents), sum(logdets) + ld_fusion


def _scrambled_fusion_state(graph, channels):
    """The GraphINN state dict with its PermuteRandom modules renumbered (as across processes)."""
    state = graph.state_dict()
    perm_ids = sorted({int(k.split(".")[1]) for k in state if k.endswith(".perm")})
    assert len(perm_ids) == len(channels)
    rotation = dict(zip(perm_ids, perm_ids[1:] + perm_ids[:1]))
    out = {}
    for key, value in state.items():
        idx = int(key.split(".")[1])
        if idx in rotation:
            key = f"module_list.{rotation[idx]}." + key.split(".", 2)[2]
        out[key] = value
    return out


def test_official_checkpoint_from_freia_modules_loads_and_matches(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    backbone = TinyBackbone().eval()
    parallel, graph = _official_structure(CHANNELS, SMALL["parallel_blocks"], SMALL["c_cond"])
    checkpoint = {
        "epoch": 3,
        "parallel_flows": [inn.state_dict() for inn in parallel],
        "fusion_flow": _scrambled_fusion_state(graph, CHANNELS),
    }
    assert checkpoint["parallel_flows"][0]["module_list.0.w_perm"].shape == (8, 8, 1, 1)
    path = tmp_path / "best_det.pt"
    torch.save(checkpoint, path)

    images = _images(2, 64)
    expected, expected_logdet = _official_forward(backbone, parallel, graph, images, SMALL["c_cond"])
    model = MSFlow(backbone=backbone, **SMALL)
    load_official_checkpoint(model, path)
    latents, logdet = model(images)
    for z, e in zip(latents, expected):
        torch.testing.assert_close(z, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logdet, expected_logdet, rtol=1e-5, atol=1e-3)
    for k, p in enumerate(graph.module_list):
        if isinstance(p, Fm.PermuteRandom):
            scale = CHANNELS.index(p.perm.numel())
            assert torch.equal(model.fusion_flow.permutations[scale].perm, p.perm)

    # the newer FrEIA index form of the permutations loads too
    index_form = dict(checkpoint)
    index_form["parallel_flows"] = [
        {k: (v[:, :, 0, 0].argmax(1) if k.endswith(("w_perm", "w_perm_inv")) else v) for k, v in sd.items()}
        for sd in checkpoint["parallel_flows"]
    ]
    model2 = load_official_checkpoint(MSFlow(backbone=backbone, **SMALL), index_form)
    torch.testing.assert_close(model2(images).latents[2], expected[2], rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="official MSFlow checkpoint"):
        load_official_checkpoint(model, {"state_dict": {}})
    wrong = MSFlow(backbone=backbone, **{**SMALL, "parallel_blocks": (1, 1, 2)})
    with pytest.raises(ValueError, match="parallel flow 1"):
        load_official_checkpoint(wrong, checkpoint)


def test_own_checkpoint_round_trip(tmp_path):
    model = _model()
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(model, path, training={"epoch": 7})
    data = torch.load(path, weights_only=True)
    assert data["training"] == {"epoch": 7} and data["format"] == "msflow_fast" and data["format_version"] == 3
    assert data["model"] == "msflow" and data["config"] == model.config.to_dict()
    # a user-supplied backbone cannot be rebuilt from the config: its weights are stored
    assert data["extractors"] == {"extractor": {"source": "module", "class": "TinyBackbone"}}
    assert set(data["weights"]) == set(model.state_dict())
    assert set(data["versions"]) == {"msflow_fast", "torch", "python"}
    assert not [p for p in path.parent.iterdir() if p.name != "model.pt"]
    fresh = TinyBackbone()  # other weights: the stored ones replace them
    loaded = load_checkpoint(path, backbone=fresh)
    assert loaded.config == model.config and type(loaded) is MSFlow
    x = _images()
    for a, b in zip(model(x).latents, loaded(x).latents):
        torch.testing.assert_close(a, b)
    assert read_checkpoint(tmp_path / "ckpt" / "model.pt")["path"].endswith("model.pt")
    with pytest.raises(ValueError, match="user-supplied backbone .*TinyBackbone.*backbone="):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="official"):
        load_checkpoint({"parallel_flows": [], "fusion_flow": {}})
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="pretrained"):
        load_checkpoint(path, backbone=fresh, pretrained=True)
    wrong = _model(parallel_blocks=(1, 1, 2))
    with pytest.raises(ValueError, match="does not match the model"):
        msflow_fast.models.load_weights(wrong, read_checkpoint(path))


def test_checkpoint_of_timm_backbone_stores_weights_only_when_not_pretrained(tmp_path):
    torch.manual_seed(0)
    config = MSFlowConfig(backbone="resnet18", input_size=64, c_cond=8, parallel_blocks=(1, 1, 1), pretrained=False)
    model = MSFlow(config)
    path = tmp_path / "random.pt"
    save_checkpoint(model, path)
    data = torch.load(path, weights_only=True)
    assert data["extractors"]["extractor"]["source"] == "random" and any(k.startswith("extractor.") for k in data["weights"])
    torch.manual_seed(1)  # a different random backbone: the stored weights must win
    loaded = load_checkpoint(path)
    x = _images(1, 64)
    torch.testing.assert_close(model(x).logdet, loaded(x).logdet)

    # pretrained timm weights are rebuilt from the name, not stored (no download here: flip the source)
    model.config = config.replace(pretrained=True)
    model.extractor.source = "pretrained"
    state = checkpoint_state(model)
    assert state["extractors"]["extractor"]["source"] == "pretrained"
    assert not any(k.startswith("extractor.") for k in state["weights"])
    # a given module is used as it is for a "pretrained" checkpoint
    rebuilt = load_checkpoint(state, backbone=model.extractor.backbone)
    torch.testing.assert_close(rebuilt(x).logdet, model(x).logdet)


def test_a_backbone_name_reaches_the_config():
    """MSFlow(backbone="resnet18") sets config.backbone (a timm name), not the module argument."""
    model = MSFlow(input_size=64, backbone="resnet18", pretrained=False, parallel_blocks=(1, 1, 1), c_cond=8)
    assert model.config.backbone == "resnet18" and model.extractor.source == "random"
    assert model.extractor.channels == [64, 128, 256]
    with pytest.raises(TypeError, match="timm model name or an nn.Module"):
        MSFlow(backbone=3)


def test_corrupt_truncated_and_foreign_checkpoints_name_the_file(tmp_path):
    model = _model()
    path = tmp_path / "good.pt"
    save_checkpoint(model, path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.pt.*corrupt"):
        load_checkpoint(truncated, backbone=TinyBackbone())
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pt"):
        read_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.* not an msflow_fast checkpoint"):
        load_checkpoint(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "msflow_fast", "object": TinyBackbone}, pickled)
    with pytest.raises(ValueError, match="pickled.pt.*Python objects"):
        read_checkpoint(pickled)
    official = tmp_path / "official.pt"
    torch.save({"parallel_flows": [], "fusion_flow": {}}, official)
    with pytest.raises(ValueError, match="official.pt.*load_official"):
        load_checkpoint(official)
    future = checkpoint_state(model)
    future["format_version"] = 99
    torch.save(future, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="future.pt.*format_version 99.*upgrade"):
        read_checkpoint(tmp_path / "future.pt")
    incomplete = checkpoint_state(model)
    del incomplete["weights"]
    with pytest.raises(ValueError, match="lacks.*weights"):
        load_checkpoint(incomplete, backbone=TinyBackbone())
    unknown = checkpoint_state(model)
    unknown["model"] = "msflw"
    with pytest.raises(ValueError, match="msflw.*Did you mean 'msflow'"):
        load_checkpoint(unknown, backbone=TinyBackbone())
    with pytest.raises(ValueError, match="not an official MSFlow checkpoint"):
        load_official_checkpoint(model, path)


class _Payload:
    """Unpickling this object writes a marker file (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickles_never_run_code(tmp_path):
    marker = tmp_path / "PWNED"
    model = _model()
    for name, payload in {
        "own.pt": {**checkpoint_state(model), "config": _Payload(marker)},
        "best_det.pt": {"parallel_flows": [], "fusion_flow": _Payload(marker), "epoch": 0},
    }.items():
        path = tmp_path / name
        torch.save(payload, path)
        assert not marker.exists()
        with pytest.raises(ValueError, match=f"{name}.*Python objects"):
            if name == "own.pt":
                load_checkpoint(path, backbone=TinyBackbone())
            else:
                load_official_checkpoint(model, path)
        assert not marker.exists(), f"loading {name} ran code from the file"
    torch.load(tmp_path / "own.pt", weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


def _official_load_weights(parallel_flows, fusion_flow, path):
    """The official ``load_weights`` (cool-xuan/msflow utils.py) as its behaviour is documented:
    ``torch.load``; the fusion permutations renamed to this graph's module indices by their length;
    ``load_state_dict(strict=False)`` for the fusion flow and each parallel flow; returns ``epoch``."""
    state = torch.load(path)
    fusion_state = dict(state["fusion_flow"])
    index_of_length = {fusion_flow.module_list[i].perm.shape[0]: i for i in range(len(parallel_flows))}
    renamed = {}
    for key, value in list(fusion_state.items()):
        if "perm" in key:
            renamed[key.replace(key.split(".")[1], str(index_of_length[value.shape[0]]))] = value
            del fusion_state[key]
    fusion_state.update(renamed)
    fusion_flow.load_state_dict(fusion_state, strict=False)
    for flow, flow_state in zip(parallel_flows, state["parallel_flows"]):
        flow.load_state_dict(flow_state, strict=False)
    return state["epoch"]


def test_checkpoint_written_in_the_official_format_is_read_by_the_official_loader(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    path = save_official(model, tmp_path / "best_det.pt", epoch=41)
    # The official structure from FrEIA 0.2 modules, with other random weights and permutations.
    np.random.seed(99)
    torch.manual_seed(99)
    parallel, graph = _official_structure(CHANNELS, SMALL["parallel_blocks"], SMALL["c_cond"])
    expected_keys = set(graph.state_dict()) | {k for inn in parallel for k in inn.state_dict()}
    written = official_state(model, epoch=41)
    assert set(written["fusion_flow"]) == set(graph.state_dict())  # every key the official graph has
    assert all(set(sd) == set(inn.state_dict()) for sd, inn in zip(written["parallel_flows"], parallel))
    assert expected_keys and _official_load_weights(parallel, graph, path) == 41
    images = _images(2, 64)
    expected, expected_logdet = _official_forward(model.extractor.backbone, parallel, graph, images, SMALL["c_cond"])
    latents, logdet = model(images)
    for z, e in zip(latents, expected):
        torch.testing.assert_close(z, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logdet, expected_logdet, rtol=1e-5, atol=1e-3)
    # and our reader reads it back
    again = load_official_checkpoint(_model(), path)
    torch.testing.assert_close(again(images).logdet, logdet)


def test_top_level_exports():
    assert msflow_fast.MSFlow is MSFlow and msflow_fast.MSFlowConfig is MSFlowConfig
