"""CS-Flow (models/csflow): parity with anomalib 2.7 on the same weights (float64), the official maths
re-computed from the spec's formulas (MODELS_SPEC.md Part A §3), invertibility, gradients, the
model protocol, checkpoints, loaders, the feature cache and the command line."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msflow_fast import cli
from msflow_fast.engine import SyntheticDefects, fit, write_synthetic_dataset
from msflow_fast.models import load_model, save
from msflow_fast.models.csflow import (
    CSFlow,
    CSFlowConfig,
    CrossScaleFlow,
    anomalib_loss,
    anomalib_state_dict,
    block_permutations,
    load_anomalib,
    load_official,
)
from msflow_fast.models.csflow.head import image_score, predict_from_latents
from msflow_fast.nn import enable_fast_paths

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # anomalib's import-time deprecation notices
    from anomalib.models.image.csflow.anomaly_map import AnomalyMapGenerator, AnomalyMapMode
    from anomalib.models.image.csflow.loss import CsFlowLoss
    from anomalib.models.image.csflow.torch_model import CrossScaleFlow as AnomalibCrossScaleFlow
    from anomalib.models.image.csflow.torch_model import CsFlowModel

F64 = torch.float64


def _randomize(module: nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Every parameter random (the gammas too: at their zero init every coupling is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale + (0.3 if p.numel() == 1 else 0.0))


def _features(batch: int, channels: int, grid: int, dtype=F64, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, grid // 2**k, grid // 2**k, generator=gen, dtype=dtype) for k in range(3)]


def _stride32(channels: int = 304) -> nn.Module:
    return nn.Conv2d(3, channels, 32, stride=32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------- anomalib parity


@pytest.fixture(scope="module")
def anomalib_pair():
    ref = AnomalibCrossScaleFlow(input_dims=(3, 256, 256), n_coupling_blocks=4, clamp=3, cross_conv_hidden_channels=12).to(F64)
    _randomize(ref)
    model = CSFlow(input_size=256, backbone=_stride32(), hidden_channels=12, permutation="anomalib").to(F64)
    load_anomalib(model, ref.state_dict())
    return ref, model


def test_latents_logdet_maps_scores_equal_anomalib_in_float64(anomalib_pair):
    ref, model = anomalib_pair
    xs = _features(3, 304, 8)
    z_ref, jac_ref = ref(xs)
    z, logdet = model.flow(xs)
    for a, b in zip(z, z_ref):
        assert _rel(a, b) <= 1e-10
    # anomalib's graph returns the log-det summed over the batch, broadcast to every sample
    assert torch.allclose(jac_ref, logdet.sum().expand(3), rtol=1e-12, atol=0)
    assert abs(anomalib_loss(z, logdet).item() - CsFlowLoss()(z_ref, jac_ref).item()) <= 1e-12
    pred = predict_from_latents(z, (256, 256), "product")
    ours_map = pred.maps["anomaly_map_product"]
    their_map = AnomalyMapGenerator((3, 256, 256), AnomalyMapMode.ALL)(z_ref)[:, 0]  # float32 ones() in anomalib
    assert _rel(ours_map, their_map.to(F64)) <= 1e-6
    assert _rel(pred.score, CsFlowModel._compute_anomaly_scores(z_ref)) <= 1e-12
    their_largest = AnomalyMapGenerator((3, 256, 256), AnomalyMapMode.MAX)(z_ref)[:, 0]
    assert _rel(pred.maps["anomaly_map_largest_scale"], their_largest) <= 1e-12


def test_anomalib_keys_round_trip_strictly(anomalib_pair):
    ref, model = anomalib_pair
    fresh = AnomalibCrossScaleFlow(input_dims=(3, 256, 256), n_coupling_blocks=4, clamp=3, cross_conv_hidden_channels=12).to(F64)
    fresh.load_state_dict(anomalib_state_dict(model, prefix="graph."), strict=True)
    for (k, a), (k2, b) in zip(sorted(fresh.state_dict().items()), sorted(ref.state_dict().items())):
        assert k == k2 and torch.equal(a, b)
    lightning = {f"model.{k}": v for k, v in anomalib_state_dict(model).items()}
    again = load_anomalib(CSFlow(input_size=256, backbone=_stride32(), hidden_channels=12, permutation="anomalib").to(F64), {"state_dict": lightning})
    for key, value in model.flow.state_dict().items():
        assert torch.equal(again.flow.state_dict()[key], value)


def test_anomalib_permutations_are_one_per_block():
    ref = AnomalibCrossScaleFlow(input_dims=(3, 256, 256), n_coupling_blocks=4, clamp=3, cross_conv_hidden_channels=4)
    for k in range(4):
        ours = block_permutations(304, k, "anomalib")
        for s in range(3):
            assert torch.equal(ref.graph.module_list[2 * k].perm[s], torch.as_tensor(ours[s]))


def test_loading_refuses_the_wrong_permutations_and_foreign_files(anomalib_pair, tmp_path):
    ref, _ = anomalib_pair
    official = CSFlow(input_size=256, backbone=_stride32(), hidden_channels=12)
    with pytest.raises(ValueError, match="permutation='anomalib'"):
        load_anomalib(official, ref.state_dict())
    with pytest.raises(ValueError, match="no CS-Flow coupling weights"):
        load_anomalib(CSFlow(input_size=256, backbone=_stride32(), hidden_channels=12, permutation="anomalib"), {"x": torch.ones(1)})
    wide = CSFlow(input_size=256, backbone=_stride32(), hidden_channels=16, permutation="anomalib").to(F64)
    with pytest.raises(ValueError, match="does not match the model"):
        load_anomalib(wide, ref.state_dict())
    pickled = tmp_path / "whole_model.pt"
    torch.save(nn.Linear(2, 2), pickled)  # how the official code saves: a whole pickled module
    with pytest.raises(ValueError, match="state_dict"):
        load_official(official, pickled)


# ---------------------------------------------------------------------------------------------- the official maths


def _spec_cross_convs(p: dict, prefix: str, xs: list[torch.Tensor], kernel: int) -> list[torch.Tensor]:
    """CrossConvolutions from MODELS_SPEC.md §3.1, on the named parameters."""
    pad = kernel // 2

    def conv(name, x, stride=1):
        return F.conv2d(x, p[f"{prefix}{name}.weight"], p[f"{prefix}{name}.bias"], stride=stride, padding=pad)

    h = [F.leaky_relu(conv(f"conv_scale{k}_0", x), 0.1) for k, x in enumerate(xs)]
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    o0 = conv("conv_scale0_1", h[0]) + conv("up_conv10", up(h[1]))
    o1 = conv("conv_scale1_1", h[1]) + conv("down_conv01", h[0], 2) + conv("up_conv21", up(h[2]))
    o2 = conv("conv_scale2_1", h[2]) + conv("down_conv12", h[1], 2)
    return [o * p[f"{prefix}gamma{k}"] for k, o in enumerate((o0, o1, o2))]


def _spec_flow(p: dict, xs: list[torch.Tensor], kernels, clamp: float = 3.0):
    """The official forward: np.random.seed(k) permutations, the two-sided atan coupling, clamp 1e6,
    per-scale log-dets summed; and the official loss and score."""
    log_e = lambda s: clamp * 0.636 * torch.atan(s / clamp)  # noqa: E731
    jac = [0.0, 0.0, 0.0]
    for k, kernel in enumerate(kernels):
        np.random.seed(k)
        xs = [x[:, torch.as_tensor(np.random.permutation(x.shape[1]))] for x in xs]
        half = xs[0].shape[1] // 2
        x1 = [x[:, :half] for x in xs]
        x2 = [x[:, half:] for x in xs]
        r2 = _spec_cross_convs(p, f"flow.couplings.{k}.subnet_2.", x2, kernel)
        y1 = [torch.exp(log_e(r[:, :half])) * a + r[:, half:] for r, a in zip(r2, x1)]
        r1 = _spec_cross_convs(p, f"flow.couplings.{k}.subnet_1.", y1, kernel)
        y2 = [torch.exp(log_e(r[:, : x2[0].shape[1]])) * b + r[:, x2[0].shape[1] :] for r, b in zip(r1, x2)]
        for s in range(3):
            jac[s] = jac[s] + log_e(r1[s][:, : x2[0].shape[1]]).sum(dim=(1, 2, 3)) + log_e(r2[s][:, :half]).sum(dim=(1, 2, 3))
        xs = [torch.clamp(torch.cat([a, b], 1), -1e6, 1e6) for a, b in zip(y1, y2)]
    flat = torch.cat([z.reshape(z.shape[0], -1) for z in xs], dim=1)
    loss = torch.mean(0.5 * torch.sum(flat**2, dim=1) - sum(jac)) / flat.shape[1]
    return xs, sum(jac), loss, torch.mean(flat**2 / 2, dim=1)


@pytest.mark.parametrize("channels, grid, kernels", [(304, 8, (3, 3, 3, 5)), (10, 4, (3, 5)), (7, 8, (1,))])
def test_official_maths_from_the_spec_in_float64(channels, grid, kernels):
    model = CSFlow(
        input_size=grid * 32, backbone=_stride32(channels), hidden_channels=6, coupling_blocks=len(kernels), kernel_sizes=kernels
    ).to(F64)
    _randomize(model.flow, seed=3)
    xs = _features(2, channels, grid, seed=4)
    params = dict(model.named_parameters())
    z_spec, jac_spec, loss_spec, score_spec = _spec_flow(params, xs, kernels)
    z, logdet = model.flow(xs)
    for a, b in zip(z, z_spec):
        assert _rel(a, b) <= 1e-10
    assert torch.allclose(logdet, jac_spec, rtol=1e-10, atol=1e-10)
    assert abs(model.loss({"features": xs}).item() - loss_spec.item()) <= 1e-10 * abs(loss_spec.item())
    assert torch.allclose(image_score(z), score_spec, rtol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (F64, 1e-10)])
def test_inverse_of_forward_returns_the_input(dtype, tol):
    flow = CrossScaleFlow(6, coupling_blocks=3, hidden_channels=5, kernel_sizes=(3, 5, 3)).to(dtype)
    _randomize(flow, scale=0.2, seed=5)
    xs = _features(2, 6, 8, dtype=dtype, seed=6)
    z, logdet = flow(xs)
    back, logdet_rev = flow(z, rev=True)
    assert max(_rel(a, b) for a, b in zip(back, xs)) <= tol
    assert torch.allclose(logdet_rev, -logdet, rtol=tol, atol=tol)
    assert min((a - b).abs().max().item() for a, b in zip(z, xs)) > 1e-3  # not the identity


def test_log_det_equals_the_jacobian_and_gradients_pass_gradcheck():
    flow = CrossScaleFlow(4, coupling_blocks=2, hidden_channels=3, kernel_sizes=(3, 3)).to(F64)
    _randomize(flow, scale=0.3, seed=7)
    shapes = [(1, 4, 4, 4), (1, 4, 2, 2), (1, 4, 1, 1)]
    sizes = [math.prod(s) for s in shapes]

    def flat_forward(v: torch.Tensor) -> torch.Tensor:
        xs = [t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes)]
        z, _ = flow(xs)
        return torch.cat([t.flatten() for t in z])

    v = torch.randn(sum(sizes), dtype=F64, generator=torch.Generator().manual_seed(8))
    jacobian = torch.autograd.functional.jacobian(flat_forward, v)
    _, logdet = flow([t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes)])
    assert abs(torch.linalg.slogdet(jacobian).logabsdet.item() - logdet.item()) <= 1e-9
    xs = [torch.randn(s, dtype=F64, requires_grad=True) for s in [(2, 4, 4, 4), (2, 4, 2, 2), (2, 4, 1, 1)]]

    def outputs(*inputs):
        z, ld = flow(list(inputs))
        return (*z, ld)

    assert torch.autograd.gradcheck(outputs, tuple(xs), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = CSFlow(input_size=128, backbone="efficientnet_b0", pretrained=False, hidden_channels=16, coupling_blocks=2, kernel_sizes=(3, 5))
    _randomize(model.flow, scale=0.02, seed=9)
    return model.eval()


def test_frozen_features_are_the_extractor_at_three_nearest_scales(tiny):
    images = torch.randn(2, 3, 128, 128)
    feats = tiny.frozen_features(images)
    assert [tuple(f.shape) for f in feats] == [(2, 192, 4, 4), (2, 192, 2, 2), (2, 192, 1, 1)]
    for k, f in enumerate(feats):
        scaled = images if k == 0 else F.interpolate(images, size=(128 // 2**k,) * 2, mode="nearest")
        assert torch.equal(f, tiny.extractor(scaled)[0])
    assert torch.equal(tiny.loss(images), tiny.loss({"features": feats}))


def test_predict_names_its_maps_and_follows_the_config(tiny):
    images = torch.randn(2, 3, 128, 128)
    pred = tiny.predict(images)
    assert pred.anomaly_map.shape == (2, 128, 128) and pred.score.shape == (2,)
    assert torch.equal(pred.anomaly_map, pred.maps["anomaly_map_largest_scale"])
    assert {"anomaly_map_product", "z2_mean_0", "z2_mean_1", "z2_mean_2"} <= set(pred.maps)
    product = CSFlow(tiny.config.replace(anomaly_map="product"))
    product.load_state_dict(tiny.state_dict())
    assert torch.equal(product.eval().predict(images).anomaly_map, pred.maps["anomaly_map_product"])


def test_fast_paths_change_only_rounding(tiny):
    images = torch.randn(4, 3, 256, 256)
    model = CSFlow(tiny.config.replace(input_size=256))
    model.load_state_dict(tiny.state_dict())
    model.eval()
    fast = model.predict(images)
    enable_fast_paths(model, False)
    plain = model.predict(images)
    assert _rel(fast.score, plain.score) <= 1e-4
    assert _rel(fast.anomaly_map, plain.anomaly_map) <= 1e-4


def test_recipe_is_the_official_one():
    stage = CSFlow.recipe_for(CSFlowConfig()).stages[0]
    assert (stage.epochs, stage.batch_size, stage.lr, stage.eps, stage.weight_decay, stage.grad_clip) == (240, 16, 2e-4, 1e-4, 1e-5, 1.0)
    assert not stage.drop_last and stage.optimizer == "adam"


def test_bad_configs_and_sizes_are_refused():
    with pytest.raises(ValueError, match="kernel_sizes"):
        CSFlowConfig(coupling_blocks=3)
    with pytest.raises(ValueError, match="kernel_sizes"):
        CSFlowConfig(kernel_sizes=(3, 3, 3, 4))
    with pytest.raises(ValueError, match="permutation"):
        CSFlowConfig(permutation="random")
    with pytest.raises(ValueError, match="multiples of 128"):
        CSFlow(input_size=192, backbone=_stride32(8), hidden_channels=4)
    class TwoMaps(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = _stride32(4)

        def forward(self, x):
            return [self.conv(x), self.conv(x)]

    with pytest.raises(ValueError, match="one feature map"):
        CSFlow(input_size=128, backbone=TwoMaps(), hidden_channels=4)
    with pytest.raises(ValueError, match="EfficientNet-family"):
        CSFlow(input_size=128, backbone="resnet18", pretrained=False)


def test_checkpoint_round_trip(tiny, tmp_path):
    save(tiny, tmp_path / "csflow.pt")
    again = load_model(tmp_path / "csflow.pt").eval()
    images = torch.randn(2, 3, 128, 128)
    assert torch.equal(again.predict(images).score, tiny.predict(images).score)
    assert type(again) is CSFlow and again.config == tiny.config


def test_official_state_dict_loads_by_its_names(tiny):
    official = {}
    for key, value in tiny.flow.state_dict().items():
        if key.startswith("couplings."):
            block, rest = key[len("couplings.") :].split(".", 1)
            official[f"module_list.{4 + 2 * int(block)}.{rest.replace('subnet_1.', 's1.').replace('subnet_2.', 's2.')}"] = value.clone()
    fresh = load_official(CSFlow(tiny.config), official)
    for key, value in tiny.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_feature_cache_gives_the_same_training():
    data = SyntheticDefects("train", 6, 128, seed=0)
    runs = {}
    for mode in ("off", "memory"):
        torch.manual_seed(0)
        model = CSFlow(input_size=128, backbone="efficientnet_b0", pretrained=False, hidden_channels=8, coupling_blocks=1, kernel_sizes=(3,))
        result = fit(model, data, epochs=2, batch_size=4, seed=0, progress=False, feature_cache=mode, lr=1e-3)
        runs[mode] = (result, model)
    assert runs["memory"][0].feature_cache["train"].storage == "memory"
    assert runs["memory"][0].losses == pytest.approx(runs["off"][0].losses, rel=1e-5)


def test_cli_train_eval_predict_on_the_demo_data(tmp_path, capsys):
    root = tmp_path / "data"
    write_synthetic_dataset(root, "syn", num_train=4, num_test=4, input_size=128, seed=2)
    out = tmp_path / "run"
    common = ["--input-size", "128", "--backbone", "efficientnet_b0", "--no-pretrained", "--hidden-channels", "8",
              "--coupling-blocks", "1", "--kernel-sizes", "3"]
    rc = cli.main(["train", "--model", "csflow", "--data", str(root), "--category", "syn", "--out", str(out), "--epochs", "1",
                   "--batch-size", "4", "--no-progress", *common])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and 0.0 <= metrics["image_auroc"] <= 1.0
    rc = cli.main(["eval", "--data", str(root), "--category", "syn", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "ev"), "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["image_auroc"] == pytest.approx(metrics["image_auroc"])
    rc = cli.main(["predict", "--checkpoint", str(out), "--input", str(root / "syn" / "test" / "good"), "--out", str(tmp_path / "pred"), "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "pred" / "scores.csv").open()))
    assert len(rows) == len(list((root / "syn" / "test" / "good").glob("*.png"))) and all(float(r["score"]) >= 0 for r in rows)
