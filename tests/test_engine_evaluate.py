"""evaluate() / predict_folder(): metrics from collected maps, outputs on disk, overlays, bad inputs."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from msflow_fast._files import atomic_write, atomic_write_json
from msflow_fast.engine import SyntheticDefects, apply_colormap, aupro, evaluate, fit, overlay, predict_folder
from msflow_fast.models import read as load_checkpoint
from test_engine_protocol import TinyFlowModel


class _Oracle(torch.nn.Module):
    """predict() returns fixed maps/scores looked up from the images' first pixel (the item index);
    a plain module (not an AnomalyModel) that routes AUPRO to its second map, as MSFlow does."""

    metric_maps = {"aupro": "anomaly_map_mul"}

    def __init__(self, maps_add, maps_mul, scores):
        super().__init__()
        self.maps_add, self.maps_mul, self.scores = maps_add, maps_mul, scores
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def predict(self, images):
        idx = images[:, 0, 0, 0].round().long()
        return SimpleNamespace(anomaly_map=self.maps_add[idx], score=self.scores[idx], maps={"anomaly_map_mul": self.maps_mul[idx]})


def _batches(n, size, masks, bs=3):
    for start in range(0, n, bs):
        idx = torch.arange(start, min(n, start + bs))
        images = idx.float().view(-1, 1, 1, 1).expand(-1, 3, size, size).clone()
        yield {"image": images, "mask": masks[idx], "label": masks[idx].flatten(1).any(1).long()}


def test_evaluate_matches_direct_metrics():
    g = torch.Generator().manual_seed(0)
    n, size = 7, 12
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[1::2, 3:7, 2:9] = True
    maps_add = torch.rand(n, size, size, generator=g) + masks
    maps_mul = torch.rand(n, size, size, generator=g) + 0.5 * masks
    scores = torch.rand(n, generator=g)
    model = _Oracle(maps_add, maps_mul, scores)
    result = evaluate(model, list(_batches(n, size, masks)), progress=False)
    labels = masks.flatten(1).any(1).numpy()
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores.numpy()))
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.numpy().ravel(), maps_add.numpy().ravel()))
    assert result["aupro"] == pytest.approx(aupro(maps_mul, masks))
    assert result["num_images"] == n and result["num_anomalous"] == 3 and result["units"] == "fraction"
    assert result["maps"] == {"pixel_auroc": "anomaly_map", "aupro": "anomaly_map_mul"}
    # without a routing, every pixel metric reads anomaly_map
    model.metric_maps = {}
    plain = evaluate(model, list(_batches(n, size, masks)), progress=False)
    assert plain["aupro"] == pytest.approx(aupro(maps_add, masks)) and plain["aupro"] != pytest.approx(result["aupro"])


def test_evaluate_without_anomalies_gives_none():
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    model = _Oracle(torch.rand(4, 8, 8), torch.rand(4, 8, 8), torch.rand(4))
    result = evaluate(model, list(_batches(4, 8, masks)), progress=False)
    assert result["image_auroc"] is None and result["pixel_auroc"] is None and result["aupro"] is None


def test_evaluate_shape_mismatch_is_explained():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    model = _Oracle(torch.rand(2, 6, 6), torch.rand(2, 6, 6), torch.rand(2))
    with pytest.raises(ValueError, match="'anomaly_map' has shape .* but the masks are"):
        evaluate(model, list(_batches(2, 8, masks)), progress=False)


def test_evaluate_trained_stand_in_on_synthetic_defects(tmp_path):
    model = TinyFlowModel(input_size=64)
    fit(model, SyntheticDefects("train", 16, 64, seed=0), epochs=10, lr=0.05, batch_size=8, progress=False, warmup_epochs=0)
    test = SyntheticDefects("test", 12, 64, seed=0)
    result = evaluate(model, test, batch_size=4, out_dir=tmp_path, heatmaps=True, progress=False)
    assert result["image_auroc"] > 0.6 and result["pixel_auroc"] > 0.6
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["aupro"] == pytest.approx(result["aupro"])
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert len(rows) == 12 and {r["label"] for r in rows} == {"0", "1"}
    pngs = sorted((tmp_path / "heatmaps").glob("*.png"))
    assert len(pngs) == 12
    assert Image.open(pngs[0]).size == (3 * 64 + 8, 64)


def test_predict_folder_writes_overlays_and_csv(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    ds = SyntheticDefects("test", 3, 40, seed=1)
    for i in range(3):
        Image.fromarray(ds.raw(i)[0]).save(src / f"im{i}.png")
    model = TinyFlowModel(input_size=32)
    results = predict_folder(model, src, tmp_path / "out", batch_size=2, progress=False)
    assert [r["path"].endswith(f"im{i}.png") for i, r in enumerate(results)] == [True] * 3
    rows = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert len(rows) == 3 and float(rows[0]["score"]) == pytest.approx(results[0]["score"], rel=1e-6)
    assert Image.open(results[0]["heatmap"]).size == (2 * 32 + 4, 32)


def test_colormap_and_overlay():
    rgb = apply_colormap(np.array([0.0, 0.5, 1.0, 2.0, np.nan]))
    assert rgb.dtype == np.uint8 and rgb.shape == (5, 3)
    assert tuple(rgb[2]) == tuple(rgb[3])  # clipped
    assert rgb[0, 2] > rgb[0, 0] and rgb[2, 0] > rgb[2, 2]  # blue at 0, red at 1
    img = np.full((4, 5, 3), 100, np.uint8)
    out = overlay(img, np.zeros((4, 5)), alpha=0.0)
    assert np.array_equal(out, img)
    with pytest.raises(ValueError, match="heat"):
        overlay(img, np.zeros((5, 4)))


def test_atomic_json_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    atomic_write_json(tmp_path / "m.json", {"a": 2})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


class _TinyBackbone(torch.nn.Module):
    """Three random conv stages at strides 4 / 8 / 16 (8 / 16 / 32 channels)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.s2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.s3 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        b = torch.relu(self.s2(a))
        return [a, b, torch.relu(self.s3(b))]


def test_real_msflow_fit_resume_evaluate(tmp_path):
    from msflow_fast import MSFlow, MSFlowConfig, load_model, save

    torch.manual_seed(0)
    config = MSFlowConfig(input_size=64, pretrained=False, parallel_blocks=(1, 1, 1), c_cond=8)
    model = MSFlow(config, backbone=_TinyBackbone())
    train = SyntheticDefects("train", 8, 64, seed=0)
    first = fit(model, train, epochs=2, lr=1e-3, batch_size=4, out_dir=tmp_path, progress=False)
    assert all(np.isfinite(first.losses))
    again = fit(model, train, epochs=3, lr=1e-3, batch_size=4, out_dir=tmp_path, resume=True, progress=False)
    assert again.start_epoch == 2 and len(again.losses) == 1
    result = evaluate(model, SyntheticDefects("test", 6, 64, seed=0), batch_size=3, progress=False)
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= result[key] <= 1.0
    assert result["maps"] == {"pixel_auroc": "anomaly_map", "aupro": "anomaly_map_mul"}

    # last.pt is a model checkpoint plus "training": load_model rebuilds the MSFlow from it
    state = load_checkpoint(tmp_path)
    assert state["model"] == "msflow" and state["extractors"]["extractor"]["source"] == "module"
    assert state["training"]["epoch"] == 2
    assert any(k.startswith("extractor.backbone.") for k in state["weights"])  # a given module is stored
    rebuilt = load_model(tmp_path / "last.pt", backbone=_TinyBackbone())
    x = SyntheticDefects("test", 2, 64, seed=1)[0]["image"][None]
    torch.testing.assert_close(rebuilt.predict(x).score, model.predict(x).score)
    # a model-only checkpoint evaluates but cannot be resumed
    save(model, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="model.pt.*without training state"):
        fit(model, train, epochs=4, out_dir=tmp_path / "o", resume=tmp_path / "model.pt", progress=False)


def test_corrupt_training_checkpoint_is_named(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="last.pt.*corrupt"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="last.pt"):
        fit(TinyFlowModel(input_size=16), [torch.zeros(1, 3, 16, 16)], epochs=1, out_dir=tmp_path, resume=True, progress=False)


def test_non_finite_images_are_named_and_decoded_files_are_not_checked(tmp_path, monkeypatch):
    from msflow_fast.engine import data as engine_data

    ds = SyntheticDefects("test", 6, 16, seed=0)
    items = [dict(ds[i], path=f"/data/{i:03d}.png") for i in range(6)]
    items[4]["image"][0, 1, 1] = float("nan")
    model = TinyFlowModel(input_size=16)
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    with pytest.raises(ValueError, match=r"/data/004\.png \(image 0 of the batch\) in evaluation batch 2 contains NaN"):
        evaluate(model, Items(), batch_size=4, progress=False)  # batches collated by a DataLoader
    batches = [{"image": torch.stack([it["image"] for it in items[:3]]), "label": torch.tensor([0, 1, 0])}]
    with pytest.raises(ValueError, match=r"^non-finite input image: image 1 of the batch"):
        evaluate(model, [{"image": torch.stack([it["image"] for it in items[3:6]]), "label": torch.tensor([1, 0, 1])}], progress=False)
    assert evaluate(model, batches, pixel_metrics=False, progress=False)["num_images"] == 3

    # Decoded files are 8-bit, always finite: evaluate and predict_folder make no NaN pass over them.
    calls = []
    real_check = engine_data.check_finite_images
    import importlib

    evaluate_module = importlib.import_module("msflow_fast.engine.evaluate")
    monkeypatch.setattr(evaluate_module, "check_finite_images", lambda *a, **k: calls.append(1) or real_check(*a, **k))
    evaluate(model, SyntheticDefects("test", 4, 16, seed=0), batch_size=2, progress=False)
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(folder / f"{name}.png")
    predict_folder(model, folder, tmp_path / "out", batch_size=2, progress=False)
    assert calls == []
    with pytest.raises(ValueError, match="004"):  # tensors from a custom Dataset are checked
        evaluate(model, Items(), batch_size=6, progress=False)
    assert calls == [1]


def test_interrupted_writes_keep_the_old_file(tmp_path, monkeypatch):
    """A write that dies half-way (disk full, Ctrl-C) leaves the previous file whole and no temp file."""
    metrics = tmp_path / "metrics.json"
    atomic_write_json(metrics, {"auroc": 0.9})

    def half_then_fail(f):
        f.write(b'{"auroc": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(metrics, half_then_fail)
    assert json.loads(metrics.read_text()) == {"auroc": 0.9}

    ckpt = tmp_path / "last.pt"
    atomic_write(ckpt, lambda f: torch.save({"epoch": 1, "w": torch.arange(4.0)}, f))
    real_save = torch.save

    def save_half(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(ckpt, lambda f: torch.save({"epoch": 2, "w": torch.zeros(4)}, f))
    monkeypatch.undo()
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.json"]
