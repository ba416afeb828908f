"""Golden test: a fixed-seed MSFlow checkpoint gives the same bits it gave when it was written.

``tests/golden/msflow_v2_checkpoint.pt`` and its outputs were written by
``tests/golden/make_msflow_golden.py`` before the model zoo redesign (format version 2). Loaded
with today's code, the same weights must give bit-identical latents, log-dets, loss, maps and
scores on the ``reference`` and ``cpp`` backends, for the training forward and for ``predict``.
Bits are compared where the machine matches the one that wrote the fixture (torch version and
CPU capability; one thread); elsewhere float32 rounding may differ, so the check is a tight
tolerance instead.

The fixture was written with the backbone in the standard memory layout; channels-last (the
extractor's default since) changes float32 rounding only, so the golden model is switched back
to the standard layout, and a separate check bounds what the layout changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))

from golden_backbone import GoldenBackbone  # noqa: E402
from make_msflow_golden import CHECKPOINT, OUTPUTS, outputs  # noqa: E402


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load_golden_model():
    from msflow_fast import load_model

    model = load_model(CHECKPOINT, backbone=GoldenBackbone())
    model.extractor.set_channels_last(False)
    return model


def test_golden_checkpoint_gives_the_same_bits(one_thread):
    from msflow_fast import ops

    if "cpp" not in ops.available_backends("cpu"):
        pytest.fail("the golden test needs the C++ extension (msflow_fast._C); build it with scripts/install.sh")
    expected = torch.load(OUTPUTS, weights_only=True)
    same_machine = (
        expected["meta/torch"] == str(torch.__version__)
        and expected["meta/cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    )
    actual = outputs(_load_golden_model(), expected["images"])
    tensors = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor) and k != "images"}
    assert sorted(actual) == sorted(tensors)
    mismatched = []
    for key, want in tensors.items():
        got = actual[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        if same_machine:
            if not torch.equal(got, want):
                mismatched.append(f"{key}: max |diff| {(got.double() - want.double()).abs().max().item():.3e}")
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")
    assert not mismatched, "not bit-identical:\n" + "\n".join(mismatched)


def test_channels_last_backbone_changes_only_rounding(one_thread):
    expected = torch.load(OUTPUTS, weights_only=True)
    model = _load_golden_model()
    model.extractor.set_channels_last(True)
    actual = outputs(model, expected["images"])
    for key, got in actual.items():
        want = expected[key]
        scale = max(1.0, want.abs().max().item())
        assert (got.double() - want.double()).abs().max().item() <= 1e-5 * scale, key


def test_golden_model_keeps_its_bits_through_every_checkpoint_format(one_thread, tmp_path):
    """Format 2 -> format 3 (save / load_model) and the official format (save_official / load_official)
    hold the same weights: the reloaded models give the same bits as the golden one."""
    from msflow_fast import MSFlow, load_model, save
    from msflow_fast.models.msflow import load_official, save_official

    golden = _load_golden_model()
    images = torch.load(OUTPUTS, weights_only=True)["images"][:2]
    want = outputs(golden, images)
    save(golden, tmp_path / "v3.pt")
    again = load_model(tmp_path / "v3.pt", backbone=GoldenBackbone())
    save_official(golden, tmp_path / "best_det.pt", epoch=3)
    official = load_official(MSFlow(golden.config, backbone=GoldenBackbone()), tmp_path / "best_det.pt")
    official.extractor.backbone.load_state_dict(golden.extractor.backbone.state_dict())  # the official file holds no backbone
    for name, model in (("format 3", again), ("official", official)):
        model.extractor.set_channels_last(False)  # the golden model's layout
        got = outputs(model, images)
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        assert not bad, f"{name}: not bit-identical: {bad}"
