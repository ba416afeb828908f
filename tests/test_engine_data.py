"""Datasets: MVTec layout, VisA/BTAD mask names, synthetic defects, and errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from msflow_fast.engine import MVTecDataset, SyntheticDefects, denormalize, write_synthetic_dataset
from msflow_fast.engine.data import ImageFolderDataset
from msflow_fast.engine.data.synthetic import _synthetic_sample


def _png(path, size=(20, 20), mode="RGB", value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    arr = rng.integers(0, 255, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(arr, mode=None).convert(mode).save(path)
    return path


def _layout(root, mask_suffix="_mask", defect="crack"):
    base = root / "cat"
    _png(base / "train" / "good" / "000.png")
    _png(base / "train" / "good" / "001.png", mode="L")  # grayscale -> 3 channels
    _png(base / "test" / "good" / "000.png")
    _png(base / "test" / defect / "000.png")
    mask = np.zeros((20, 20), np.uint8)
    mask[5:9, 5:12] = 17  # any non-zero is anomalous
    (base / "ground_truth" / defect).mkdir(parents=True)
    Image.fromarray(mask).save(base / "ground_truth" / defect / f"000{mask_suffix}.png")
    return base


def test_mvtec_layout_items(tmp_path):
    _layout(tmp_path)
    train = MVTecDataset(tmp_path, "cat", "train", input_size=16)
    assert len(train) == 2
    item = train[1]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"] == 0 and not item["mask"].any()
    test = MVTecDataset(tmp_path, "cat", "test", input_size=16)
    assert test.labels == [1, 0]  # sorted defect folders: crack, good
    bad = test[0]
    assert bad["mask"].dtype == torch.bool and bad["mask"].shape == (16, 16)
    assert 0 < bad["mask"].sum() < 256
    assert bad["defect"] == "crack" and bad["path"].endswith("000.png")
    img = denormalize(bad["image"])
    assert img.min() >= 0 and img.max() <= 1


def test_visa_style_masks_and_category_none(tmp_path):
    base = _layout(tmp_path, mask_suffix="", defect="bad")
    test = MVTecDataset(base, None, "test", input_size=20)
    assert test[0]["mask"].sum() == 4 * 7


@pytest.mark.parametrize("missing", ["root", "category", "split", "good"])
def test_missing_folders_name_the_path(tmp_path, missing):
    _layout(tmp_path)
    import shutil

    root, category = tmp_path, "cat"
    if missing == "root":
        root = tmp_path / "nowhere"
        expected = "nowhere"
    elif missing == "category":
        category = "dog"
        expected = "dog"
    elif missing == "split":
        shutil.rmtree(tmp_path / "cat" / "train")
        expected = "train"
    else:
        shutil.rmtree(tmp_path / "cat" / "train" / "good")
        expected = "good"
    with pytest.raises(FileNotFoundError, match=expected):
        MVTecDataset(root, category, "train", input_size=16)


def test_empty_folder_names_it(tmp_path):
    base = _layout(tmp_path)
    for f in (base / "train" / "good").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"empty folder: .*train.good"):
        MVTecDataset(tmp_path, "cat", "train", input_size=16)


def test_missing_mask_names_the_image(tmp_path):
    base = _layout(tmp_path)
    _png(base / "test" / "crack" / "001.png")
    with pytest.raises(FileNotFoundError, match=r"missing mask for defect image .*001\.png"):
        MVTecDataset(tmp_path, "cat", "test", input_size=16)


def test_missing_ground_truth_folder(tmp_path):
    base = _layout(tmp_path)
    _png(base / "test" / "scratch" / "000.png")
    with pytest.raises(FileNotFoundError, match=r"ground_truth.scratch"):
        MVTecDataset(tmp_path, "cat", "test", input_size=16)


def test_truncated_png_names_the_file(tmp_path):
    base = _layout(tmp_path)
    path = base / "train" / "good" / "000.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = MVTecDataset(tmp_path, "cat", "train", input_size=16)
    with pytest.raises(ValueError, match=r"cannot read image .*000\.png"):
        ds[0]


def test_garbage_file_names_the_file(tmp_path):
    base = _layout(tmp_path)
    (base / "train" / "good" / "000.png").write_bytes(b"not a png at all")
    ds = MVTecDataset(tmp_path, "cat", "train", input_size=16)
    with pytest.raises(ValueError, match=r"000\.png"):
        ds[0]


def test_mask_size_mismatch_names_the_mask(tmp_path):
    base = _layout(tmp_path)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(base / "ground_truth" / "crack" / "000_mask.png")
    ds = MVTecDataset(tmp_path, "cat", "test", input_size=16)
    with pytest.raises(ValueError, match=r"mask size mismatch: .*000_mask\.png"):
        ds[0]


def test_bad_split_and_size(tmp_path):
    _layout(tmp_path)
    with pytest.raises(ValueError, match="split"):
        MVTecDataset(tmp_path, "cat", "val")
    with pytest.raises(ValueError, match="input_size"):
        MVTecDataset(tmp_path, "cat", "train", input_size=0)


def test_synthetic_defects_deterministic_with_exact_masks():
    a = SyntheticDefects("test", 8, 32, seed=3)
    b = SyntheticDefects("test", 8, 32, seed=3)
    c = SyntheticDefects("test", 8, 32, seed=4)
    assert torch.equal(a[1]["image"], b[1]["image"]) and not torch.equal(a[1]["image"], c[1]["image"])
    labels = [a[i]["label"] for i in range(8)]
    assert sum(labels) == 4
    for i in range(8):
        item = a[i]
        assert item["mask"].any() == bool(item["label"])
    # the mask covers exactly what changed: outside it the image equals the normal texture
    img, mask, kind = a.raw(1)
    clean, _, _ = _synthetic_sample(3, "test", 1, 32, anomalous=False)
    assert kind != "good" and mask.any()
    assert np.array_equal(img[~mask], clean[~mask])
    assert np.abs(img[mask].astype(int) - clean[mask].astype(int)).mean() > 5
    train = SyntheticDefects("train", 4, 32, seed=3)
    assert all(train[i]["label"] == 0 for i in range(4))


def test_write_synthetic_dataset_roundtrip(tmp_path):
    base = write_synthetic_dataset(tmp_path, "syn", num_train=4, num_test=6, input_size=32, seed=1)
    train = MVTecDataset(tmp_path, "syn", "train", input_size=32)
    test = MVTecDataset(tmp_path, "syn", "test", input_size=32)
    assert len(train) == 4 and len(test) == 6 and sum(test.labels) == 3
    ref = SyntheticDefects("test", 6, 32, seed=1)
    by_name = {int(s[0].stem): i for i, s in enumerate(test.samples)}
    for k in range(6):
        item, expected = test[by_name[k]], ref[k]
        assert torch.allclose(item["image"], expected["image"], atol=1e-5)
        assert torch.equal(item["mask"], expected["mask"])
    assert (base / "ground_truth").is_dir()


def test_image_folder_dataset(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.jpg")
    ds = ImageFolderDataset(tmp_path, input_size=8)
    assert len(ds) == 2 and ds[0]["image"].shape == (3, 8, 8)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        ImageFolderDataset([tmp_path / "nope.png"])


def test_check_finite_images():
    from msflow_fast.engine.data import check_finite_images

    ok = torch.randn(3, 3, 8, 8)
    assert check_finite_images(ok) is ok
    huge = torch.full((2, 3, 8, 8), 3e38)  # finite, but the float32 sum overflows: the exact test decides
    assert check_finite_images(huge) is huge
    half = torch.full((2, 3, 64, 64), 60000.0, dtype=torch.float16)
    assert check_finite_images(half) is half
    raw = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)  # integer images cannot hold NaN: passed through
    assert check_finite_images(raw) is raw
    bad = ok.clone()
    bad[0, 0, 0, 0] = float("nan")
    bad[2, 1, 3, 3] = -float("inf")
    with pytest.raises(ValueError, match=r"^non-finite input images: a\.png \(image 0 of the batch\), image 2 of the batch in batch 7 contain NaN or infinite values \(2 of 576 values\)"):
        check_finite_images(bad, ["a.png", "b.png", ""], "batch 7")
    many = torch.full((7, 3, 2, 2), float("nan"))
    with pytest.raises(ValueError, match=r"image 4 of the batch and 2 more contain"):
        check_finite_images(many)


# ---------------------------------------------------------------------------------------------
# pixel formats: every mode into [0, 1], or refused naming the file and its mode
# ---------------------------------------------------------------------------------------------


def _raw(path):
    """The [0, 1] pixels ``load_image`` read (undoing the normalisation), ``[H, W, 3]``."""
    from msflow_fast.engine.data import load_image

    image, size = load_image(path, None)
    return denormalize(image).permute(1, 2, 0).numpy(), size


def test_16_bit_grey_png_reads_its_values_not_white(tmp_path):
    ramp = np.linspace(0, 65535, 24 * 32).reshape(24, 32).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    pixels, size = _raw(path)
    assert size == (32, 24)
    np.testing.assert_allclose(pixels[..., 0], ramp / 65535.0, atol=1e-5)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-6)  # grey replicated
    # resized in float: the mean brightness stays, no clipping to white
    from msflow_fast.engine.data import load_image

    small, _ = load_image(path, (12, 16))
    assert abs(float(denormalize(small).mean()) - 0.5) < 0.01


def test_float_tiff_in_range_reads_as_is_and_out_of_range_is_refused(tmp_path):
    values = np.random.default_rng(0).random((10, 12)).astype(np.float32)
    good = tmp_path / "good.tiff"
    Image.fromarray(values, mode="F").save(good)
    pixels, _ = _raw(good)
    np.testing.assert_allclose(pixels[..., 1], values, atol=1e-6)
    for name, data, message in (
        ("hdr.tiff", values * 300.0, r"float pixels span \[.*\]; expected values in \[0, 1\]"),
        ("nan.tiff", np.where(values > 0.5, np.nan, values).astype(np.float32), "NaN or infinity"),
    ):
        path = tmp_path / name
        Image.fromarray(data.astype(np.float32), mode="F").save(path)
        with pytest.raises(ValueError, match=f"{name}.*{message}"):
            _raw(path)


def test_32_bit_integer_images_beyond_16_bits_are_refused(tmp_path):
    path = tmp_path / "i32.tiff"
    Image.fromarray(np.full((6, 6), 70000, np.int32), mode="I").save(path)
    with pytest.raises(ValueError, match=r"i32\.tiff: 32-bit integer pixels span \[70000, 70000\]"):
        _raw(path)
    ok = tmp_path / "i32ok.tiff"
    Image.fromarray(np.full((6, 6), 32768, np.int32), mode="I").save(ok)
    np.testing.assert_allclose(_raw(ok)[0], 32768 / 65535, atol=1e-5)


def test_palette_alpha_and_bilevel_images_read_their_colours(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    expected = rgb.astype(np.float32) / 255.0
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, np.full((8, 10), 7, np.uint8)]), mode="RGBA").save(rgba)
    np.testing.assert_allclose(_raw(rgba)[0], expected, atol=1e-6)  # alpha dropped, colours kept
    palette = tmp_path / "palette.png"
    Image.fromarray(rgb).quantize(16).save(palette)
    assert Image.open(palette).mode == "P"
    quantized = np.asarray(Image.open(palette).convert("RGB"), np.float32) / 255.0
    np.testing.assert_allclose(_raw(palette)[0], quantized, atol=1e-6)
    grey_alpha = tmp_path / "la.png"
    Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), mode="LA").save(grey_alpha)
    np.testing.assert_allclose(_raw(grey_alpha)[0][..., 2], expected[..., 0], atol=1e-6)
    bilevel = tmp_path / "one.png"
    Image.fromarray(rgb[..., 0] > 127).convert("1").save(bilevel)
    values = _raw(bilevel)[0]
    assert np.all((np.abs(values) < 1e-6) | (np.abs(values - 1.0) < 1e-6))


def test_non_binary_masks_warn_and_binarise_at_half_range(tmp_path):
    from msflow_fast.engine.data import load_mask

    jpeg_like = np.zeros((10, 10), np.uint8)
    jpeg_like[2:6, 2:6] = 250
    jpeg_like[6:8, 2:6] = 9  # compression noise around the defect
    path = tmp_path / "jpeg_mask.png"
    Image.fromarray(jpeg_like).save(path)
    with pytest.warns(UserWarning, match=r"jpeg_mask\.png is not binary .* binarised at > 127\.5"):
        mask = load_mask(path, None)
    assert int(mask.sum()) == 16
    binary = tmp_path / "ones.png"
    Image.fromarray((jpeg_like > 100).astype(np.uint8)).save(binary)  # 0/1 masks: any non-zero pixel
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert int(load_mask(binary, None).sum()) == 16
    mask16 = tmp_path / "mask16.png"
    Image.fromarray((jpeg_like > 100).astype(np.uint16) * 65535).save(mask16)
    assert int(load_mask(mask16, None).sum()) == 16


def test_check_files_reports_every_bad_file_before_decoding(tmp_path):
    base = _layout(tmp_path)
    test = MVTecDataset(tmp_path, "cat", "test", input_size=16)
    test.check_files()  # all good
    bad = base / "test" / "good" / "000.png"
    bad.write_bytes(bad.read_bytes()[:70])
    Image.fromarray(np.zeros((12, 20), np.uint8)).save(base / "ground_truth" / "crack" / "000_mask.png")
    with pytest.raises(ValueError, match=r"(?s)2 bad file\(s\) in .*test:\n.*000_mask\.png is 20x12 but its image is 20x20.*good/000\.png: OSError: Truncated"):
        test.check_files()
