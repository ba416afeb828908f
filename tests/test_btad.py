"""BTAD (beanTech Anomaly Detection): its folder layout read by MVTecDataset (found automatically or
given), masks named as BTAD names them, non-square products, clear errors, file checks, and the CLI
train / eval / predict on a generated BTAD-shaped folder (no download)."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from msflow_fast import cli
from msflow_fast.engine import MVTecDataset, SyntheticDefects, normalize, write_synthetic_dataset
from msflow_fast.engine.data import LAYOUTS, detect_layout, load_mask
from msflow_fast.models import read as load_checkpoint

NUM_TRAIN, NUM_TEST, SIDE = 4, 6, 32
# BTAD's products, at a tiny scale: 01 is .bmp (masks .png), 02 .png, 03 .bmp with .bmp masks and
# non-square files (BTAD's 800x600, here 32 wide and 24 high).
PRODUCTS = {
    "01": {"image_format": "bmp", "mask_format": "png", "file_size": None},
    "02": {"image_format": "png", "mask_format": "png", "file_size": None},
    "03": {"image_format": "bmp", "mask_format": "bmp", "file_size": (24, 32)},
}


def _write_btad(root, products=PRODUCTS, **kwargs):
    for product, options in products.items():
        write_synthetic_dataset(root, product, num_train=NUM_TRAIN, num_test=NUM_TEST, input_size=SIDE, seed=int(product),
                                layout="btad", **{**options, **kwargs})
    return root


@pytest.fixture(scope="module")
def btad(tmp_path_factory):
    """A BTAD-shaped ``BTech_Dataset_transformed`` folder with the three products."""
    return _write_btad(tmp_path_factory.mktemp("btad") / "BTech_Dataset_transformed")


@pytest.fixture
def btad_copy(btad, tmp_path):
    """A copy of the BTAD folder a test may change."""
    return shutil.copytree(btad, tmp_path / "BTech_Dataset_transformed")


def test_generated_folder_has_the_btad_layout(btad):
    for product, options in PRODUCTS.items():
        base = btad / product
        assert sorted(p.name for p in base.iterdir()) == ["ground_truth", "test", "train"]
        assert [p.name for p in (base / "train").iterdir()] == ["ok"]
        assert sorted(p.name for p in (base / "test").iterdir()) == ["ko", "ok"]
        assert [p.name for p in (base / "ground_truth").iterdir()] == ["ko"]
        assert {p.suffix for p in (base / "train" / "ok").iterdir()} == {"." + options["image_format"]}
        assert {p.suffix for p in (base / "ground_truth" / "ko").iterdir()} == {"." + options["mask_format"]}
        # masks carry the image's stem, no _mask suffix
        assert sorted(p.stem for p in (base / "ground_truth" / "ko").iterdir()) == sorted(p.stem for p in (base / "test" / "ko").iterdir())
    with Image.open(next((btad / "03" / "test" / "ko").iterdir())) as img:
        assert img.format == "BMP" and img.size == (32, 24)


@pytest.mark.parametrize("product", sorted(PRODUCTS))
def test_lengths_labels_and_zero_masks_for_ok_images(btad, product):
    train = MVTecDataset(btad, product, "train", input_size=16)
    test = MVTecDataset(btad, product, "test", input_size=16)
    assert train.layout == test.layout == "btad"
    assert len(train) == NUM_TRAIN and train.labels == [0] * NUM_TRAIN
    assert len(test) == NUM_TEST and sum(test.labels) == NUM_TEST // 2
    assert "layout='btad'" in repr(test)
    for i in range(len(test)):
        item = test[i]
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (16, 16) and item["mask"].dtype == torch.bool
        if item["defect"] == "ok":
            assert item["label"] == 0 and not item["mask"].any() and "/test/ok/" in item["path"].replace(os.sep, "/")
        else:
            assert item["defect"] == "ko" and item["label"] == 1 and item["mask"].any()
    item = train[0]
    assert item["defect"] == "ok" and item["label"] == 0 and not item["mask"].any()


@pytest.mark.parametrize("product", ["01", "02"])
def test_masks_align_with_their_images(btad, product):
    """Read at their own size, every image and mask is exactly what was generated for that index."""
    test = MVTecDataset(btad, product, "test", input_size=SIDE)
    reference = SyntheticDefects("test", NUM_TEST, SIDE, seed=int(product))
    for path, mask_path, label, _ in test.samples:
        index = int(path.stem)
        assert label == int(reference.is_anomalous(index))
        assert (mask_path is None) == (label == 0)
        if mask_path is not None:
            assert mask_path.stem == path.stem and mask_path.parent.name == "ko"
    for i in range(len(test)):
        item, expected = test[i], reference[int(test.samples[i][0].stem)]
        assert torch.allclose(item["image"], expected["image"], atol=1e-5)
        assert torch.equal(item["mask"], expected["mask"])


def test_non_square_product_is_resized_whole_like_mvtec_images(btad):
    """BTAD 03 (800x600 in the real set): squashed to the input size with LANCZOS, masks NEAREST, no crop."""
    test = MVTecDataset(btad, "03", "test", input_size=16)
    ko = next(i for i, s in enumerate(test.samples) if s[2] == 1)
    path, mask_path = test.samples[ko][0], test.samples[ko][1]
    item = test[ko]
    with Image.open(path) as img:
        assert img.size == (32, 24)
        pixels = np.asarray(img.convert("RGB").resize((16, 16), Image.LANCZOS), np.float32) / 255.0
    expected = normalize(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())
    assert torch.allclose(item["image"], expected, atol=1e-5)
    with Image.open(mask_path) as mask:
        expected_mask = np.asarray(mask.convert("L").resize((16, 16), Image.NEAREST)) > 0
    assert np.array_equal(item["mask"].numpy(), expected_mask) and expected_mask.any()
    # a non-square input size keeps the file's own pixels when it matches
    native = MVTecDataset(btad, "03", "test", input_size=(24, 32))[ko]
    assert native["image"].shape == (3, 24, 32) and native["mask"].shape == (24, 32)
    assert torch.equal(native["mask"], load_mask(mask_path, None))


def test_layout_is_detected_and_can_be_given(btad, tmp_path):
    assert detect_layout(btad / "01") == "btad"
    mvtec = write_synthetic_dataset(tmp_path / "mvtec", "syn", num_train=2, num_test=2, input_size=16)
    assert detect_layout(mvtec) == "mvtec"
    assert MVTecDataset(mvtec, None, "test", input_size=16).layout == "mvtec"
    (tmp_path / "empty").mkdir()
    assert detect_layout(tmp_path / "empty") is None
    assert LAYOUTS == {"mvtec": "good", "btad": "ok"}
    given = MVTecDataset(btad, "01", "test", input_size=16, layout="btad")
    assert given.labels == MVTecDataset(btad, "01", "test", input_size=16).labels
    # read as MVTec AD, test/ok would be a defect type: asking for it explicitly says what is missing
    with pytest.raises(FileNotFoundError, match=r"no train/good folder under .*01: the MVTec AD layout"):
        MVTecDataset(btad, "01", "train", input_size=16, layout="mvtec")
    with pytest.raises(ValueError, match=r"layout: expected 'auto', 'mvtec', 'btad', got 'visa'"):
        MVTecDataset(btad, "01", "train", input_size=16, layout="visa")


def test_both_good_and_ok_folders_need_the_layout_given(btad_copy):
    base = btad_copy / "02"
    shutil.copytree(base / "train" / "ok", base / "train" / "good")
    with pytest.raises(ValueError, match=r"both good/ \(MVTec AD\) and ok/ \(BTAD\).*layout='btad'.*--layout"):
        MVTecDataset(btad_copy, "02", "train", input_size=16)
    assert len(MVTecDataset(btad_copy, "02", "train", input_size=16, layout="btad")) == NUM_TRAIN


def test_missing_train_ok_names_what_is_expected(btad_copy):
    shutil.rmtree(btad_copy / "01" / "train" / "ok")
    with pytest.raises(FileNotFoundError, match=r"no train/ok folder under .*01: the BTAD layout keeps the normal training images there"):
        MVTecDataset(btad_copy, "01", "train", input_size=16)
    shutil.rmtree(btad_copy / "01" / "test" / "ok")  # nothing left to tell the layout by
    with pytest.raises(FileNotFoundError, match=r"no train/good or train/ok folder under .*01: expected the MVTec AD layout .* the BTAD layout train/ok/"):
        MVTecDataset(btad_copy, "01", "train", input_size=16)


def test_empty_and_wrong_folders_give_one_clear_error(btad_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"split folder not found: .*BTech_Dataset_transformed.train .*looks like a dataset root holding the categories 01, 02, 03: pass --category"):
        MVTecDataset(btad_copy, None, "train", input_size=16)
    with pytest.raises(FileNotFoundError, match=r"category folder not found: .*04"):
        MVTecDataset(btad_copy, "04", "train", input_size=16)
    (tmp_path / "blank" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no train/good or train/ok folder under .*blank"):
        MVTecDataset(tmp_path / "blank", None, "train", input_size=16)
    for f in (btad_copy / "02" / "train" / "ok").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"empty folder: .*02.train.ok holds no image file"):
        MVTecDataset(btad_copy, "02", "train", input_size=16)


def test_ko_image_without_mask_is_an_error_as_in_mvtec(btad_copy):
    masks = btad_copy / "03" / "ground_truth" / "ko"
    victim = sorted(masks.iterdir())[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"missing mask for defect image .*ko.{victim.stem}\.bmp: looked for .*{victim.stem}_mask\.png or .*{victim.stem}\.png"):
        MVTecDataset(btad_copy, "03", "test", input_size=16)
    MVTecDataset(btad_copy, "03", "train", input_size=16)  # the train split needs no masks
    shutil.rmtree(masks)
    with pytest.raises(FileNotFoundError, match=r"ground-truth folder not found: .*ground_truth.ko"):
        MVTecDataset(btad_copy, "03", "test", input_size=16)


def test_mask_lookup_is_tolerant_of_names_and_extensions(btad_copy):
    masks = btad_copy / "02" / "ground_truth" / "ko"
    first, second = sorted(masks.iterdir())[:2]
    first.rename(masks / (first.stem + "_mask.png"))  # MVTec naming
    with Image.open(second) as img:
        img.save(masks / (second.stem + ".BMP"))  # another extension, upper case
    second.unlink()
    test = MVTecDataset(btad_copy, "02", "test", input_size=16)
    found = {s[0].stem: s[1].name for s in test.samples if s[1] is not None}
    assert found[first.stem] == first.stem + "_mask.png" and found[second.stem] == second.stem + ".BMP"
    test.check_files()
    assert all(test[i]["mask"].any() for i in range(len(test)) if test.labels[i])
    # a .png mask is preferred when several extensions exist
    Image.new("L", (SIDE, SIDE)).save(masks / (second.stem + ".png"))
    found = {s[0].stem: s[1].name for s in MVTecDataset(btad_copy, "02", "test", input_size=16).samples if s[1] is not None}
    assert found[second.stem] == second.stem + ".png"


def test_check_files_covers_bmp_images_and_masks(btad_copy):
    test = MVTecDataset(btad_copy, "03", "test", input_size=16)
    test.check_files()
    MVTecDataset(btad_copy, "03", "train", input_size=16).check_files()
    ok_image = next(p for p, m, _, _ in test.samples if m is None)
    ok_image.write_bytes(ok_image.read_bytes()[:500])  # a cut BMP: Pillow's verify alone misses it
    ko_image, mask = next((p, m) for p, m, _, _ in test.samples if m is not None)
    Image.new("L", (24, 24)).save(mask)  # square mask for a 32x24 image
    with pytest.raises(ValueError, match=rf"(?s)2 bad file\(s\) in .*test:\n.*{mask.name} is 24x24 but its image is 32x24.*{ok_image.name}: truncated file"):
        test.check_files()


def test_fingerprint_keys_the_files_and_items_are_deterministic(btad_copy):
    a = MVTecDataset(btad_copy, "01", "train", input_size=16)
    assert a.deterministic_items and a.images_are_finite
    assert a.fingerprint() == MVTecDataset(btad_copy, "01", "train", input_size=16).fingerprint()
    assert a.fingerprint() != MVTecDataset(btad_copy, "03", "train", input_size=16).fingerprint()
    assert a.fingerprint() != MVTecDataset(btad_copy, "01", "train", input_size=32).fingerprint()
    assert a.fingerprint() != MVTecDataset(btad_copy, "01", "test", input_size=16).fingerprint()
    assert torch.equal(a[0]["image"], a[0]["image"])
    before = a.fingerprint()
    path = a.samples[0][0]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed file: cached features are stale
    assert MVTecDataset(btad_copy, "01", "train", input_size=16).fingerprint() != before


def test_synthetic_writer_refuses_bad_options(tmp_path):
    for kwargs, message in (({"layout": "visa"}, "layout: expected 'mvtec' or 'btad'"), ({"image_format": "gif"}, "image_format: expected one of png, bmp"),
                            ({"mask_format": "jpg"}, "mask_format"), ({"file_size": (0, 4)}, "file_size")):
        with pytest.raises(ValueError, match=message):
            write_synthetic_dataset(tmp_path, "x", num_train=1, num_test=2, input_size=8, **kwargs)


# ---------------------------------------------------------------------------------------------
# the command line on BTAD with the real MSFlow (small random-initialised timm backbone)
# ---------------------------------------------------------------------------------------------

_SMALL = ["--input-size", "64", "--backbone", "resnet18", "--no-pretrained", "--parallel-blocks", "1", "1", "1"]


def test_cli_train_eval_predict_on_btad(btad, tmp_path, capsys):
    """The non-square .bmp product (03) through train, eval and predict; layout found from ok/."""
    out = tmp_path / "run"
    rc = cli.main(["train", "--data", str(btad), "--category", "03", "--out", str(out), "--epochs", "2", "--batch-size", "2",
                   "--lr", "1e-3", "--no-progress", *_SMALL])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "image AUROC" in text and "features cached" in text, text  # the feature cache keys BTAD data too
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert metrics["num_images"] == NUM_TEST
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert sorted((r["defect"], r["label"]) for r in rows) == [("ko", "1")] * 3 + [("ok", "0")] * 3
    assert all(r["path"].endswith(".bmp") for r in rows)
    state = load_checkpoint(out / "last.pt")
    assert state["config"]["input_size"] == [64, 64] and state["training"]["epoch"] == 1

    rc = cli.main(["eval", "--data", str(btad), "--category", "03", "--layout", "btad", "--checkpoint", str(out / "last.pt"),
                   "--out", str(tmp_path / "ev"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6)

    images = btad / "03" / "test" / "ko"
    rc = cli.main(["predict", "--checkpoint", str(out), "--input", str(images), "--out", str(tmp_path / "pred"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader((tmp_path / "pred" / "scores.csv").open()))
    assert len(rows) == len(list(images.iterdir())) == 3
    assert len(list((tmp_path / "pred" / "heatmaps").glob("*.png"))) == 3


def test_cli_errors_on_btad_name_the_fix(btad, tmp_path, capsys):
    base = ["train", "--out", str(tmp_path / "o"), "--epochs", "1", "--no-progress", *_SMALL]
    rc = cli.main(base + ["--data", str(btad)])
    err = capsys.readouterr().err
    assert rc == 2 and "categories 01, 02, 03: pass --category" in err, err
    rc = cli.main(base + ["--data", str(btad), "--category", "01", "--layout", "mvtec"])
    err = capsys.readouterr().err
    assert rc == 2 and "no train/good folder under" in err, err
    with pytest.raises(SystemExit):
        cli.main(base + ["--data", str(btad), "--category", "01", "--layout", "visa"])
    assert "--layout: invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "o" / "last.pt").exists()
