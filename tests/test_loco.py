"""MVTec LOCO AD: sPRO against an independent threshold loop (saturation, FPR-limit interpolation,
edge cases), the LOCO folder reader on a generated LOCO-shaped folder (layout detection, masks,
saturation areas, errors), evaluate's sPRO entries and the CLI train / eval end to end."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from msflow_fast import cli
from msflow_fast.engine import MVTecDataset, MVTecLocoDataset, aupro, evaluate, saturation_area, spro, spro_by_kind, write_synthetic_dataset
from msflow_fast.engine.data import detect_layout, read_defects_config

# ---------------------------------------------------------------------------------------------
# sPRO
# ---------------------------------------------------------------------------------------------


def slow_spro(maps, regions, saturation, normal, limit):
    """One threshold at a time over every distinct score, straight from the definition."""
    maps = np.asarray(maps, dtype=np.float64)
    flat = [(i, np.asarray(regions[i][k]) != 0, float(saturation[i][k])) for i in range(len(regions)) for k in range(len(regions[i]))]
    bg = maps[np.asarray(normal, dtype=bool)].ravel()
    fprs, values = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(float(np.mean(bg >= t)))
        values.append(float(np.mean([min(np.sum(maps[i][r] >= t) / s, 1.0) for i, r, s in flat])))
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs, fprs[1:], values, values[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1, x1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0), limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def random_case(rng, n=8, h=9, w=11, levels=None):
    """Half the images normal; the others 1-3 rectangles of any size (overlaps allowed), each with an
    absolute (reached before full cover, or clipped to the area), relative or no saturation."""
    maps = rng.random((n, h, w))
    normal = np.arange(n) < n // 2
    regions, saturation, kinds = [], [], []
    for i in range(n):
        if normal[i]:
            regions.append(np.zeros((0, h, w), bool))
            saturation.append(np.zeros(0))
            kinds.append("good")
            continue
        rs, ss = [], []
        for _ in range(int(rng.integers(1, 4))):
            y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            r = np.zeros((h, w), bool)
            r[y0 : y0 + int(rng.integers(1, h - y0 + 1)), x0 : x0 + int(rng.integers(1, w - x0 + 1))] = True
            area = int(r.sum())
            mode = int(rng.integers(0, 3))
            if mode == 0:
                s = saturation_area(area, float(rng.uniform(0.05, 1.0)), relative=True)
            elif mode == 1:
                s = saturation_area(area, float(rng.integers(1, 2 * area + 1)), relative=False)
            else:
                s = float(area)
            maps[i][r] += rng.uniform(0.0, 0.6)
            rs.append(r)
            ss.append(s)
        regions.append(np.stack(rs))
        saturation.append(np.array(ss))
        kinds.append("logical" if i % 2 else "structural")
    if levels:
        maps = np.floor(maps * levels) / levels  # ties inside regions and between regions and background
    return maps, regions, saturation, normal, kinds


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 6])
def test_spro_matches_the_threshold_loop(seed, levels):
    maps, regions, saturation, normal, _ = random_case(np.random.default_rng(seed), levels=levels)
    for limit in (0.05, 0.3, 1.0):
        expected = slow_spro(maps, regions, saturation, normal, limit)
        assert spro(maps, regions, saturation, fpr_limit=limit) == pytest.approx(expected, abs=1e-12), limit
    # float32 torch maps, explicit normal images, default limit 0.05
    m32 = torch.from_numpy(maps.astype(np.float32))
    got = spro(m32, [torch.from_numpy(r) for r in regions], saturation, normal=torch.from_numpy(normal))
    assert got == pytest.approx(slow_spro(m32.numpy(), regions, saturation, normal, 0.05), abs=1e-9)


def test_spro_by_kind_matches_the_loop_per_kind():
    maps, regions, saturation, normal, kinds = random_case(np.random.default_rng(7), n=10, levels=8)
    out = spro_by_kind(maps, regions, saturation, kinds, fpr_limits=(0.05, 0.3))
    assert set(out) == {"0.05", "0.3"} and set(out["0.05"]) == {"all", "logical", "structural"}
    for limit in (0.05, 0.3):
        assert out[f"{limit:g}"]["all"] == pytest.approx(slow_spro(maps, regions, saturation, normal, limit), abs=1e-12)
        for kind in ("logical", "structural"):
            keep = [normal[i] or kinds[i] == kind for i in range(len(kinds))]
            sub = [regions[i] if kinds[i] == kind else regions[i][:0] for i in range(len(kinds))]
            subs = [saturation[i] if kinds[i] == kind else saturation[i][:0] for i in range(len(kinds))]
            # the FPR stays on every normal image; the other kind's images drop out entirely
            expected = slow_spro(maps[keep], [sub[i] for i in range(len(kinds)) if keep[i]],
                                 [subs[i] for i in range(len(kinds)) if keep[i]], normal[keep], limit)
            assert out[f"{limit:g}"][kind] == pytest.approx(expected, abs=1e-12), (limit, kind)
    assert spro_by_kind(maps, regions, saturation, kinds, groups=["logical", "missing"])["0.05"]["missing"] is None


def test_fpr_limit_interpolation_by_hand():
    """One normal image (10 distinct scores: FPR steps of 0.1), one region of 4 pixels whose score
    0.85 ties a background pixel, so the segment crossing FPR 0.15 rises: (0.1, a) -> (0.2, b)."""
    bg = np.array([0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.25, 0.15, 0.05])
    defect = np.array([0.97, 0.90, 0.85, 0.01, 0, 0, 0, 0, 0, 0])
    maps = np.stack([bg, defect])[:, None, :]
    region = np.zeros((1, 1, 10), bool)
    region[0, 0, :4] = True
    regions = [np.zeros((0, 1, 10), bool), region]
    # no saturation (s = 4): points (0, .25) (.1, .25) (.1, .5) (.2, .75); at .15: .625
    for s, expected in ((4.0, (0.1 * 0.25 + 0.05 * (0.5 + 0.625) / 2) / 0.15),
                        (2.0, (0.1 * 0.5 + 0.05 * 1.0) / 0.15),  # saturated after 2 pixels: .5 .5 1 1
                        (3.0, (0.1 / 3 + 0.05 * (2 / 3 + 5 / 6) / 2) / 0.15)):  # relative 0.75: 1/3 1/3 2/3 1
        got = spro(maps, regions, [np.zeros(0), np.array([s])], fpr_limit=0.15)
        assert got == pytest.approx(expected, abs=1e-12), s
        assert got == pytest.approx(slow_spro(maps, regions, [np.zeros(0), [s]], [True, False], 0.15), abs=1e-12)
    assert saturation_area(4, 0.75, relative=True) == 3.0


def test_perfect_and_inverted_maps():
    _, regions, saturation, normal, _ = random_case(np.random.default_rng(3))
    perfect = np.stack([r.any(0) if r.shape[0] else np.zeros(r.shape[1:], bool) for r in regions]).astype(np.float64)
    for limit in (0.05, 0.3):
        assert spro(perfect, regions, saturation, fpr_limit=limit) == pytest.approx(1.0, abs=1e-12)
        assert spro(1.0 - perfect, regions, saturation, fpr_limit=limit) == 0.0


def test_unsaturated_spro_of_whole_image_regions_is_aupro():
    """Each anomalous image one full-image region, no saturation: sPRO counts the same regions and the
    same background (the normal images) as the package's AUPRO."""
    rng = np.random.default_rng(11)
    maps = rng.random((6, 7, 8))
    masks = np.zeros(maps.shape, bool)
    masks[3:] = True
    maps[3:] += 0.3
    regions = [m[None] if m.any() else m[None][:0] for m in masks]
    for limit in (0.05, 0.3):
        assert spro(maps, regions, fpr_limit=limit) == pytest.approx(aupro(maps, masks, fpr_limit=limit), abs=1e-12)


def test_spro_edge_cases_raise_clearly():
    maps = np.random.default_rng(0).random((2, 4, 4))
    empty = [np.zeros((0, 4, 4), bool)] * 2
    with pytest.raises(ValueError, match="no defect region"):
        spro(maps, empty)
    region = np.ones((1, 4, 4), bool)
    with pytest.raises(ValueError, match="no anomaly-free image"):
        spro(maps, [region, region])
    with pytest.raises(ValueError, match="region 0 of image 1 has no pixel"):
        spro(maps, [empty[0], np.zeros((1, 4, 4), bool)])
    with pytest.raises(ValueError, match=r"saturation\[1\]\[0\] must be a positive number"):
        spro(maps, [empty[0], region], [np.zeros(0), np.array([0.0])])
    with pytest.raises(ValueError, match="marked normal but hold defect regions"):
        spro(maps, [empty[0], region], normal=[True, True])
    with pytest.raises(ValueError, match=r"expected \[K, 4, 4\]"):
        spro(maps, [empty[0], np.ones((1, 3, 4), bool)])
    with pytest.raises(ValueError, match="NaN"):
        spro(np.full((2, 4, 4), np.nan), [empty[0], region])
    with pytest.raises(ValueError, match=r"fpr_limit: expected a value in \(0, 1\]"):
        spro(maps, [empty[0], region], fpr_limit=0.0)
    with pytest.raises(ValueError, match="relative threshold"):
        saturation_area(10, 1.5, relative=True)
    assert saturation_area(10, 25, relative=False) == 10.0 and saturation_area(10, 4, relative=False) == 4.0


@pytest.mark.gpu
def test_spro_on_cuda_matches_cpu():
    maps, regions, saturation, _, kinds = random_case(np.random.default_rng(5), levels=5)
    cpu = spro_by_kind(torch.from_numpy(maps), regions, saturation, kinds)
    gpu = spro_by_kind(torch.from_numpy(maps).cuda(), [torch.from_numpy(r).cuda() for r in regions], saturation, kinds)
    for limit in cpu:
        for kind in cpu[limit]:
            assert gpu[limit][kind] == pytest.approx(cpu[limit][kind], abs=1e-12)


# ---------------------------------------------------------------------------------------------
# the LOCO folder reader
# ---------------------------------------------------------------------------------------------

W, H = 48, 32  # file size (width x height), non-square like LOCO's 1600x1100
CATEGORY = "toy_box"
CONFIG = [
    {"defect_name": "missing_part", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "extra_part", "pixel_value": 254, "saturation_threshold": 0.5, "relative_saturation": True},
    {"defect_name": "scratch", "pixel_value": 253, "saturation_threshold": 20, "relative_saturation": False},
    {"defect_name": "dent", "pixel_value": 252, "saturation_threshold": 10000, "relative_saturation": False},
]
# (kind folder, image stem) -> masks as (pixel value, x0, y0, x1, y1) in file pixels
DEFECTS = {
    ("logical_anomalies", "000"): [(255, 6, 4, 18, 12), (254, 24, 16, 42, 28)],
    ("logical_anomalies", "001"): [(255, 3, 18, 15, 30)],
    ("structural_anomalies", "000"): [(253, 30, 2, 45, 10)],
    ("structural_anomalies", "001"): [(253, 9, 8, 21, 16), (252, 12, 10, 30, 26), (253, 36, 20, 45, 30)],
}
NUM = {"train": 6, "validation": 2, "good": 4}


def _image(rng, boxes=()):
    yy, xx = np.mgrid[0:H, 0:W]
    img = 0.5 + 0.2 * np.sin(xx / 5.0)[..., None] + 0.05 * rng.standard_normal((H, W, 3))
    for value, x0, y0, x1, y1 in boxes:
        img[y0:y1, x0:x1] = (value - 250) / 6.0
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def _mask(value, x0, y0, x1, y1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = value
    return Image.fromarray(m)


def write_loco(root):
    """A LOCO-shaped category: train/validation/test good images, two defect kinds, several masks per image."""
    rng = np.random.default_rng(0)
    base = root / CATEGORY
    for split, folder, count in (("train", "good", NUM["train"]), ("validation", "good", NUM["validation"]), ("test", "good", NUM["good"])):
        (base / split / folder).mkdir(parents=True)
        for i in range(count):
            _image(rng).save(base / split / folder / f"{i:03d}.png")
    for (kind, stem), boxes in DEFECTS.items():
        (base / "test" / kind).mkdir(parents=True, exist_ok=True)
        _image(rng, boxes).save(base / "test" / kind / f"{stem}.png")
        folder = base / "ground_truth" / kind / stem
        folder.mkdir(parents=True)
        for j, box in enumerate(boxes):
            _mask(*box).save(folder / f"{j:03d}.png")
    (base / "defects_config.json").write_text(json.dumps(CONFIG))
    return root


@pytest.fixture(scope="module")
def loco(tmp_path_factory):
    return write_loco(tmp_path_factory.mktemp("loco") / "mvtec_loco")


@pytest.fixture
def loco_copy(loco, tmp_path):
    return shutil.copytree(loco, tmp_path / "mvtec_loco")


def test_layout_is_detected_and_gives_the_loco_reader(loco, tmp_path):
    base = loco / CATEGORY
    assert detect_layout(base) == "loco"
    for layout in ("auto", "loco"):
        test = MVTecDataset(loco, CATEGORY, "test", input_size=16, layout=layout)
        assert type(test) is MVTecLocoDataset and test.layout == "loco" and test.has_defect_regions
    assert "MVTecLocoDataset(" in repr(test) and "layout='loco'" in repr(test)
    with pytest.raises(FileNotFoundError, match=r"logical_anomalies/000 is a folder of masks, as in MVTec LOCO AD: read it with layout='loco'"):
        MVTecDataset(loco, CATEGORY, "test", input_size=16, layout="mvtec")
    # each marker alone tells the layout
    only_config = tmp_path / "only_config"
    (only_config / "train" / "good").mkdir(parents=True)
    shutil.copy(base / "defects_config.json", only_config)
    assert detect_layout(only_config) == "loco"
    only_folder = tmp_path / "only_folder"
    (only_folder / "test" / "structural_anomalies").mkdir(parents=True)
    assert detect_layout(only_folder) == "loco"
    # MVTec AD folders are untouched
    mvtec = write_synthetic_dataset(tmp_path / "mvtec", "syn", num_train=2, num_test=2, input_size=16)
    assert detect_layout(mvtec) == "mvtec" and type(MVTecDataset(mvtec, None, "test", input_size=16)) is MVTecDataset
    with pytest.raises(ValueError, match="split: expected 'train' or 'test'"):
        MVTecDataset(mvtec, None, "validation", input_size=16)


def test_splits_labels_and_kinds(loco):
    train = MVTecDataset(loco, CATEGORY, "train", input_size=16)
    validation = MVTecDataset(loco, CATEGORY, "validation", input_size=16)
    test = MVTecDataset(loco, CATEGORY, "test", input_size=16)
    assert len(train) == NUM["train"] and len(validation) == NUM["validation"] and len(test) == NUM["good"] + len(DEFECTS)
    assert train.labels == [0] * NUM["train"] and not train.has_defect_regions
    item = validation[0]
    assert set(item) == {"image", "mask", "label", "path", "defect"} and item["image"].shape == (3, 16, 16) and not item["mask"].any()
    assert test.max_regions == 3 and sum(test.labels) == len(DEFECTS)
    kinds = [test[i]["defect_kind"] for i in range(len(test))]
    assert kinds.count("good") == NUM["good"] and kinds.count("logical") == 2 and kinds.count("structural") == 2
    assert {test.samples[i][3] for i in range(len(test)) if kinds[i] == "logical"} == {"logical_anomalies"}
    assert sorted(test.defects) == [252, 253, 254, 255] and test.defects[254].name == "extra_part"
    test.check_files()
    validation.check_files()


def test_masks_values_and_saturation_at_the_file_size(loco):
    """At the files' own size: each region is its mask file, the union is the mask, and the saturation
    is min(threshold, area) absolute or threshold x area relative."""
    test = MVTecLocoDataset(loco, CATEGORY, "test", input_size=(H, W))
    by_name = {(s[3], s[0].stem): i for i, s in enumerate(test.samples)}
    rules = {c["pixel_value"]: c for c in CONFIG}
    for key, boxes in DEFECTS.items():
        item = test[by_name[key]]
        assert item["defect_masks"].shape == (3, H, W) and item["defect_masks"].dtype == torch.bool
        union = torch.zeros(H, W, dtype=torch.bool)
        for j, (value, x0, y0, x1, y1) in enumerate(boxes):
            expected = torch.zeros(H, W, dtype=torch.bool)
            expected[y0:y1, x0:x1] = True
            assert torch.equal(item["defect_masks"][j], expected)
            union |= expected
            area = (x1 - x0) * (y1 - y0)
            rule = rules[value]
            s = rule["saturation_threshold"] * area if rule["relative_saturation"] else min(rule["saturation_threshold"], area)
            assert item["defect_values"][j] == value and item["defect_saturation"][j].item() == pytest.approx(s)
        assert torch.equal(item["mask"], union) and item["label"] == 1
        pad = slice(len(boxes), 3)
        assert not item["defect_masks"][pad].any() and (item["defect_values"][pad] == -1).all()
        assert torch.isnan(item["defect_saturation"][pad]).all()
    good = test[by_name[("good", "000")]]
    assert good["label"] == 0 and good["defect_kind"] == "good" and not good["mask"].any() and torch.isnan(good["defect_saturation"]).all()


def test_resized_regions_keep_their_saturation_fraction(loco):
    """At 16x16 the regions are NEAREST-resized like the union mask, and each saturation is the same
    fraction of the resized region as of the file's region."""
    test = MVTecLocoDataset(loco, CATEGORY, "test", input_size=16)
    native = MVTecLocoDataset(loco, CATEGORY, "test", input_size=(H, W))
    for i, (path, masks, label, _) in enumerate(test.samples):
        if not label:
            continue
        small, big = test[i], native[i]
        for j, mask_path in enumerate(masks):
            with Image.open(mask_path) as m:
                expected = np.asarray(m.convert("L").resize((16, 16), Image.NEAREST)) > 0
            assert np.array_equal(small["defect_masks"][j].numpy(), expected)
            fraction = big["defect_saturation"][j] / big["defect_masks"][j].sum()
            assert small["defect_saturation"][j].item() == pytest.approx((fraction * expected.sum()).item())
        assert torch.equal(small["mask"], small["defect_masks"].any(0))
    batch = next(iter(DataLoader(test, batch_size=4, shuffle=False)))
    assert batch["defect_masks"].shape == (4, 3, 16, 16) and batch["defect_saturation"].shape == (4, 3)
    assert isinstance(batch["defect_kind"], list) and len(batch["defect_kind"]) == 4


def test_pickles_and_fingerprints(loco_copy):
    test = MVTecDataset(loco_copy, CATEGORY, "test", input_size=16)
    again = pickle.loads(pickle.dumps(test))
    assert type(again) is MVTecLocoDataset and len(again) == len(test)
    assert torch.equal(again[len(test) - 1]["defect_masks"], test[len(test) - 1]["defect_masks"])
    before = test.fingerprint()
    config = loco_copy / CATEGORY / "defects_config.json"
    config.write_text(json.dumps(CONFIG, indent=1))
    assert MVTecDataset(loco_copy, CATEGORY, "test", input_size=16).fingerprint() != before


@pytest.mark.parametrize(
    "text, message",
    [
        ("[{", r"malformed .*defects_config\.json: not valid JSON"),
        ('{"defect_name": "x"}', r"malformed .*defects_config\.json: expected a non-empty JSON list"),
        ('[{"defect_name": "x", "pixel_value": 3}]', r"entry 0 \('x'\) lacks saturation_threshold, relative_saturation"),
        ('[{"defect_name": "x", "pixel_value": 3, "saturation_threshold": 2, "relative_saturation": true}]', r"relative saturation_threshold .* \(0, 1\]"),
        ('[{"defect_name": "x", "pixel_value": 0, "saturation_threshold": 2, "relative_saturation": false}]', r"pixel_value must be an int in 1\.\.65535"),
        ('[{"defect_name": "x", "pixel_value": 3, "saturation_threshold": -1, "relative_saturation": false}]', r"saturation_threshold must be a positive number"),
        ('[{"defect_name": "x", "pixel_value": 3, "saturation_threshold": 1, "relative_saturation": "yes"}]', r"relative_saturation must be true or false"),
        ('[{"defect_name": "a", "pixel_value": 3, "saturation_threshold": 1, "relative_saturation": true},'
         ' {"defect_name": "b", "pixel_value": 3, "saturation_threshold": 1, "relative_saturation": true}]', r"'a' and 'b' share pixel_value 3"),
    ],
)
def test_malformed_defects_config_names_the_file(tmp_path, text, message):
    path = tmp_path / "defects_config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_defects_config(path)


def test_errors_name_the_file(loco_copy):
    base = loco_copy / CATEGORY
    # a mask value the config does not list: at check_files and when the item is read
    bad = base / "ground_truth" / "logical_anomalies" / "001" / "000.png"
    _mask(7, 3, 18, 15, 30).save(bad)
    test = MVTecDataset(loco_copy, CATEGORY, "test", input_size=16)
    with pytest.raises(ValueError, match=r"001/000\.png has pixel value 7, which .*defects_config\.json does not list \(it lists 252 \(dent\)"):
        test.check_files()
    index = next(i for i, s in enumerate(test.samples) if s[3] == "logical_anomalies" and s[0].stem == "001")
    with pytest.raises(ValueError, match=r"001/000\.png has pixel value 7"):
        test[index]
    # two defect values in one mask file
    two = np.asarray(_mask(255, 3, 18, 15, 30)).copy()
    two[0, 0] = 254
    Image.fromarray(two).save(bad)
    with pytest.raises(ValueError, match=r"001/000\.png holds 2 non-zero values"):
        MVTecDataset(loco_copy, CATEGORY, "test", input_size=16).check_files()
    # a missing mask folder
    shutil.rmtree(bad.parent)
    with pytest.raises(FileNotFoundError, match=r"missing mask folder for defect image .*logical_anomalies/001\.png: expected .*ground_truth/logical_anomalies/001/"):
        MVTecDataset(loco_copy, CATEGORY, "test", input_size=16)
    bad.parent.mkdir()
    with pytest.raises(ValueError, match=r"empty mask folder: .*logical_anomalies/001"):
        MVTecDataset(loco_copy, CATEGORY, "test", input_size=16)
    shutil.rmtree(base / "ground_truth" / "logical_anomalies")
    with pytest.raises(FileNotFoundError, match=r"ground-truth folder not found: .*ground_truth/logical_anomalies"):
        MVTecDataset(loco_copy, CATEGORY, "test", input_size=16)
    shutil.rmtree(base / "test" / "logical_anomalies")
    assert len(MVTecDataset(loco_copy, CATEGORY, "test", input_size=16)) == NUM["good"] + 2
    # the config: missing (the train split does not need it), malformed
    (base / "defects_config.json").unlink()
    assert len(MVTecDataset(loco_copy, CATEGORY, "train", input_size=16)) == NUM["train"]
    with pytest.raises(FileNotFoundError, match=r"defects_config\.json not found: .*toy_box/defects_config\.json"):
        MVTecDataset(loco_copy, CATEGORY, "test", input_size=16)
    (base / "defects_config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"malformed .*defects_config\.json: entry 0 is a int"):
        MVTecDataset(loco_copy, CATEGORY, "test", input_size=16)
    (base / "test" / "odd").mkdir()
    (base / "defects_config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(ValueError, match=r"unexpected folder .*test/odd in an MVTec LOCO AD test split"):
        MVTecDataset(loco_copy, CATEGORY, "test", input_size=16)
    shutil.rmtree(base / "validation")
    with pytest.raises(FileNotFoundError, match=r"split folder not found: .*validation"):
        MVTecDataset(loco_copy, CATEGORY, "validation", input_size=16)
    with pytest.raises(ValueError, match="MVTecLocoDataset reads the 'loco' layout"):
        MVTecLocoDataset(loco_copy, CATEGORY, "train", input_size=16, layout="btad")


# ---------------------------------------------------------------------------------------------
# evaluate and the command line
# ---------------------------------------------------------------------------------------------


class BrightnessModel(nn.Module):
    """Scores pixels by their darkness (the painted defects are darker): a map with no training."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def predict(self, images):
        amap = -images.mean(1)
        return {"anomaly_map": amap, "score": amap.flatten(1).amax(1)}


def test_evaluate_reports_spro_like_the_metric(loco_copy, tmp_path):
    # a 1-pixel region that NEAREST resizing to 16x16 drops: left out with a warning
    _mask(253, 0, 0, 1, 1).save(loco_copy / CATEGORY / "ground_truth" / "structural_anomalies" / "000" / "001.png")
    test = MVTecDataset(loco_copy, CATEGORY, "test", input_size=16)
    result = evaluate(BrightnessModel(), test, batch_size=3, progress=False, out_dir=tmp_path)
    items = [test[i] for i in range(len(test))]
    maps = torch.stack([-it["image"].mean(0) for it in items])
    regions = [it["defect_masks"][~torch.isnan(it["defect_saturation"]) & it["defect_masks"].flatten(1).any(1)] for it in items]
    saturation = [it["defect_saturation"][~torch.isnan(it["defect_saturation"]) & it["defect_masks"].flatten(1).any(1)] for it in items]
    kinds = [it["defect_kind"] for it in items]
    expected = spro_by_kind(maps, regions, saturation, kinds, fpr_limits=(0.05, 0.3))
    assert set(result["spro"]) == {"0.05", "0.3"}
    for limit in expected:
        for kind in ("all", "logical", "structural"):
            assert result["spro"][limit][kind] == pytest.approx(expected[limit][kind], abs=1e-9)
    assert result["spro_regions"] == {"all": 7, "logical": 3, "structural": 4}
    assert result["maps"]["spro"] == "anomaly_map"
    assert any("1 defect region(s) have no pixel at the input size" in w for w in result["warnings"])
    for kind in ("logical", "structural"):
        assert 0.0 <= result["image_auroc_by_kind"][kind] <= 1.0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["spro"]["0.05"]["all"] == pytest.approx(result["spro"]["0.05"]["all"])


_SMALL = ["--input-size", "64", "--backbone", "resnet18", "--no-pretrained", "--flow-steps", "1"]


def test_cli_train_and_eval_on_loco(loco, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "fastflow", "--data", str(loco), "--category", CATEGORY, "--out", str(out), "--epochs", "1",
                   "--batch-size", "4", "--no-progress", *_SMALL])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "sPRO (FPR limit 0.05) all" in text and "image AUROC logical" in text, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == NUM["good"] + len(DEFECTS) and metrics["spro_regions"]["all"] == 7

    rc = cli.main(["eval", "--data", str(loco), "--category", CATEGORY, "--layout", "loco", "--checkpoint", str(out / "last.pt"),
                   "--out", str(tmp_path / "ev"), "--no-progress", "--spro-fpr-limits", "0.05", "0.3", "1.0"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    for limit in ("0.05", "0.3", "1"):
        assert f"sPRO (FPR limit {limit}) all" in text, text
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)
    for limit in ("0.05", "0.3"):
        for kind in ("all", "logical", "structural"):
            value = again["spro"][limit][kind]
            assert 0.0 <= value <= 1.0 and value == pytest.approx(metrics["spro"][limit][kind], abs=1e-6)
    assert set(again["image_auroc_by_kind"]) == {"logical", "structural"}
