"""The pseudo-anomaly generator (engine.data.pseudo_anomaly), its gallery command and ``eval --pseudo-anomalies``.

Tiny sizes (64 px) throughout; torch runs on one thread here (these are many small ops, where
intra-op threads only add overhead on a shared machine).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from msflow_fast import cli
from msflow_fast.engine import SyntheticDefects, denormalize, normalize, write_synthetic_dataset
from msflow_fast.engine.data.pseudo import colour, perlin, poisson, priors
from msflow_fast.engine.data.pseudo.draws import generator
from msflow_fast.engine.data.pseudo.textures import PROCEDURAL_KINDS, SKIMAGE_TEXTURES, skimage_available, texture
from msflow_fast.engine.data.pseudo_anomaly import (
    BRANCHES,
    PseudoAnomalyConfig,
    PseudoAnomalyDataset,
    PseudoAnomalyGenerator,
)
from msflow_fast.engine.pseudo_eval import holdout_split

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def goods() -> list[torch.Tensor]:
    """Eight good 64-px images in [0, 1]."""
    data = SyntheticDefects("train", 8, SIZE, seed=0)
    return [denormalize(data[i]["image"]) for i in range(8)]


def _disk_image(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright textured disk on a dark background (an "object" image) and the disk's mask."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    disk = ((yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2).sqrt() < size * 0.3
    g = torch.Generator().manual_seed(1)
    image = torch.full((3, size, size), 0.08)
    shade = torch.tensor([0.5, 0.7, 0.4]).view(3, 1, 1) + 0.05 * torch.rand(3, size, size, generator=g)
    return torch.where(disk, shade, image), disk.float()


# ---------------------------------------------------------------------------------------------- statistics


def test_statistics_over_1000_seeded_draws(goods):
    cfg = PseudoAnomalyConfig()
    gen = PseudoAnomalyGenerator(cfg, seed=0)
    branches, areas = collections.Counter(), collections.defaultdict(list)
    for i in range(1000):
        s = gen(goods[i % 8], i, other=goods[(i + 1) % 8])
        branches[s.branch] += 1
        areas[s.branch].append(s.area)
        assert s.image.shape == (3, SIZE, SIZE) and s.mask.shape == (SIZE, SIZE)
        assert s.image.min() >= 0 and s.image.max() <= 1
        assert set(s.mask.unique().tolist()) <= {0.0, 1.0}
        assert s.label == int(s.mask.sum() > 0)
    anomalous = 1000 - branches["normal"]
    # p_normal = 0.5: the binomial standard deviation over 1000 draws is 0.016.
    assert abs(branches["normal"] / 1000 - cfg.p_normal) < 0.06
    # Per branch, among ~500 anomalies: sd about 0.02; a broken branch (always rejected: fallback) reads 0.
    for name, weight in cfg.weights.items():
        assert abs(branches[name] / anomalous - weight) < 0.07, (name, branches)
    assert branches["fallback"] <= 0.02 * anomalous
    every = [a for name, values in areas.items() if name != "normal" for a in values]
    assert min(every) >= cfg.min_area and max(every) <= cfg.max_area
    assert all(a == 0 for a in areas["normal"])
    # The size distribution of each branch: CutPaste's areas follow its 2-15% draw, scars are thin,
    # texture masks spread over two orders of magnitude.
    assert 0.02 <= min(areas["cutpaste"]) and max(areas["cutpaste"]) <= 0.16
    assert max(areas["scar"]) < 0.02
    assert min(areas["texture"]) < 0.005 and max(areas["texture"]) > 0.15
    assert np.quantile(areas["texture"], 0.1) < 0.03 < 0.06 < np.quantile(areas["texture"], 0.9)
    assert 0.02 < np.median(areas["poisson"]) < 0.1
    assert 0.005 < np.median(every) < 0.1


def test_size_limits_fall_back_after_the_attempts(goods):
    # Scars cover under 1% of a 64-px image: with min_area 5% every draw is rejected.
    cfg = PseudoAnomalyConfig(branch_weights={"scar": 1.0}, min_area=0.05, max_attempts=3)
    for i in range(5):
        s = PseudoAnomalyGenerator(cfg, seed=0)(goods[0], i, force="anomaly")
        assert s.branch == "fallback" and s.attempts == 4 and s.label == 1
        assert cfg.min_area <= s.area <= cfg.max_area


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_is_bit_identical_and_seeds_differ(goods):
    def draw(seed: int, index: int):
        return PseudoAnomalyGenerator(seed=seed)(goods[index % 8], index, other=goods[(index + 3) % 8], force="anomaly")

    for index in range(6):
        a, b = draw(7, index), draw(7, index)
        assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and a.branch == b.branch
    assert any(not torch.equal(draw(7, i).image, draw(8, i).image) for i in range(3))
    assert all(not torch.equal(draw(7, i).mask, draw(8, i).mask) for i in range(3))
    # Another index or epoch draws another anomaly.
    gen = PseudoAnomalyGenerator(seed=7)
    assert not torch.equal(gen(goods[0], 0, force="anomaly").mask, gen(goods[0], 1, force="anomaly").mask)
    assert not torch.equal(gen(goods[0], 0, force="anomaly").mask, gen(goods[0], 0, epoch=1, force="anomaly").mask)


def test_batch_api_equals_the_per_image_calls(goods):
    gen = PseudoAnomalyGenerator(seed=3)
    images = torch.stack(goods[:4])
    batch = gen.batch(images, start_index=10)
    assert batch.images.shape == (4, 3, SIZE, SIZE) and batch.masks.shape == (4, SIZE, SIZE) and batch.labels.dtype == torch.long
    for i in range(4):
        single = gen(goods[i], 10 + i, other=goods[(i + 1) % 4])
        assert torch.equal(batch.images[i], single.image) and torch.equal(batch.masks[i], single.mask)
        assert batch.branches[i] == single.branch and int(batch.labels[i]) == single.label


def test_dataset_wrapper_handles_normalisation_and_order():
    base = SyntheticDefects("train", 4, SIZE, seed=0)  # ImageNet-normalised items
    data = PseudoAnomalyDataset(base, seed=5, mode="paired")
    assert len(data) == 8
    later, earlier = data[7], data[1]  # any order: an item depends on (seed, epoch, index) only
    assert torch.equal(data[7]["image"], later["image"]) and torch.equal(data[1]["mask"], earlier["mask"])
    clean = data[2]
    assert clean["label"] == 0 and clean["defect"] == "good" and clean["mask"].sum() == 0
    torch.testing.assert_close(clean["image"], base[1]["image"], atol=1e-5, rtol=0)  # round trip through [0, 1]
    item = data[3]
    assert item["label"] == 1 and item["defect"] == f"pseudo_{item['branch']}" and item["mask"].dtype == torch.float32
    unit = denormalize(item["image"])
    outside = item["mask"] == 0
    # Outside the mask the image stays (nearly: Poisson blends change pixels below the threshold).
    assert (unit - denormalize(base[1]["image"])).abs().amax(0)[outside].max() <= PseudoAnomalyConfig().poisson_threshold + 1e-5
    data.set_epoch(1)
    assert not torch.equal(data[3]["mask"], item["mask"])
    raw = PseudoAnomalyDataset([{"image": denormalize(base[0]["image"])}], normalization="none", mode="anomalous")
    assert 0 <= float(raw[0]["image"].min()) and float(raw[0]["image"].max()) <= 1 and raw[0]["label"] == 1
    loader = torch.utils.data.DataLoader(PseudoAnomalyDataset(base, seed=1), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and len(batch["branch"]) == 4


def test_dataset_wrapper_clean_image_is_the_rotated_good_image():
    base = SyntheticDefects("train", 4, SIZE, seed=0)
    config = PseudoAnomalyConfig(category="grid", rotation="right_angles")  # quarter turns (+-5 degrees)
    data = PseudoAnomalyDataset(base, config, seed=2, clean_image=True)
    plain = PseudoAnomalyDataset(base, config, seed=2)
    turned = 0
    for i in range(4):
        item = data[i]
        assert torch.equal(item["image"], plain[i]["image"]) and "clean_image" not in plain[i]  # the same draws
        good = denormalize(base[i]["image"])
        clean = denormalize(item["clean_image"])
        turns, degrees = priors.draw_rotation("right_angles", generator(2, 0, i), square=True)  # the sample's first draw
        torch.testing.assert_close(clean, priors.apply_rotation(good, turns, degrees), atol=1e-5, rtol=0)
        turned += turns != 0 or degrees != 0
        if item["label"] == 0:
            torch.testing.assert_close(item["clean_image"], item["image"], atol=0, rtol=0)
        else:
            assert (denormalize(item["image"]) - clean).abs().amax(0)[item["mask"] > 0].mean() > 0.02  # the anomaly is on the clean image
    assert turned > 0


def test_dataset_wrapper_refuses_anomalous_items_and_bad_settings():
    test = SyntheticDefects("test", 4, SIZE, seed=0)  # item 1 is anomalous
    with pytest.raises(ValueError, match="good images only"):
        PseudoAnomalyDataset(test)[1]
    with pytest.raises(ValueError, match="normalization"):
        PseudoAnomalyDataset(test, normalization="unit")
    with pytest.raises(ValueError, match="mode"):
        PseudoAnomalyDataset(test, mode="pairs")


# ---------------------------------------------------------------------------------------------- parts


def test_perlin_noise_in_range_and_not_constant():
    for res in ((1, 1), (2, 8), (32, 32), (5, 3)):
        noise = perlin.perlin_noise((SIZE, 48), res, generator(0, *res))
        assert noise.shape == (SIZE, 48) and torch.isfinite(noise).all()
        assert noise.min() >= -1.0 and noise.max() <= 1.0
        assert noise.std() > 0.05
    # Zero on the lattice points (2-D gradient noise).
    assert perlin.perlin_noise((SIZE, SIZE), (4, 4), generator(1))[::16, ::16].abs().max() < 1e-6
    fbm = perlin.fbm_noise((SIZE, SIZE), generator(2), octaves=4)
    assert fbm.abs().max() <= 1.0 and fbm.std() > 0.02
    mask = perlin.perlin_mask((SIZE, SIZE), generator(3))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("name", list(colour.COLOUR_OPS))
def test_each_colour_op_changes_the_image_and_keeps_the_range(name):
    g = torch.Generator().manual_seed(0)
    image = 0.2 + 0.5 * torch.rand(3, SIZE, SIZE, generator=g)  # [0.2, 0.7]: autocontrast and solarize have work to do
    out = colour.COLOUR_OPS[name](image, generator(0, name))
    assert out.shape == image.shape and out.dtype == image.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out - image).abs().max() > 1e-3, f"{name} left the image unchanged"


def test_three_distinct_colour_ops_and_hsv_round_trip():
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    _, names = colour.random_colour_ops(image, generator(4), 3)
    assert len(set(names)) == 3 and set(names) <= set(colour.COLOUR_OPS)
    torch.testing.assert_close(colour.hsv_to_rgb(colour.rgb_to_hsv(image)), image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", PROCEDURAL_KINDS + (SKIMAGE_TEXTURES if skimage_available() else ()))
def test_textures_are_images_with_structure(kind):
    tex = texture(kind, (SIZE, 48), generator(0, kind))
    assert tex.shape == (3, SIZE, 48) and tex.min() >= 0 and tex.max() <= 1
    assert tex.std() > 0.01
    assert torch.equal(tex, texture(kind, (SIZE, 48), generator(0, kind)))


def test_poisson_blend_keeps_the_border_and_solves_the_equation(float64_default):
    g = torch.Generator().manual_seed(0)
    target, source = torch.rand(2, 12, 12, generator=g), torch.rand(2, 6, 7, generator=g)
    top, left = 3, 2
    out = poisson.poisson_blend(target, source, top, left, clamp=False)
    interior = torch.zeros(12, 12, dtype=torch.bool)
    interior[top + 1 : top + 5, left + 1 : left + 6] = True
    assert torch.equal(out[:, ~interior], target[:, ~interior])  # the patch border and everything outside
    # Dense solve of the same Dirichlet problem: for each interior pixel p, sum of neighbours - 4 f_p = lap(source)_p.
    n, m = 4, 5
    index = {(i, j): i * m + j for i in range(n) for j in range(m)}
    lap = torch.zeros(n * m, n * m)
    for (i, j), k in index.items():
        lap[k, k] = -4.0
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            if (i + di, j + dj) in index:
                lap[k, index[i + di, j + dj]] = 1.0
    for c in range(2):
        s = source[c]
        rhs = (s[2:, 1:-1] + s[:-2, 1:-1] + s[1:-1, 2:] + s[1:-1, :-2] - 4 * s[1:-1, 1:-1]).clone()
        region = target[c, top : top + 6, left : left + 7]
        for (i, j), _ in index.items():  # known border values move to the right-hand side
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                if (i + di, j + dj) not in index:
                    rhs[i, j] -= region[i + 1 + di, j + 1 + dj]
        dense = torch.linalg.solve(lap, rhs.reshape(-1)).reshape(n, m)
        torch.testing.assert_close(out[c, top + 1 : top + 5, left + 1 : left + 6], dense, atol=1e-10, rtol=0)
    # Blending an image's own patch gives the image back; mixed gradients keep the border too.
    same = poisson.poisson_blend(target, target[:, top : top + 6, left : left + 7], top, left, clamp=False)
    torch.testing.assert_close(same, target, atol=1e-10, rtol=0)
    mixed = poisson.poisson_blend(target, source, top, left, gradient="mixed")
    assert torch.equal(mixed[:, ~interior], target[:, ~interior])
    with pytest.raises(ValueError, match="does not fit"):
        poisson.poisson_blend(target, source, 8, 8)


def test_foreground_restriction_keeps_masks_on_the_object():
    image, disk = _disk_image()
    foreground = priors.estimate_foreground(image)
    assert (foreground == disk).float().mean() > 0.98
    cfg = PseudoAnomalyConfig(category="bottle", rotation="none")
    assert cfg.uses_foreground()
    gen = PseudoAnomalyGenerator(cfg, seed=0)
    for i in range(40):
        s = gen(image, i, force="anomaly")
        assert s.area >= cfg.min_area
        assert (s.mask * (1 - foreground)).sum() == 0, f"sample {i} ({s.branch}) has mask pixels off the foreground"
        assert torch.equal(s.image[:, foreground == 0], image[:, foreground == 0])
    free = PseudoAnomalyGenerator(cfg.replace(foreground="off"), seed=0)
    assert any((free(image, i, force="anomaly").mask * (1 - foreground)).sum() > 0 for i in range(40))


def test_rotation_rules_per_category():
    assert {c: priors.rotation_rule(c) for c in ("capsule", "metal_nut", "pill", "toothbrush", "transistor")} == dict.fromkeys(
        ("capsule", "metal_nut", "pill", "toothbrush", "transistor"), "none")
    assert all(priors.rotation_rule(c) == "small" for c in ("wood", "zipper", "cable"))
    assert all(priors.rotation_rule(c) == "right_angles" for c in ("bottle", "grid", "hazelnut", "leather", "tile", "carpet", "screw"))
    assert priors.rotation_rule("my_product") == "none" and priors.rotation_rule(None) == "none"
    for i in range(50):
        turns, degrees = priors.draw_rotation("small", generator(i))
        assert turns == 0 and abs(degrees) <= 5
        turns, degrees = priors.draw_rotation("right_angles", generator(i))
        assert turns in (0, 1, 2, 3) and abs(degrees) <= 5
        assert priors.draw_rotation("right_angles", generator(i), square=False)[0] in (0, 2)
    assert {priors.draw_rotation("right_angles", generator(i))[0] for i in range(50)} == {0, 1, 2, 3}
    assert PseudoAnomalyConfig(category="wood").rotation_rule() == "small"
    assert PseudoAnomalyConfig(category="wood", rotation="none").rotation_rule() == "none"
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    only_normal = dict(p_normal=1.0)
    capsule = PseudoAnomalyGenerator(PseudoAnomalyConfig(category="capsule", **only_normal))
    assert all(torch.equal(capsule(image, i).image, image) for i in range(5))
    bottle = PseudoAnomalyGenerator(PseudoAnomalyConfig(category="bottle", **only_normal))
    assert sum(not torch.equal(bottle(image, i).image, image) for i in range(5)) == 5


def test_config_errors_name_the_field():
    bad = [
        (dict(p_normal=1.5), "p_normal"),
        (dict(branch_weights={"texure": 1.0}), "unknown branch 'texure'"),
        (dict(branch_weights={"texture": 0.0}), "branch_weights"),
        (dict(branch_weights={"scar": -1.0}), "branch_weights"),
        (dict(min_area=0.4), "min_area"),
        (dict(max_attempts=0), "max_attempts"),
        (dict(foreground="maybe"), "foreground"),
        (dict(rotation="sideways"), "rotation"),
        (dict(texture_sources=("dtd",)), "texture_sources"),
        (dict(cutpaste_area=(0.2, 0.1)), "cutpaste_area"),
        (dict(perlin_scales=(0, 2.5)), "perlin_scales"),
        (dict(poisson_gradient="best"), "poisson_gradient"),
        (dict(beta_max=float("nan")), "beta_max"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            PseudoAnomalyConfig(**kwargs)
    assert PseudoAnomalyConfig(p_normal=1.0, branch_weights={"texture": 0.0}).p_normal == 1.0  # no anomalies needs no weight
    cfg = PseudoAnomalyConfig(branch_weights={"texture": 3.0, "scar": 1.0})
    assert cfg.weights == {"texture": 0.75, "cutpaste": 0.0, "scar": 0.25, "poisson": 0.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.p_normal = 0.1  # type: ignore[misc]
    assert json.loads(json.dumps(cfg.to_dict()))["branch_weights"]["texture"] == 3.0
    with pytest.raises(ValueError, match="denormalise"):
        PseudoAnomalyGenerator()(normalize(torch.rand(3, 8, 8)), 0)
    with pytest.raises(ValueError, match="force"):
        PseudoAnomalyGenerator()(torch.rand(3, 8, 8), 0, force="yes")
    with pytest.raises(TypeError, match="PseudoAnomalyConfig"):
        PseudoAnomalyGenerator({"p_normal": 0.5})  # type: ignore[arg-type]


def test_holdout_split_is_fixed_and_partitions(tmp_path):
    files = [tmp_path / f"{i:03d}.png" for i in range(10)]
    kept, held = holdout_split(files, 0.3)
    assert len(held) == 3 and sorted(kept + held) == sorted(files)
    assert holdout_split(list(reversed(files)), 0.3) == (kept, held)
    assert len(holdout_split(files[:2], 0.01)[1]) == 1 and len(holdout_split(files[:2], 0.99)[0]) == 1
    with pytest.raises(ValueError, match="holdout"):
        holdout_split(files, 1.0)


@pytest.mark.gpu
def test_generator_runs_on_cuda_and_matches_the_draws(goods):
    gen = PseudoAnomalyGenerator(seed=0)
    for i in range(8):
        cpu = gen(goods[i % 8], i, other=goods[(i + 1) % 8])
        cuda = gen(goods[i % 8].cuda(), i, other=goods[(i + 1) % 8].cuda())
        assert cuda.image.device.type == "cuda" and cuda.branch == cpu.branch
        assert (cuda.mask.cpu() != cpu.mask).float().mean() < 0.01
        again = gen(goods[i % 8].cuda(), i, other=goods[(i + 1) % 8].cuda())
        assert torch.equal(again.image, cuda.image)


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudo_data")
    write_synthetic_dataset(root, "syn", num_train=8, num_test=4, input_size=SIZE, seed=0)
    return root


def test_gallery_command_end_to_end(dataset, tmp_path):
    out = tmp_path / "gallery"
    args = ["pseudo-anomalies", "--data", str(dataset), "--category", "syn", "--out", str(out), "--count", "6", "--seed", "3", "--input-size", str(SIZE)]
    assert cli.main(args) == 0
    with open(out / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and set(rows[0]) == {"image", "mask", "overlay", "source", "branch", "label", "mask_area", "attempts"}
    for row in rows:
        image = np.asarray(Image.open(out / row["image"]))
        mask = np.asarray(Image.open(out / row["mask"]))
        assert image.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
        assert set(np.unique(mask)) <= {0, 255} and row["branch"] in BRANCHES + ("fallback",) and row["label"] == "1"
        assert math.isclose(float(row["mask_area"]), (mask > 0).mean(), abs_tol=1e-6)
        assert Image.open(out / row["overlay"]).size == (3 * SIZE + 8, SIZE)  # image | overlay | mask
        assert "syn/train/good" in row["source"]
    assert Image.open(out / "contact_sheet.png").size[0] > 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["seed"] == 3 and settings["config"]["category"] == "syn"
    first = (out / rows[0]["image"]).read_bytes()
    assert cli.main(args) == 0  # same seed, same gallery; the old samples/ is replaced whole
    assert (out / rows[0]["image"]).read_bytes() == first
    assert not (out / ".msflow-fast.lock").exists()
    only = tmp_path / "scars"
    assert cli.main(args[:6] + [str(only), "--count", "3", "--branch", "scar", "--input-size", str(SIZE)]) == 0
    with open(only / "index.csv", newline="") as f:
        assert {r["branch"] for r in csv.DictReader(f)} <= {"scar", "fallback"}


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("pseudo_run")
    rc = cli.main([
        "train", "--model", "fastflow", "--data", str(dataset), "--category", "syn", "--out", str(run), "--epochs", "1",
        "--batch-size", "4", "--no-progress", "--input-size", str(SIZE), "--backbone", "resnet18", "--no-pretrained", "--flow-steps", "1",
    ])
    assert rc == 0
    return run


def test_eval_pseudo_anomalies_on_a_trained_checkpoint(dataset, checkpoint, capsys):
    real = (checkpoint / "metrics.json").read_text()
    base = ["eval", "--data", str(dataset), "--category", "syn", "--checkpoint", str(checkpoint / "last.pt"), "--no-progress"]
    assert cli.main(base + ["--pseudo-anomalies"]) == 0
    assert "pseudo-anomaly estimate" in capsys.readouterr().out
    metrics = json.loads((checkpoint / "pseudo_eval" / "metrics.json").read_text())
    assert metrics["estimate"] == "pseudo_anomalies" and "not a test-set result" in metrics["note"]
    assert not any("trained on pseudo anomalies" in w for w in metrics["warnings"])  # a model trained on good images only
    details = metrics["pseudo_anomalies"]
    assert details["test_good"] == 2 and details["train_holdout"] == 0 and details["holdout"] is None
    assert metrics["num_images"] == 4 and metrics["num_anomalous"] == 2  # each good test image unchanged and once anomalous
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    assert sum(details["branch_counts"].values()) == 2 and set(details["branch_image_auroc"]) == set(details["branch_counts"])
    assert (checkpoint / "metrics.json").read_text() == real  # the training run's test metrics are untouched
    out = checkpoint / "holdout_eval"
    assert cli.main(base + ["--pseudo-anomalies", "--holdout", "0.25", "--out", str(out), "--pseudo-seed", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pseudo_anomalies"]["train_holdout"] == 2 and metrics["num_images"] == 8
    assert len(metrics["pseudo_anomalies"]["holdout"]["files"]) == 2
    assert any("held-back training images" in w for w in metrics["warnings"])
    capsys.readouterr()
    assert cli.main(base + ["--holdout", "0.25"]) == 2
    assert "add --pseudo-anomalies" in capsys.readouterr().err


def test_eval_pseudo_anomalies_needs_unseen_good_images(dataset, checkpoint, tmp_path, capsys):
    only_train = tmp_path / "data" / "syn"
    (only_train / "train").mkdir(parents=True)
    (only_train / "train" / "good").symlink_to(dataset / "syn" / "train" / "good")
    rc = cli.main(["eval", "--data", str(tmp_path / "data"), "--category", "syn", "--checkpoint", str(checkpoint), "--pseudo-anomalies",
                   "--out", str(tmp_path / "ev"), "--no-progress"])
    assert rc == 2
    assert "no good test images" in capsys.readouterr().err


def _counting_fit(monkeypatch) -> list[int]:
    """Wrap engine.fit so a test sees how many images each training run got."""
    import msflow_fast.engine as engine

    seen: list[int] = []
    fit = engine.fit

    def counting(model, train_set, *args, **kwargs):
        seen.append(len(train_set))
        return fit(model, train_set, *args, **kwargs)

    monkeypatch.setattr(engine, "fit", counting)
    return seen


def test_train_holdout_records_the_held_back_files_and_eval_uses_them(dataset, tmp_path, capsys, monkeypatch):
    import os

    from msflow_fast.engine.data import list_images

    seen = _counting_fit(monkeypatch)
    run = tmp_path / "run"
    train = ["train", "--model", "fastflow", "--data", str(dataset), "--category", "syn", "--out", str(run), "--epochs", "1",
             "--batch-size", "4", "--no-progress", "--input-size", str(SIZE), "--backbone", "resnet18", "--no-pretrained",
             "--flow-steps", "1", "--no-eval"]
    assert cli.main(train + ["--holdout", "0.25"]) == 0
    assert "holding back 2 of 8 training images" in capsys.readouterr().out
    assert seen == [6]
    record = json.loads((run / "holdout.json").read_text())
    expected = holdout_split(list_images(dataset / "syn" / "train" / "good"), 0.25)[1]
    # names relative to train/good: a differently spelled --data matches them
    assert record["fraction"] == 0.25 and record["kept"] == 6 and record["files"] == [p.name for p in expected]
    # eval reads the record: the held-back files are in, known unseen (no warning), without --holdout
    base = ["eval", "--data", str(dataset), "--category", "syn", "--checkpoint", str(run / "last.pt"), "--no-progress", "--pseudo-anomalies"]
    assert cli.main(base) == 0
    metrics = json.loads((run / "pseudo_eval" / "metrics.json").read_text())
    details = metrics["pseudo_anomalies"]
    assert details["train_holdout"] == 2 and details["holdout"]["recorded"] is True
    assert details["holdout"]["files"] == [str(p) for p in expected]
    assert metrics["num_images"] == 8 and not any("held-back" in w for w in metrics["warnings"])
    capsys.readouterr()
    assert cli.main(base + ["--holdout", "0.5", "--out", str(tmp_path / "ev")]) == 2
    assert "differs from the 0.25 the model was trained with" in capsys.readouterr().err
    # a resumed run keeps the recorded selection and refuses another fraction
    assert cli.main(train[:-1] + ["--epochs", "2", "--resume", "--holdout", "0.5"]) == 2
    assert "differs from the 0.25 of the run being resumed" in capsys.readouterr().err
    assert cli.main(train[:10] + ["2"] + train[11:] + ["--resume"]) == 0
    assert seen == [6, 6]  # the resumed run trained on the kept images only
    assert json.loads((run / "holdout.json").read_text()) == record
    # --data spelled relative to another working directory: the same files are held back (resume and eval)
    monkeypatch.chdir(dataset.parent)
    relative = os.path.relpath(dataset, dataset.parent)
    respelled = [relative if a == str(dataset) else a for a in train]
    assert cli.main(respelled[:10] + ["3"] + respelled[11:] + ["--resume"]) == 0
    assert seen == [6, 6, 6] and json.loads((run / "holdout.json").read_text()) == record
    rel_eval = [relative if a == str(dataset) else a for a in base]
    assert cli.main(rel_eval + ["--out", str(tmp_path / "ev_rel")]) == 0
    assert json.loads((tmp_path / "ev_rel" / "metrics.json").read_text())["pseudo_anomalies"]["train_holdout"] == 2
    # resuming from another folder: the record next to the checkpoint is used, and copied to --out
    other = tmp_path / "other"
    moved = [str(other) if a == str(run) else a for a in train]
    assert cli.main(moved[:10] + ["4"] + moved[11:] + ["--checkpoint", str(run / "last.pt")]) == 0
    assert seen[-1] == 6 and json.loads((other / "holdout.json").read_text()) == record
    # a new run without --holdout over it removes the stale record
    assert cli.main(train + ["--overwrite"]) == 0
    assert seen[-1] == 8 and not (run / "holdout.json").exists()
    # --out holding another run's record: resuming a run without one into it is refused
    capsys.readouterr()
    assert cli.main(moved[:10] + ["2"] + moved[11:] + ["--checkpoint", str(run / "last.pt")]) == 2
    assert "records a different holdout than the run being resumed" in capsys.readouterr().err
    assert json.loads((other / "holdout.json").read_text()) == record


def test_resuming_without_a_record_refuses_holdout(dataset, checkpoint, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoint / "last.pt", run / "last.pt")  # a run trained without --holdout
    rc = cli.main(["train", "--model", "fastflow", "--data", str(dataset), "--category", "syn", "--out", str(run), "--epochs", "2",
                   "--no-progress", "--no-eval", "--resume", "--holdout", "0.25"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "trained on every train/good image; --holdout applies to a new run" in err and "resume without --holdout" in err
    assert not (run / "holdout.json").exists()


def _holdout_args(tmp_path, **kwargs):
    import argparse

    return argparse.Namespace(**{"holdout": None, "checkpoint": None, **kwargs})


def _fake_train_set(folder, count=8):
    from types import SimpleNamespace

    return SimpleNamespace(samples=[(folder / f"{i:03d}.png", None, 0, "good") for i in range(count)])


def test_resume_checks_the_recorded_files_against_train_good(tmp_path):
    from msflow_fast.cli.pseudo import apply_train_holdout
    from msflow_fast.engine.pseudo_eval import write_holdout

    good = tmp_path / "data" / "train" / "good"
    run = tmp_path / "run"
    run.mkdir()
    write_holdout(run, 0.25, [good / "001.png", good / "005.png"], 6)
    train_set = _fake_train_set(good)
    apply_train_holdout(_holdout_args(tmp_path), train_set, run, resuming=True)
    assert [s[0].name for s in train_set.samples] == ["000.png", "002.png", "003.png", "004.png", "006.png", "007.png"]
    # a recorded file that train/good lacks (another dataset or category, or removed)
    write_holdout(run, 0.25, [good / "001.png", good / "missing.png"], 6)
    with pytest.raises(ValueError, match=r"1 of the 2 held-back images listed in .*holdout.json are not in .*missing.png"):
        apply_train_holdout(_holdout_args(tmp_path), _fake_train_set(good), run, resuming=True)
    # images added since: the kept count differs from the record's
    write_holdout(run, 0.25, [good / "001.png", good / "005.png"], 6)
    with pytest.raises(ValueError, match="holds 7 training images besides the held-back ones, but the run being resumed trained on 6"):
        apply_train_holdout(_holdout_args(tmp_path), _fake_train_set(good, 9), run, resuming=True)
    # --checkpoint in another folder: its record is read; --out holding a different one is refused
    other = tmp_path / "other"
    other.mkdir()
    write_holdout(other, 0.5, [good / f"00{i}.png" for i in range(4)], 4)
    args = _holdout_args(tmp_path, checkpoint=str(run / "last.pt"))
    with pytest.raises(ValueError, match="records a different holdout than the run being resumed"):
        apply_train_holdout(args, _fake_train_set(good), other, resuming=True)
    fresh = tmp_path / "fresh"
    apply_train_holdout(args, train_set := _fake_train_set(good), fresh, resuming=True)
    assert len(train_set.samples) == 6 and json.loads((fresh / "holdout.json").read_text())["files"] == ["001.png", "005.png"]


def test_only_rank_0_writes_or_deletes_the_record(tmp_path, monkeypatch):
    from msflow_fast.cli import pseudo

    good = tmp_path / "train" / "good"
    run = tmp_path / "run"
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert pseudo._is_rank0() is False
    train_set = _fake_train_set(good)
    pseudo.apply_train_holdout(_holdout_args(tmp_path, holdout=0.25), train_set, run, resuming=False)
    assert len(train_set.samples) == 6 and not (run / "holdout.json").exists()  # rank 1 trains on the kept ones, writes nothing
    run.mkdir()
    (run / "holdout.json").write_text("{}")
    pseudo.apply_train_holdout(_holdout_args(tmp_path), _fake_train_set(good), run, resuming=False)
    assert (run / "holdout.json").exists()  # rank 1 leaves the stale record to rank 0
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    assert pseudo._is_rank0() is True
    pseudo.apply_train_holdout(_holdout_args(tmp_path), _fake_train_set(good), run, resuming=False)
    assert not (run / "holdout.json").exists()
    pseudo.apply_train_holdout(_holdout_args(tmp_path), _fake_train_set(good), run, resuming=False)  # nothing to delete: fine


@pytest.mark.parametrize(("record", "field"), [
    ({"fraction": 0.25, "kept": 6, "files": "001.png"}, "files"),
    ({"fraction": 0.25, "kept": 6, "files": [1, 2]}, "files"),
    ({"fraction": 0.25, "kept": 6}, "files"),
    ({"fraction": True, "kept": 6, "files": ["001.png"]}, "fraction"),
    ({"fraction": 1.5, "kept": 6, "files": ["001.png"]}, "fraction"),
    ({"fraction": "0.25", "kept": 6, "files": ["001.png"]}, "fraction"),
    ({"fraction": 0.25, "kept": True, "files": ["001.png"]}, "kept"),
])
def test_a_corrupt_record_names_the_file_and_field(tmp_path, record, field):
    from msflow_fast.engine.pseudo_eval import read_holdout

    (tmp_path / "holdout.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=rf"holdout.json: field '{field}' must be .*remove it"):
        read_holdout(tmp_path)
    (tmp_path / "holdout.json").write_text('{"fraction": NaN, "kept": 6, "files": ["a.png"]}')
    with pytest.raises(ValueError, match="field 'fraction'"):
        read_holdout(tmp_path)
    (tmp_path / "holdout.json").write_text("[1")
    with pytest.raises(ValueError, match="holdout.json is not a holdout record"):
        read_holdout(tmp_path)


def test_a_first_version_record_with_paths_reads_as_names(tmp_path):
    from msflow_fast.engine.pseudo_eval import read_holdout

    record = {"fraction": 0.25, "seed": 0, "kept": 6, "files": ["/data/syn/train/good/001.png", "data/syn/train/good/005.png"]}
    (tmp_path / "holdout.json").write_text(json.dumps(record))
    assert read_holdout(tmp_path)["files"] == ["001.png", "005.png"]
