"""``mlff``, an interpretation of the multi-level feature fusion network (Tang et al. 2025): config
checks, shapes, the three loss terms against their definitions and hand-computed values, the
ablation switches, the two-phase schedule, the clean-image teacher target, training on pseudo
anomalies through the engine (set_epoch), checkpoints and the CLI on the demo data.

Tiny models: random ResNet-18 teacher and student at 64 px, narrow heads; one torch thread."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from msflow_fast import cli, models
from msflow_fast.engine import SyntheticDefects, fit, write_synthetic_dataset
from msflow_fast.engine.data.pseudo_anomaly import PseudoAnomalyConfig, PseudoAnomalyDataset
from msflow_fast.models import load_model, read, save
from msflow_fast.models.mlff import (
    MLFF,
    MLFFConfig,
    MultiLevelFusion,
    consistency_loss,
    discrepancy,
    feature_loss,
    focal_loss,
    mask_target,
    score_loss,
    top_k_score,
)

SIZE = 64
TINY = {"input_size": SIZE, "pretrained": False, "fpn_channels": 8, "seg_channels": 16, "aspp_rates": (2, 4), "top_k": 10}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> MLFF:
    torch.manual_seed(0)
    return MLFF(**TINY).eval()


def _variant(base: MLFF, **changes) -> MLFF:
    """A model with ``changes`` to ``base``'s config and ``base``'s weights (where the shapes allow)."""
    model = MLFF(base.config.replace(**changes))
    mine = model.state_dict()
    model.load_state_dict({k: v for k, v in base.state_dict().items() if k in mine and mine[k].shape == v.shape}, strict=False)
    return model.eval()


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(2, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(2, SIZE, SIZE)
    mask[1, 8:40, 16:48] = 1.0
    image = clean + 2.0 * mask[:, None] * torch.randn(2, 3, SIZE, SIZE, generator=g)
    return {"image": image, "clean_image": clean, "mask": mask, "label": torch.tensor([0, 1])}


# ---------------------------------------------------------------------------------------------- registry, config, shapes


def test_registered_as_an_interpretation(capsys):
    cls = models.get("mlff")
    assert cls is MLFF and cls.interpretation is True
    for text in (cls.__doc__, MLFFConfig.__doc__, cls.summary, models.mlff.__doc__):
        assert "interpretation" in text.lower()
    assert cli.main(["models"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("mlff"))
    assert "interpretation" in line.lower()


@pytest.mark.parametrize("field, value, match", [
    ("input_size", 70, "multiples of 32"),
    ("fusion", "sum", "fusion must be one of"),
    ("consistency", "dice", "consistency must be one of"),
    ("score_loss", "hinge", "score_loss must be one of"),
    ("layers", (3, 1), "increasing order"),
    ("layers", (), "non-empty tuple"),
    ("aspp_rates", (0,), "non-empty tuple of ints >= 1"),
    ("margin", 1.5, r"margin must be a finite number in \(0, 1\]"),
    ("margin_weight", -1.0, "margin_weight must be a finite number >= 0"),
    ("focal_gamma", float("nan"), "focal_gamma must be a finite number >= 0"),
    ("top_k", 0, "top_k must be an int >= 1"),
    ("feature_weight", 0.0, "feature_weight must be a finite number > 0"),
    ("pseudo_p_normal", 1.0, r"pseudo_p_normal must be a fraction in \[0, 1\)"),
    ("pretrained", 1, "pretrained must be a bool"),
    ("head_norm", "layer", "head_norm must be one of"),
    ("backbone", "", "backbone must be a non-empty"),
])
def test_config_errors_name_the_field(field, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MLFFConfig(**{field: value})


def test_student_backbone_errors_say_what_to_use():
    with pytest.raises(ValueError, match="timm cannot build it as a CNN feature extractor"):
        MLFF(**TINY, student_backbone="no_such_net")
    with pytest.raises(ValueError, match="does not end at stride 32"):
        MLFF(**TINY, student_backbone="vit_tiny_patch16_224")


def test_config_refuses_a_segmentation_stage_without_loss():
    with pytest.raises(ValueError, match="without a loss"):
        MLFFConfig(consistency="off", score_loss="off")
    assert MLFFConfig(consistency="off").score_loss == "bce_margin"  # one term is enough


def test_shapes(tiny):
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = tiny(images)
    assert [tuple(t.shape) for t in out.teacher] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert [tuple(s.shape) for s in out.student] == [tuple(t.shape) for t in out.teacher]
    assert tuple(out.segmentation.shape) == (2, 16, 16) and 0.0 <= float(out.segmentation.min()) <= float(out.segmentation.max()) <= 1.0
    pred = tiny.predict(images)
    assert tuple(pred.anomaly_map.shape) == (2, SIZE, SIZE) and tuple(pred.score.shape) == (2,)
    assert tuple(pred.maps["student_teacher"].shape) == (2, SIZE, SIZE) and tuple(pred.maps["score_student_teacher"].shape) == (2,)
    assert tiny.fusion.out_channels == 3 * 8 + 64 + 128 + 256
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny.predict(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match="stages"):
        tiny.set_stage("joint")
    assert tiny.frozen_features(images) is None  # inputs change every epoch: nothing to cache


# ---------------------------------------------------------------------------------------------- losses from their definitions


def test_focal_l1_consistency_against_hand_computed_values():
    prob = torch.tensor([[[0.9, 0.2], [0.6, 0.1]]])
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # p_t = 0.9, 0.8, 0.4, 0.9; focal = mean(-(1 - p_t)^2 ln p_t); L1 = mean(0.1, 0.2, 0.6, 0.1)
    focal = (0.01 * -math.log(0.9) + 0.04 * -math.log(0.8) + 0.36 * -math.log(0.4) + 0.01 * -math.log(0.9)) / 4
    assert float(focal_loss(prob, mask, 2.0)) == pytest.approx(focal, rel=1e-5)
    assert float(consistency_loss(prob, mask, 2.0)) == pytest.approx(focal + 0.25, rel=1e-5)
    gamma0 = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.9)) / 4  # gamma 0: the BCE
    assert float(focal_loss(prob, mask, 0.0)) == pytest.approx(gamma0, rel=1e-5)
    # The mask is resized to the map's grid (bilinear) and binarised at 0.5.
    big = torch.zeros(1, 8, 8)
    big[0, :4, :4] = 1.0
    big[0, 4, 0] = 1.0  # a lone pixel: below 0.5 after resizing
    assert torch.equal(mask_target(big, (2, 2)), mask)
    # saturated bf16 probabilities (autocast) stay finite: the logarithms are taken in float32
    saturated = torch.tensor([[[1.0, 0.0]]], dtype=torch.bfloat16)
    wrong = torch.tensor([[[0.0, 1.0]]])
    assert math.isfinite(float(consistency_loss(saturated, wrong, 4.0)))
    assert math.isfinite(float(score_loss(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([0]))))


def test_bce_margin_score_loss_against_hand_computed_values():
    s, y = torch.tensor([0.95, 0.3]), torch.tensor([1, 0])
    bce = (-math.log(0.95) - math.log(0.7)) / 2
    margin = (0.0 + 0.3) / 2  # y = 1: max(0, 0.9 - 0.95) = 0; y = 0: s = 0.3
    assert float(score_loss(s, y, margin=0.9, margin_weight=0.5)) == pytest.approx(bce + 0.5 * margin, rel=1e-5)
    assert float(score_loss(s, y, with_margin=False)) == pytest.approx(bce, rel=1e-5)
    low = torch.tensor([0.5])  # an anomalous image below the margin pays 0.5 * (0.9 - 0.5)
    assert float(score_loss(low, torch.tensor([1]))) == pytest.approx(-math.log(0.5) + 0.5 * 0.4, rel=1e-5)


def test_feature_loss_and_image_score_from_their_definitions():
    g = torch.Generator().manual_seed(3)
    t = [torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 6, 2, 2, generator=g)]
    s = [torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 6, 2, 2, generator=g)]
    expected = sum((1 - (a / a.norm(dim=1, keepdim=True) * (b / b.norm(dim=1, keepdim=True))).sum(1)).mean() for a, b in zip(t, s))
    assert float(feature_loss(t, s)) == pytest.approx(float(expected), rel=1e-5)
    assert torch.allclose(discrepancy(t[0], s[0]).sum(1), -F.cosine_similarity(t[0], s[0], dim=1), atol=1e-6)
    maps = torch.rand(3, 5, 7, generator=g)
    for k in (1, 4, 35, 1000):
        expected = torch.stack([m.flatten().sort(descending=True).values[: min(k, 35)].mean() for m in maps])
        assert torch.allclose(top_k_score(maps, k), expected)


def test_predict_score_is_the_mean_of_the_top_k_pixels(tiny):
    images = torch.randn(2, 3, SIZE, SIZE)
    model = _variant(tiny)
    with torch.no_grad():
        model.head.out[1].weight.mul_(300.0)  # an untrained head's map is nearly flat: spread it
    pred = model.predict(images)
    with torch.no_grad():
        seg = model(images).segmentation
    assert torch.allclose(pred.anomaly_map, F.interpolate(seg[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0])
    top = torch.stack([m.flatten().sort(descending=True).values[:10].mean() for m in pred.anomaly_map])
    assert torch.allclose(pred.score, top)
    assert not torch.allclose(pred.score, pred.anomaly_map.flatten(1).max(1).values)  # not the max


# ---------------------------------------------------------------------------------------------- switches


def test_segmentation_terms_equal_their_definitions_and_each_switch_removes_exactly_its_term(tiny):
    batch = _batch()
    with torch.no_grad():
        out = tiny(batch["image"])
        terms = tiny.loss_terms(batch, "segmentation")
    prob = out.segmentation
    score = top_k_score(F.interpolate(prob[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0], 10)
    assert set(terms) == {"consistency", "score"}
    assert torch.allclose(terms["consistency"], consistency_loss(prob, batch["mask"], 4.0))
    bce = score_loss(score, batch["label"], with_margin=False)
    margin = 0.5 * (batch["label"] * (0.9 - score).clamp(min=0) + (1 - batch["label"]) * score).mean()
    assert torch.allclose(terms["score"], bce + margin, atol=1e-6)
    tiny.set_stage("segmentation")
    try:
        total = tiny.loss(batch)
        assert torch.allclose(total, terms["consistency"] + terms["score"])
        variants = {
            "consistency off": (_variant(tiny, consistency="off"), {"score": terms["score"]}),
            "score off": (_variant(tiny, score_loss="off"), {"consistency": terms["consistency"]}),
            "score bce": (_variant(tiny, score_loss="bce"), {"consistency": terms["consistency"], "score": bce}),
        }
        for name, (model, expected) in variants.items():
            model.set_stage("segmentation")
            got = model.loss_terms(batch)
            assert set(got) == set(expected), name
            for key in expected:
                assert torch.allclose(got[key], expected[key], atol=1e-6), (name, key)
            loss = model.loss(batch)
            assert torch.allclose(loss, sum(expected.values()), atol=1e-6) and not torch.allclose(loss, total), name
        weighted = _variant(tiny, consistency_weight=2.0, score_weight=0.5)
        weighted.set_stage("segmentation")
        assert torch.allclose(weighted.loss(batch), 2.0 * terms["consistency"] + 0.5 * terms["score"], atol=1e-6)
    finally:
        tiny.set_stage("student")
    gamma = _variant(tiny, focal_gamma=0.0).loss_terms(batch, "segmentation")
    assert torch.allclose(gamma["consistency"], consistency_loss(prob, batch["mask"], 0.0)) and not torch.allclose(gamma["consistency"], terms["consistency"])
    margin_model = _variant(tiny, margin=0.5, margin_weight=2.0).loss_terms(batch, "segmentation")
    expected = bce + 2.0 * (batch["label"] * (0.5 - score).clamp(min=0) + (1 - batch["label"]) * score).mean()
    assert torch.allclose(margin_model["score"], expected, atol=1e-6)


def test_fpn_and_concat_fusion_from_their_definitions(tiny):
    torch.manual_seed(1)
    d = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2)]
    up = lambda x, s: F.interpolate(x, size=s, mode="bilinear", align_corners=False)  # noqa: E731
    concat = MultiLevelFusion([4, 6, 8], "concat")
    assert concat.out_channels == 18 and not list(concat.parameters())
    assert torch.equal(concat(d), torch.cat([d[0], up(d[1], (8, 8)), up(d[2], (8, 8))], 1))
    fpn = MultiLevelFusion([4, 6, 8], "fpn", fpn_channels=5)
    lat = fpn.lateral
    p3 = lat[2](d[2])
    p2 = lat[1](d[1]) + up(p3, (4, 4))
    p1 = lat[0](d[0]) + up(p2, (8, 8))
    expected = torch.cat([p1, up(p2, (8, 8)), up(p3, (8, 8)), d[0], up(d[1], (8, 8)), up(d[2], (8, 8))], 1)
    assert fpn.out_channels == 33 and torch.allclose(fpn(d), expected, atol=1e-6)
    # The switch changes the model's outputs and its loss (the same teacher and student weights).
    other = _variant(tiny, fusion="concat")
    assert other.fusion.out_channels == 64 + 128 + 256
    assert torch.equal(other.student.decoder[0][0][0].weight, tiny.student.decoder[0][0][0].weight)
    images = _batch()["image"]
    assert not torch.allclose(other.predict(images).anomaly_map, tiny.predict(images).anomaly_map)
    assert not torch.allclose(other.loss_terms(_batch(), "segmentation")["consistency"], tiny.loss_terms(_batch(), "segmentation")["consistency"])


def test_group_norm_head_is_the_same_in_training_and_evaluation(tiny):
    grouped = _variant(tiny, head_norm="group")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in grouped.head.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in grouped.head.modules()) == sum(isinstance(m, nn.BatchNorm2d) for m in tiny.head.modules())
    z = torch.randn(2, grouped.fusion.out_channels, 16, 16)
    with torch.no_grad():
        evaluated = grouped.head.eval()(z)
        trained = grouped.head.train()(z)
        batch_norm_gap = (tiny.head.train()(z) - tiny.head.eval()(z)).abs().max()
    tiny.head.eval()
    assert torch.allclose(trained, evaluated) and batch_norm_gap > 1e-3


def test_segmentation_stage_learns_the_pseudo_masks():
    """40 Adam steps on one batch of pseudo anomalies: the map ranks their pixels (a GroupNorm head,
    evaluated as trained)."""
    from msflow_fast.engine.metrics import auroc

    torch.manual_seed(0)
    model = MLFF(**TINY, head_norm="group")
    data = PseudoAnomalyDataset(SyntheticDefects("train", 8, SIZE, seed=0), PseudoAnomalyConfig(p_normal=0.0), clean_image=True)
    batch = torch.utils.data.default_collate([data[i] for i in range(8)])
    model.set_stage("segmentation")
    model.train()
    optimizer = torch.optim.Adam(model.stage_parameters("segmentation"), lr=1e-3)

    def pixel_auroc() -> float:
        model.eval()
        value = auroc(model.predict(batch["image"]).anomaly_map.flatten(), (batch["mask"] > 0).flatten().long())
        model.train()
        return value

    before, first = pixel_auroc(), model.loss(batch).item()
    for _ in range(40):
        loss = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.loss(batch).item() < 0.5 * first and pixel_auroc() > max(0.85, before + 0.2)


# ---------------------------------------------------------------------------------------------- stages and the student's target


def test_student_learns_the_teacher_features_of_the_clean_image(tiny):
    batch = _batch()
    with torch.no_grad():
        terms = tiny.loss_terms(batch, "student")
        teacher_clean = tiny.teacher(batch["clean_image"])
        student = tiny.student(batch["image"], [t.shape[-2:] for t in teacher_clean])
    assert set(terms) == {"feature"}
    assert torch.allclose(terms["feature"], feature_loss(teacher_clean, student))
    corrupted_target = feature_loss(tiny.teacher(batch["image"]), student)
    assert not torch.allclose(terms["feature"], corrupted_target)  # the clean image's features, not the input's
    without_clean = {k: v for k, v in batch.items() if k != "clean_image"}
    assert torch.allclose(tiny.loss_terms(without_clean, "student")["feature"], corrupted_target)  # a good image is its own target
    heavier = _variant(tiny, feature_weight=3.0)
    heavier.set_stage("student")
    assert torch.allclose(heavier.loss(batch), 3.0 * terms["feature"])


def test_two_phase_schedule_trains_the_student_then_the_head(tiny):
    stages = MLFF.recipe_for(MLFFConfig()).stages
    assert [s.name for s in stages] == ["student", "segmentation"]
    assert [(s.epochs, s.batch_size, s.optimizer, s.lr) for s in stages] == [(125, 32, "adam", 1e-3), (500, 32, "adam", 1e-3)]
    model = _variant(tiny)
    student = {id(p) for p in model.student.parameters()}
    seg = {id(p) for p in list(model.fusion.parameters()) + list(model.head.parameters())}
    model.set_stage("student")
    assert {id(p) for p in model.stage_parameters("student")} == student
    model.set_stage("segmentation")
    assert {id(p) for p in model.stage_parameters("segmentation")} == seg
    model.train()
    assert not model.student.training and not model.teacher.backbone.training and model.head.training
    model.set_stage("student")
    model.train()
    assert model.student.training and not model.teacher.backbone.training


class _EpochRecorder(Dataset):
    """Four constant images; records every set_epoch call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.calls.append(epoch)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.zeros(3, 8, 8)}


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def loss(self, batch: dict) -> torch.Tensor:
        return (self.w * batch["image"]).square().mean() + self.w.square().sum()


def test_fit_calls_set_epoch_on_any_dataset_that_has_it():
    data = _EpochRecorder()
    fit(_Linear(), data, epochs=3, batch_size=2, progress=False, seed=0)
    assert data.calls == [0, 1, 2]
    loader_data = _EpochRecorder()
    fit(_Linear(), DataLoader(loader_data, batch_size=2), epochs=2, progress=False)
    assert loader_data.calls == [0, 1]
    with pytest.warns(UserWarning, match="persistent_workers=True"):
        fit(_Linear(), DataLoader(_EpochRecorder(), batch_size=2, num_workers=1, persistent_workers=True), epochs=1, progress=False)


def test_fit_trains_both_stages_on_new_pseudo_anomalies_every_epoch(tiny):
    data = SyntheticDefects("train", 4, SIZE, seed=0)
    model = _variant(tiny)
    seen: list[tuple[str, dict]] = []
    loss = model.loss

    def spy(batch):
        seen.append((model.stage, {k: batch[k].clone() for k in ("image", "clean_image", "mask", "label")}))
        return loss(batch)

    model.loss = spy
    student0 = [p.detach().clone() for p in model.student.parameters()]
    head0 = [p.detach().clone() for p in model.head.parameters()]
    result = fit(model, data, epochs=2, batch_size=4, shuffle=False, seed=0, progress=False, lr=1e-3)
    assert result.stages == [("student", 2), ("segmentation", 2)] and all(math.isfinite(v) for v in result.losses)
    assert all(r.storage == "off" for r in result.feature_cache.values())
    assert [stage for stage, _ in seen] == ["student", "student", "segmentation", "segmentation"]
    masks = [b["mask"] for _, b in seen]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[2], masks[3])  # new anomalies every epoch
    for _, b in seen:
        assert b["image"].shape == b["clean_image"].shape == (4, 3, SIZE, SIZE) and b["mask"].shape == (4, SIZE, SIZE)
        anomalous = b["label"] == 1
        assert torch.equal(anomalous, (b["mask"].flatten(1) > 0).any(1))
    # exactly the pseudo-anomaly dataset's items of each epoch (set_epoch(stage * 100000 + epoch)), clean image included
    expected = PseudoAnomalyDataset(data, PseudoAnomalyConfig(p_normal=0.5), seed=0, clean_image=True)
    for (stage, b), epoch in zip(seen, (0, 1, 100_000, 100_001)):
        expected.set_epoch(epoch)
        items = [expected[i] for i in range(4)]
        for key in ("image", "clean_image", "mask"):
            assert torch.equal(b[key], torch.stack([item[key] for item in items])), (stage, epoch, key)
        assert b["label"].tolist() == [item["label"] for item in items]
        good = torch.stack([data[i]["image"] for i in range(4)])  # no category, so no rotation: the clean image is the good one
        assert torch.allclose(b["clean_image"], good, atol=1e-5)
    assert seen[0][1]["label"].sum() + seen[1][1]["label"].sum() > 0
    # the student changed in its stage and the head in its own (Adam moves every parameter with a gradient)
    assert any(not torch.equal(a, b) for a, b in zip(student0, model.student.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(head0, model.head.parameters()))
    # the segmentation stage alone leaves the student as it is, BatchNorm statistics included (eval mode)
    student1 = [t.detach().clone() for t in model.student.state_dict().values()]
    fit(model, data, epochs=1, batch_size=4, stages=["segmentation"], seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(student1, model.student.state_dict().values()))
    with pytest.raises(ValueError, match="clean_image=True"):
        fit(model, PseudoAnomalyDataset(data), epochs=1, progress=False)
    with pytest.raises(ValueError, match="map-style Dataset of good images"):
        fit(model, DataLoader(data, batch_size=2), epochs=1, progress=False)
    with pytest.raises(ValueError, match="change every epoch"):
        fit(model, PseudoAnomalyDataset(data, clean_image=True), epochs=1, progress=False, feature_cache="memory")


def test_checkpoint_round_trip(tiny, tmp_path):
    model = _variant(tiny, fusion="concat", score_loss="bce")
    save(model, tmp_path / "mlff.pt")
    again = load_model(tmp_path / "mlff.pt").eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    assert type(again) is MLFF and again.config == model.config
    assert torch.equal(again.predict(images).anomaly_map, model.predict(images).anomaly_map)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_train_eval_predict_on_the_demo_data(tmp_path, capsys):
    root = tmp_path / "data"
    write_synthetic_dataset(root, "syn", num_train=4, num_test=4, input_size=SIZE, seed=2)
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "mlff", "--data", str(root), "--category", "syn", "--out", str(out), "--epochs", "1",
                   "--batch-size", "4", "--no-progress", "--input-size", str(SIZE), "--no-pretrained", "--fpn-channels", "8",
                   "--seg-channels", "16", "--aspp-rates", "2", "4", "--top-k", "10"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "trained epochs 1-2" in printed.out  # one epoch of each stage
    assert set(read(out / "last.pt")["training"]["history"]) == {"student", "segmentation"}
    assert "image AUROC" in printed.out and "pixel AUROC" in printed.out and "AUPRO" in printed.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 4
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert load_model(out / "last.pt").config.aspp_rates == (2, 4)
    rc = cli.main(["eval", "--data", str(root), "--category", "syn", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "ev"), "--no-progress"])
    assert rc == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert again[key] == pytest.approx(metrics[key])
    rc = cli.main(["predict", "--checkpoint", str(out), "--input", str(root / "syn" / "test" / "good"), "--out", str(tmp_path / "pred"), "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "pred" / "scores.csv").open()))
    assert len(rows) == len(list((root / "syn" / "test" / "good").glob("*.png"))) and all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
    # a pseudo-anomaly estimate of a model trained on that generator says it is optimistic
    rc = cli.main(["eval", "--data", str(root), "--category", "syn", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "pe"),
                   "--no-progress", "--pseudo-anomalies"])
    assert rc == 0
    warnings = json.loads((tmp_path / "pe" / "metrics.json").read_text())["warnings"]
    assert any("trained on pseudo anomalies from this generator (stages student, segmentation)" in w for w in warnings), warnings
