"""FastFlow against anomalib 2.7's FastflowModel on the same weights (resnet18 3-3 and 3-1, a small
ViT-token backbone): latents, log-dets, loss, gradients, maps and scores; presets, checkpoints
(anomalib Lightning, the ZeroPad key variant, gathierry/FastFlow), the log-space score, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anomalib.models.image.fastflow import torch_model as anomalib_fastflow
from anomalib.models.image.fastflow.loss import FastflowLoss
from msflow_fast import FastFlow, load_model, ops, save
from msflow_fast.models.fastflow import PRESETS, anomalib_config, load_anomalib, load_gathierry
from helpers import max_abs_err

SIZE = 64


def _perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every trainable parameter away from its initialisation (identity global affine, unit norms)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _pair(dtype=torch.float64, **options):
    """anomalib's FastflowModel and ours on the same weights (ours loaded from anomalib's state dict)."""
    torch.manual_seed(0)
    cnn = dict(backbone="resnet18", flow_steps=4, conv3x3_only=True, hidden_ratio=1.0)
    cnn.update(options)
    theirs = anomalib_fastflow.FastflowModel(input_size=(SIZE, SIZE), pre_trained=False, **cnn)
    _perturb(theirs)
    ours = FastFlow(input_size=SIZE, pretrained=False, **cnn)
    load_anomalib(ours, theirs.state_dict())
    return theirs.to(dtype), ours.to(dtype)


def _images(batch=2, dtype=torch.float64, seed=1):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _name_map(theirs_name: str) -> str:
    return theirs_name.replace("fast_flow_blocks.", "flows.")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _compare(theirs, ours, images, tol):
    """Latents, log-dets, loss, every gradient, map and score of the two models at ``images``."""
    theirs.train()
    ours.train()
    hidden, jacobians = theirs(images)
    # anomalib's FastflowLoss sums the stages onto a float32 zero (a float32 loss even for a float64
    # model): the same formula here in the model's dtype, and FastflowLoss checked to float32 rounding.
    loss_theirs = sum((0.5 * z.square().sum(dim=(1, 2, 3)) - j).mean() for z, j in zip(hidden, jacobians))
    torch.testing.assert_close(FastflowLoss()(hidden, jacobians).double(), loss_theirs.double(), rtol=1e-6, atol=1e-3)
    loss_theirs.backward()
    latents, logdets = ours(images)
    loss_ours = ours.loss(images)
    loss_ours.backward()
    for k, (z, zz) in enumerate(zip(hidden, latents)):
        assert _rel(zz, z) < tol, f"latent {k}"
    for k, (j, jj) in enumerate(zip(jacobians, logdets)):
        assert _rel(jj, j) < tol, f"logdet {k}"
    assert _rel(loss_ours, loss_theirs) < tol
    theirs_grads, ours_grads = _grads(theirs), _grads(ours)
    assert set(map(_name_map, theirs_grads)) == set(ours_grads)
    for name, g in theirs_grads.items():
        assert _rel(ours_grads[_name_map(name)], g) < max(tol, 1e-10 if tol < 1e-6 else tol), name
    theirs.eval()
    out = theirs(images)
    pred = ours.predict(images)
    assert _rel(pred.anomaly_map, out.anomaly_map[:, 0]) < tol
    assert _rel(pred.score, out.pred_score.reshape(-1)) < tol


@pytest.mark.parametrize("conv3x3_only", [True, False], ids=["3-3", "3-1"])
def test_float64_parity_with_anomalib_fastflow(conv3x3_only):
    theirs, ours = _pair(conv3x3_only=conv3x3_only)
    _compare(theirs, ours, _images(), tol=1e-10)


def test_float32_within_the_eager_float32_error():
    theirs64, ours64 = _pair(torch.float64)
    theirs32, ours32 = _pair(torch.float32)
    images = _images(dtype=torch.float64)
    exact = theirs64.eval()(images)
    eager = theirs32.eval()(images.float())
    pred = ours32.eval().predict(images.float())
    for name, a, e, x in (("map", pred.anomaly_map, eager.anomaly_map[:, 0], exact.anomaly_map[:, 0]), ("score", pred.score, eager.pred_score.reshape(-1), exact.pred_score.reshape(-1))):
        bound = 2 * max_abs_err(e, x) + 1e-6 * x.abs().max().item()
        assert max_abs_err(a, x) <= bound, f"{name}: {max_abs_err(a, x):.3e} > {bound:.3e}"
    theirs64.train()
    ours32.train()

    def loss(hidden, jacobians):
        return sum((0.5 * z.square().sum(dim=(1, 2, 3)) - j).mean() for z, j in zip(hidden, jacobians))

    exact_loss = loss(*theirs64(images))
    eager_loss = loss(*theirs32.train()(images.float()))
    ours_loss = ours32.loss(images.float())
    assert abs(ours_loss.item() - exact_loss.item()) <= 2 * abs(eager_loss.item() - exact_loss.item()) + 1e-5 * abs(exact_loss.item())


def test_float64_parity_with_a_small_vit_token_backbone(monkeypatch):
    """DeiT's token path (blocks 0..7, final norm, prefix tokens dropped) at 64 px: anomalib builds
    ``deit_base_distilled_patch16_384`` through timm, here with 8 blocks at 64 px."""
    import timm

    real = timm.create_model

    def small(name, *args, **kwargs):
        if name == "deit_base_distilled_patch16_384":
            kwargs.update(img_size=(SIZE, SIZE), depth=8)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(anomalib_fastflow.timm, "create_model", small)
    torch.manual_seed(0)
    options = dict(backbone="deit_base_distilled_patch16_384", flow_steps=2, conv3x3_only=False, hidden_ratio=0.16)
    theirs = anomalib_fastflow.FastflowModel(input_size=(SIZE, SIZE), pre_trained=False, **options)
    _perturb(theirs)
    ours = FastFlow(input_size=SIZE, pretrained=False, vit_block=7, feature_norm="backbone", **options)
    load_anomalib(ours, theirs.state_dict())
    assert ours.extractor.channels == [768] and ours.grids == [(4, 4)]
    _compare(theirs.double(), ours.double(), _images(), tol=1e-10)


def test_presets_have_the_published_parameter_counts():
    counts = {name: sum(p.numel() for p in FastFlow.from_preset(name, pretrained=False).parameters() if p.requires_grad)
              for name in ("resnet18", "wide_resnet50_2")}
    assert counts == {"resnet18": 5_574_912, "wide_resnet50_2": 45_007_872}
    assert set(PRESETS) == {"resnet18", "wide_resnet50_2", "deit", "cait"}
    assert PRESETS["deit"]["vit_block"] == 7 and PRESETS["cait"]["vit_block"] == 40
    assert PRESETS["wide_resnet50_2"]["conv3x3_only"] is False and PRESETS["resnet18"]["conv3x3_only"] is True


def test_checkpoints_of_anomalib_lightning_zero_pad_and_gathierry_load(tmp_path):
    theirs, _ = _pair(torch.float32, conv3x3_only=False)
    theirs.eval()
    images = _images(dtype=torch.float32)
    expected = theirs(images)
    state = theirs.state_dict()
    lightning = {
        "epoch": 3,
        "state_dict": {**{f"model.{k}": v for k, v in state.items()}, "post_processor.image_min": torch.tensor(0.0)},
        "hyper_parameters": {"backbone": "resnet18", "pre_trained": False, "flow_steps": 4, "conv3x3_only": False, "hidden_ratio": 1.0},
    }
    torch.save(lightning, tmp_path / "model.ckpt")
    config = anomalib_config(tmp_path / "model.ckpt")
    assert config.input_size == (SIZE, SIZE) and config.flow_steps == 4 and not config.conv3x3_only
    variants = {
        "lightning": (load_anomalib, tmp_path / "model.ckpt"),
        "zero_pad": (load_anomalib, {k.replace(".subnet.0.", ".subnet.1.").replace(".subnet.2.", ".subnet.4."): v for k, v in state.items()}),
        "gathierry": (load_gathierry, {"epoch": 9, "model_state_dict": {k.replace("fast_flow_blocks.", "nf_flows."): v for k, v in state.items()}}),
    }
    for name, (loader, source) in variants.items():
        model = loader(FastFlow(config), source).eval()
        pred = model.predict(images)
        torch.testing.assert_close(pred.anomaly_map, expected.anomaly_map[:, 0], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(pred.score, expected.pred_score.reshape(-1), rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="does not match the model"):
        load_anomalib(FastFlow(config.replace(flow_steps=2)), tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="holds no FastFlow weights"):
        load_gathierry(FastFlow(config), {"model_state_dict": {"other.weight": torch.zeros(1)}})


def test_a_real_anomalib_lightning_checkpoint_loads(tmp_path):
    """Trained by anomalib's Engine for one epoch, read back with weights_only=True."""
    from PIL import Image

    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Fastflow

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for folder in ("train/good", "test/good", "test/bad", "ground_truth/bad"):
        (root / folder).mkdir(parents=True)
    for i in range(4):
        for folder in ("train/good", "test/good", "test/bad"):
            Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / folder / f"{i:03d}.png")
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[8:20, 8:20] = 255
        Image.fromarray(mask).save(root / "ground_truth/bad" / f"{i:03d}_mask.png")
    data = Folder(name="tiny", root=str(root), normal_dir="train/good", abnormal_dir="test/bad", normal_test_dir="test/good",
                  mask_dir="ground_truth/bad", train_batch_size=2, eval_batch_size=2, num_workers=0)
    module = Fastflow(backbone="resnet18", pre_trained=False, flow_steps=2)
    Engine(max_epochs=1, default_root_dir=str(tmp_path / "out"), accelerator="cpu", devices=1, logger=False,
           enable_progress_bar=False).fit(model=module, datamodule=data)
    path = next((tmp_path / "out").rglob("*.ckpt"))
    config = anomalib_config(path)
    ours = load_anomalib(FastFlow(config), path).eval()
    theirs = module.model.eval()
    images = torch.randn(2, 3, 256, 256)
    torch.testing.assert_close(ours.predict(images).score, theirs(images).pred_score.reshape(-1), rtol=1e-5, atol=1e-6)


def test_log_space_score_ranks_as_the_official_score_and_never_underflows():
    torch.manual_seed(5)
    near = [-(2.0 * torch.rand(6, 8, 8, dtype=torch.float64)), -(2.0 * torch.rand(6, 4, 4, dtype=torch.float64))]
    far = [m * 200.0 for m in near]  # exp(L) underflows to 0 in float32 for these
    for backend in ["reference", *[b for b in ops.available_backends("cpu", "fastflow_anomaly_map") if b != "reference"]]:
        amap, score, log_score = ops.aggregate_anomaly_maps(near, (32, 32), mode="fastflow", log_space_score=True, backend=backend)
        assert torch.equal(torch.argsort(score), torch.argsort(log_score)), backend
        torch.testing.assert_close(log_score, (-torch.log(-amap)).flatten(1).amax(1))
        amap32, score32, log32 = ops.aggregate_anomaly_maps([m.float() for m in far], (32, 32), mode="fastflow", log_space_score=True, backend=backend)
        assert (score32 == 0).all(), "float32 underflow: every image ties at 0"
        exact = ops.reference.fastflow_anomaly_map(far, (32, 32), log_space_score=True)[2]
        torch.testing.assert_close(log32.double(), exact, rtol=1e-5, atol=1e-3)
        assert torch.unique(log32).numel() == 6


def test_layer_norm_ties_the_input_size_and_channel_norm_does_not():
    faithful = FastFlow(input_size=SIZE, pretrained=False, flow_steps=2)
    with pytest.raises(ValueError, match="must be 64x64: the \\[C, H, W\\] LayerNorms"):
        faithful.predict(torch.randn(1, 3, 96, 96))
    agnostic = FastFlow(input_size=SIZE, pretrained=False, flow_steps=2, feature_norm="channel")
    for size in (64, 96):
        pred = agnostic.predict(torch.randn(1, 3, size, size))
        assert pred.anomaly_map.shape == (1, size, size)
    assert agnostic.norms[0].weight.shape == (64, 1, 1)


def test_save_load_and_cli_train_eval_predict(tmp_path, capsys):
    from msflow_fast import cli
    from msflow_fast.engine import write_synthetic_dataset

    model = FastFlow(input_size=SIZE, pretrained=False, flow_steps=2)
    _perturb(model)
    save(model, tmp_path / "ff.pt")
    again = load_model(tmp_path / "ff.pt")
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(again.predict(x).anomaly_map, model.predict(x).anomaly_map)
    data = tmp_path / "data"
    write_synthetic_dataset(data, "syn", num_train=8, num_test=6, input_size=SIZE, seed=0)
    out = tmp_path / "run"
    argv = ["train", "--model", "fastflow", "--preset", "resnet18", "--input-size", str(SIZE), "--no-pretrained", "--flow-steps", "2",
            "--data", str(data), "--category", "syn", "--out", str(out), "--epochs", "2", "--batch-size", "4", "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["maps"] == {"pixel_auroc": "anomaly_map", "aupro": "anomaly_map"}
    state = load_model(out).config
    assert state.backbone == "resnet18" and state.flow_steps == 2 and state.conv3x3_only is True
    assert cli.main(["eval", "--data", str(data), "--category", "syn", "--checkpoint", str(out), "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    assert cli.main(["predict", "--checkpoint", str(out), "--input", str(data / "syn" / "test" / "good"), "--out", str(tmp_path / "p"), "--no-progress"]) == 0


def test_fastflow_heat_maps_use_the_maps_range(tmp_path):
    """FastFlow maps lie in [-1, 0]: the overlays' colour range is the run's min..max, not 0..max."""
    from PIL import Image

    from msflow_fast.engine import SyntheticDefects, predict_folder

    model = FastFlow(input_size=SIZE, pretrained=False, flow_steps=2)
    _perturb(model, 0.2)
    folder = tmp_path / "images"
    folder.mkdir()
    data = SyntheticDefects("test", 4, SIZE, seed=2)
    for i in range(4):
        Image.fromarray(data.raw(i)[0]).save(folder / f"{i}.png")
    results = predict_folder(model, folder, tmp_path / "out", progress=False)
    overlay = np.asarray(Image.open(results[1]["heatmap"]), np.float32)[:, SIZE + 4 :]
    image = np.asarray(Image.open(results[1]["heatmap"]), np.float32)[:, :SIZE]
    assert (overlay - 0.5 * image).std() > 5.0, "the overlay carries no heat map"


def test_backbone_weights_read_from_a_file_are_stored_and_reloaded_without_a_download(tmp_path, monkeypatch):
    theirs, _ = _pair(torch.float32, conv3x3_only=False)
    config = FastFlow(input_size=SIZE, pretrained=False, flow_steps=4, conv3x3_only=False).config.replace(pretrained=True)
    import timm

    real = timm.create_model

    def no_download(*args, pretrained=False, **kwargs):
        if pretrained:
            raise ConnectionError("no network here")
        return real(*args, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_download)
    ours = FastFlow(config.replace(pretrained=False))
    ours.config = config  # as anomalib_config gives it: pretrained weights in the file
    load_anomalib(ours, theirs.state_dict())
    assert ours.extractor.source == "file"
    save(ours, tmp_path / "ff.pt")
    again = load_model(tmp_path / "ff.pt")  # would raise ConnectionError if it asked timm for weights
    assert again.config.pretrained is True and again.extractor.source == "file"
    images = _images(dtype=torch.float32)
    torch.testing.assert_close(again.eval().predict(images).score, theirs.eval()(images).pred_score.reshape(-1), rtol=1e-5, atol=1e-6)


def test_vit_token_maps_follow_timm_for_pre_norm_vits_and_cait():
    import timm

    from msflow_fast.models.extractor import ViTTokenMaps

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3, pre_norm=True).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ours = ViTTokenMaps(vit, 2)(x)[0]
        expected = vit.forward_features(x)[:, vit.num_prefix_tokens :].transpose(1, 2).reshape(2, -1, 4, 4)
    torch.testing.assert_close(ours, expected)
    cait = timm.create_model("cait_xxs24_224", pretrained=False, img_size=64, depth=5).eval()
    with torch.no_grad():
        ours = ViTTokenMaps(cait, 3)(x)[0]
        tokens = cait.pos_drop(cait.patch_embed(x) + cait.pos_embed)
        for block in cait.blocks[:4]:
            tokens = block(tokens)
        expected = cait.norm(tokens).transpose(1, 2).reshape(2, -1, 4, 4)
    torch.testing.assert_close(ours, expected)
    with pytest.raises(ValueError, match="outside the 5 blocks"):
        ViTTokenMaps(cait, 5)


def test_vit_models_refuse_other_image_sizes_clearly():
    model = FastFlow(input_size=SIZE, pretrained=False, backbone="vit_tiny_patch16_224", vit_block=1, feature_norm="channel", flow_steps=2, hidden_ratio=0.16)
    assert model.predict(torch.randn(1, 3, SIZE, SIZE)).score.shape == (1,)
    with pytest.raises(ValueError, match="position table is built for that size"):
        model.predict(torch.randn(1, 3, 96, 96))


def test_channel_affine_broadcasts_over_any_trailing_dims():
    from msflow_fast.nn import SampleLayerNorm

    norm = SampleLayerNorm((8,), affine="channel")
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0).view(8, 1, 1))
        norm.bias.copy_(torch.arange(8.0).view(8, 1, 1))
    for shape in ((2, 8, 4, 8), (2, 8, 5)):
        x = torch.randn(shape)
        normed = torch.nn.functional.layer_norm(x, x.shape[1:])
        per_channel = (8,) + (1,) * (x.dim() - 2)
        torch.testing.assert_close(norm(x), normed * torch.arange(1.0, 9.0).view(per_channel) + torch.arange(8.0).view(per_channel))
    with pytest.raises(ValueError, match="channel affine of 8 channels"):
        norm(torch.randn(2, 7, 4, 4))


@pytest.mark.parametrize("backend", ["reference", *[b for b in ops.available_backends("cpu", "fastflow_anomaly_map") if b != "reference"]])
def test_fastflow_map_keeps_denormal_probabilities(backend):
    """exp(L) for L in (-104, -87) is a denormal float32: every backend keeps it (anomalib does)."""
    maps = [torch.full((3, 4, 4), -20.0)]
    for image, level in enumerate((-90.0, -95.0, -100.0)):
        maps[0][image] = level
    amap, score = ops.aggregate_anomaly_maps(maps, (4, 4), mode="fastflow", backend=backend)
    expected = -torch.exp(torch.tensor([-90.0, -95.0, -100.0]))
    assert (expected != 0).all()
    torch.testing.assert_close(score, expected, rtol=1e-3, atol=0.0)
