"""fit(feature_cache=...): the same training as without the cache, memory and disk storage, reuse
and invalidation of a disk cache, nothing half-written, DDP, and the bf16 backbone option."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from helpers import TinyBackbone
from msflow_fast import MSFlow
from msflow_fast.engine import MVTecDataset, SyntheticDefects, fit, seed_everything, write_synthetic_dataset
from msflow_fast.engine.feature_cache import CACHE_FOLDER, FeatureCache, cache_key
from msflow_fast.models import FeatureExtractor
from msflow_fast.models.fastflow import FastFlow

SMALL = dict(c_cond=8, parallel_blocks=(1, 1, 1), pretrained=False, input_size=32)


class CountingBackbone(TinyBackbone):
    """TinyBackbone that counts the images it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return super().forward(x)


def _msflow(seed: int = 0) -> MSFlow:
    seed_everything(seed)
    return _counted(MSFlow(backbone=CountingBackbone(), **SMALL))


def _fastflow(seed: int = 0) -> FastFlow:
    seed_everything(seed)
    return _counted(FastFlow(backbone=CountingBackbone(), pretrained=False, input_size=32, flow_steps=2, feature_norm="channel"))


def _counted(model):
    model.extractor.backbone.images = 0  # not the extractor's probe forward
    return model


def _train(make, data, mode, **kw):
    model = make()
    kw = {"epochs": 3, "batch_size": 4, "lr": 1e-3, "seed": 0, "progress": False, **kw}
    result = fit(model, data, feature_cache=mode, **kw)
    return model, result


def _weights(model):
    return {k: v for k, v in model.state_dict().items() if "extractor" not in k}


@pytest.mark.parametrize("make", [_msflow, _fastflow], ids=["msflow", "fastflow"])
def test_cached_training_equals_uncached(make, tmp_path):
    """Same seed, same per-epoch losses (to float32 rounding) and weights; FastFlow's recipe drops the
    incomplete last batch, so its cache must also fill the images the first epoch did not see."""
    data = SyntheticDefects("train", 10, 32, seed=1)  # 10 = 2 full batches of 4 + 2
    plain, plain_result = _train(make, data, "off")
    for mode in ("memory", "disk"):
        cached, result = _train(make, data, mode, out_dir=tmp_path / mode)
        torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(plain_result.losses), rtol=1e-5, atol=1e-5)
        for key, value in _weights(plain).items():
            torch.testing.assert_close(_weights(cached)[key], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{mode} {key}: {m}")
        report = result.feature_cache["train"]
        assert report.storage == mode and report.items == 10 and report.bytes > 0
        # the backbone saw each image once (first epoch + the dropped batch), not once per epoch
        assert cached.extractor.backbone.images == 10
    assert plain.extractor.backbone.images >= 3 * 8
    assert plain_result.feature_cache["train"].storage == "off"


def test_auto_caches_in_memory_and_falls_back_to_disk_then_off(tmp_path):
    data = SyntheticDefects("train", 6, 32, seed=1)
    _, result = _train(_msflow, data, "auto", epochs=2)
    assert result.feature_cache["train"].storage == "memory"
    model, result = _train(_msflow, data, "auto", epochs=2, out_dir=tmp_path / "run", feature_cache_memory=0)
    report = result.feature_cache["train"]
    assert report.storage == "disk" and "over the memory budget" in report.reason
    assert (tmp_path / "run" / CACHE_FOLDER / "meta.json").is_file()
    _, result = _train(_msflow, data, "auto", epochs=2, feature_cache_memory=0)
    report = result.feature_cache["train"]
    assert report.storage == "off" and "no out_dir" in report.reason


class _RandomCrops(Dataset):
    """A dataset with random augmentation: it does not declare deterministic_items."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"image": torch.randn(3, 32, 32)}


def test_auto_is_off_without_a_deterministic_dataset_or_a_frozen_part():
    _, result = _train(_msflow, _RandomCrops(), "auto", epochs=1)
    assert result.feature_cache["train"].storage == "off" and "deterministic_items" in result.feature_cache["train"].reason
    loader = DataLoader(SyntheticDefects("train", 4, 32), batch_size=2)
    _, result = _train(_msflow, loader, "auto", epochs=1)
    assert "not a map-style Dataset" in result.feature_cache["train"].reason

    class NoFrozenPart(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def loss(self, batch):
            return (batch["image"].mean() * self.w) ** 2

    result = fit(NoFrozenPart(), SyntheticDefects("train", 4, 32), epochs=1, batch_size=2, progress=False)
    assert "no frozen part" in result.feature_cache["train"].reason


def test_bad_cache_arguments_are_refused(tmp_path):
    data = SyntheticDefects("train", 4, 32)
    with pytest.raises(ValueError, match="feature_cache: expected one of"):
        fit(_msflow(), data, epochs=1, feature_cache="yes", progress=False)
    with pytest.raises(ValueError, match="needs out_dir"):
        fit(_msflow(), data, epochs=1, feature_cache="disk", progress=False)
    with pytest.raises(ValueError, match="map-style Dataset"):
        fit(_msflow(), DataLoader(data, batch_size=2), epochs=1, feature_cache="memory", progress=False)
    with pytest.raises(ValueError, match="fingerprint"):
        fit(_msflow(), _RandomCrops(), epochs=1, feature_cache="disk", out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="feature_cache_dtype"):
        fit(_msflow(), data, epochs=1, feature_cache_dtype="int8", progress=False)
    with pytest.raises(ValueError, match="feature_cache_memory"):
        fit(_msflow(), data, epochs=1, feature_cache_memory=-1, progress=False)


def test_a_disk_cache_is_reused_on_resume_and_gives_the_uninterrupted_run(tmp_path):
    data = SyntheticDefects("train", 8, 32, seed=2)
    _, full = _train(_msflow, data, "off", epochs=4)
    run = tmp_path / "run"
    interrupted = _msflow()
    loss, calls = interrupted.loss, [0]

    def stop_in_epoch_three(batch):
        calls[0] += 1
        if calls[0] > 2 * 2 + 1:  # 2 steps per epoch
            raise KeyboardInterrupt("simulated interruption")
        return loss(batch)

    interrupted.loss = stop_in_epoch_three
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, data, epochs=4, batch_size=4, lr=1e-3, seed=0, progress=False, feature_cache="disk", out_dir=run)
    model, resumed = _train(_msflow, data, "disk", epochs=4, out_dir=run, resume=True)
    report = resumed.feature_cache["train"]
    assert report.reused and report.storage == "disk"
    assert model.extractor.backbone.images == 0  # no backbone pass at all
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[2:]), rtol=1e-5, atol=1e-5)


def test_a_stale_disk_cache_is_never_used(tmp_path):
    root = write_synthetic_dataset(tmp_path / "data", num_train=6, num_test=2, input_size=32, seed=0)
    data = MVTecDataset(root, split="train", input_size=32)
    run = tmp_path / "run"
    _train(_msflow, data, "disk", epochs=1, out_dir=run, batch_size=3)
    key = cache_key(_msflow(), data, "train", None, None)
    assert json.loads((run / CACHE_FOLDER / "meta.json").read_text())["key"] == key
    # the same files: reused
    _, result = _train(_msflow, data, "disk", epochs=1, out_dir=run, batch_size=3, overwrite=True)
    assert result.feature_cache["train"].reused
    # an image rewritten (new content and time): a new key, the cache is rebuilt
    image = data.samples[0][0]
    image.write_bytes((root / "train" / "good").joinpath(data.samples[1][0].name).read_bytes())
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    data = MVTecDataset(root, split="train", input_size=32)
    assert cache_key(_msflow(), data, "train", None, None) != key
    model, result = _train(_msflow, data, "disk", epochs=1, out_dir=run, batch_size=3, overwrite=True)
    assert not result.feature_cache["train"].reused and model.extractor.backbone.images == 6
    # other backbone weights, other input size, autocast or storage dtype: other keys
    other = _msflow(seed=5)
    with torch.no_grad():
        other.extractor.backbone.stem[0].weight.add_(1.0)
    assert cache_key(other, data, "train", None, None) != cache_key(_msflow(), data, "train", None, None)
    assert cache_key(_msflow(), MVTecDataset(root, split="train", input_size=64), "train", None, None) != key
    assert cache_key(_msflow(), data, "train", torch.bfloat16, None) != cache_key(_msflow(), data, "train", None, None)


def test_a_corrupt_or_hostile_disk_cache_is_ignored(tmp_path):
    data = SyntheticDefects("train", 4, 32)
    key = cache_key(_msflow(), data, "train", None, None)
    folder = tmp_path / CACHE_FOLDER
    folder.mkdir()
    for meta in ("not json", json.dumps({"format": 1, "key": key, "size": 4, "maps": [{"shape": [8, 4, 4], "dtype": "float32", "stored": "float32"}]}),
                 json.dumps({"format": 1, "key": key, "size": 4, "maps": [{"shape": [8], "dtype": "float32", "stored": "__import__"}]})):
        (folder / "meta.json").write_text(meta)
        (folder / "features_0.bin").write_bytes(b"\0" * 7)  # wrong size
        assert FeatureCache.open(tmp_path, key, 4) is None
    model, result = _train(_msflow, data, "disk", epochs=1, out_dir=tmp_path, batch_size=2)
    assert not result.feature_cache["train"].reused and model.extractor.backbone.images == 4


class _Interrupted(Dataset):
    deterministic_items = True

    def __init__(self, stop_after):
        self.inner, self.stop_after, self.calls = SyntheticDefects("train", 8, 32), stop_after, 0

    def fingerprint(self):
        return "interrupted-8"

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.calls += 1
        if self.calls > self.stop_after:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner[i]


def test_an_interrupted_build_leaves_no_half_written_cache(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train(_msflow, _Interrupted(stop_after=5), "disk", epochs=2, out_dir=tmp_path, batch_size=2)
    leftovers = [p.name for p in tmp_path.iterdir() if CACHE_FOLDER in p.name]
    assert leftovers == []


def test_bf16_storage_halves_the_cache_and_keeps_the_dtype():
    data = SyntheticDefects("train", 8, 32, seed=3)
    _, fp32 = _train(_msflow, data, "memory", epochs=2)
    _, bf16 = _train(_msflow, data, "memory", epochs=2, feature_cache_dtype="bfloat16")
    assert bf16.feature_cache["train"].bytes * 2 == fp32.feature_cache["train"].bytes
    assert abs(bf16.losses[-1] - fp32.losses[-1]) <= 0.02 * abs(fp32.losses[-1])


def _ddp_worker(rank, world, init_file, mode, result_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _fastflow(seed=rank)  # rank 0's weights are broadcast
        result = fit(model, SyntheticDefects("train", 10, 32, seed=4), epochs=3, lr=1e-3, batch_size=2, seed=0,
                     progress=False, feature_cache=mode)
        torch.save({"weights": _weights(model), "losses": result.losses, "storage": result.feature_cache["train"].storage,
                    "images": model.extractor.backbone.images}, os.path.join(result_dir, f"{mode}{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_share_their_shards_and_train_as_without_the_cache(tmp_path):
    for mode in ("off", "memory"):
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / f"init-{mode}"), mode, str(tmp_path)), nprocs=2, join=True)
    off = [torch.load(tmp_path / f"off{r}.pt") for r in range(2)]
    cached = [torch.load(tmp_path / f"memory{r}.pt") for r in range(2)]
    assert [c["storage"] for c in cached] == ["memory", "memory"]
    # 10 images, 2 ranks, batch 2, drop_last: each rank saw 4 of its 5 in epoch 1, then the rest were filled
    assert sum(c["images"] for c in cached) == 10
    for r in range(2):
        torch.testing.assert_close(torch.tensor(cached[r]["losses"]), torch.tensor(off[r]["losses"]), rtol=1e-5, atol=1e-5)
        for key, value in off[r]["weights"].items():
            torch.testing.assert_close(cached[r]["weights"][key], value, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bf16 backbone


def test_bf16_backbone_keeps_float32_outputs_and_stays_close():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    fp32 = FeatureExtractor(TinyBackbone().eval())
    bf16 = FeatureExtractor(TinyBackbone().eval(), precision="bfloat16")
    bf16.backbone.load_state_dict(fp32.backbone.state_dict())
    for a, b in zip(fp32(images), bf16(images)):
        assert b.dtype == torch.float32 and b.is_contiguous()
        assert ((a - b).norm() / a.norm()).item() < 2e-2
    with pytest.raises(ValueError, match="precision"):
        FeatureExtractor(TinyBackbone(), precision="int8")


def test_backbone_precision_is_a_config_field_that_reaches_the_extractor():
    model = MSFlow(backbone="resnet18", backbone_precision="bfloat16", **SMALL)
    assert model.extractor.precision == "bfloat16" and model.config.backbone_precision == "bfloat16"
    out = model.predict(torch.randn(1, 3, 32, 32))
    assert out.anomaly_map.dtype == torch.float32
    with pytest.raises(ValueError, match="backbone_precision"):
        MSFlow(backbone="resnet18", backbone_precision="half", **SMALL)
    fast = FastFlow(backbone="resnet18", pretrained=False, input_size=32, flow_steps=1, backbone_precision="bfloat16")
    assert fast.extractor.precision == "bfloat16"


def test_channels_last_changes_only_rounding():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    standard = FeatureExtractor("resnet18", pretrained=False).set_channels_last(False)
    ref = standard(images)
    for a, b in zip(ref, standard.set_channels_last(True)(images)):
        assert b.is_contiguous()
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
