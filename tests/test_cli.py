"""Command line: --model, generated config flags, train / eval / predict / demo / models end to end, resume, bad inputs."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from PIL import Image

from msflow_fast import cli
from msflow_fast.cli import commands
from msflow_fast.engine import write_synthetic_dataset
from msflow_fast.models import read as load_checkpoint
from msflow_fast.models import registry
from msflow_fast.models.base import ModelConfig, normalize_input_size
from test_engine_protocol import TinyFlowModel


@dataclasses.dataclass(frozen=True)
class TinyConfig(ModelConfig):
    """A config with every kind of field the flag generator handles.

    Attributes:
        input_size: image side (pixels).
        backbone: a name.
        pretrained: a bool.
        parallel_blocks: a tuple.
        clamp_alpha: a float.
        top_k: fraction of pixels in the score.
        pool_type: a Literal.
        seed: an optional int.
        channels: image channels.
    """

    input_size: int = 32
    backbone: str = "tiny"
    pretrained: bool = True
    parallel_blocks: tuple[int, ...] = (2, 5, 8)
    clamp_alpha: float = 1.9
    top_k: float = 0.03
    pool_type: Literal["avg", "max"] = "avg"
    seed: int | None = None
    channels: int = 3

    def __post_init__(self):
        if isinstance(self.input_size, int) and self.input_size % 4:
            raise ValueError(f"input_size: expected a multiple of 4, got {self.input_size}")
        normalize_input_size(self)


@registry.register("tiny_cli", summary="test stand-in for the command line")
class TinyCLIModel(TinyFlowModel):
    config_class = TinyConfig
    demo_config = {"input_size": 32}
    demo_training = {"epochs": 2, "lr": 0.05, "batch_size": 4}


@pytest.fixture
def stand_in(monkeypatch):
    """Commands without --model build the tiny stand-in (the engine and CLI know models only by name)."""
    monkeypatch.setattr(commands, "DEFAULT_MODEL", "tiny_cli")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(root, "syn", num_train=8, num_test=6, input_size=32, seed=0)
    return root


def test_config_flags_are_generated_from_the_dataclass(stand_in):
    parser = cli.build_parser("tiny_cli")
    args = parser.parse_args(
        ["train", "--data", "x", "--input-size", "64", "--parallel-blocks", "1", "2", "3", "--no-pretrained",
         "--pool-type", "max", "--seed", "5", "--clamp-alpha", "2.5"]
    )
    over = cli.config_overrides(args, TinyConfig)
    # --seed is the training seed; the config field gets a prefixed flag
    assert over == {"input_size": 64, "parallel_blocks": (1, 2, 3), "pretrained": False, "pool_type": "max", "clamp_alpha": 2.5}
    args = parser.parse_args(["train", "--data", "x", "--model-seed", "none"])
    assert cli.config_from_args(args, TinyConfig).seed is None
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "x", "--pool-type", "median"])


def test_help_lists_commands_and_config_fields(stand_in, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for name in ("train", "eval", "predict", "demo"):
        assert name in text
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--data", "--category", "--out", "--epochs", "--batch-size", "--device", "--checkpoint", "--input-size", "--clamp-alpha", "--parallel-blocks", "--top-k", "--resume", "--amp"):
        assert flag in text


def test_train_eval_predict_end_to_end(stand_in, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--data", str(dataset), "--category", "syn", "--out", str(out), "--epochs", "2", "--batch-size", "4", "--lr", "0.05", "--no-progress", "--heatmaps"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "image AUROC" in text and "AUPRO" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["num_images"] == 6
    state = load_checkpoint(out / "last.pt")
    assert state["training"]["epoch"] == 1 and state["config"]["input_size"] == [32, 32] and state["model"] == "tiny_cli"
    assert len(list((out / "heatmaps").glob("*.png"))) == 6
    assert metrics["maps"] == {"pixel_auroc": "anomaly_map", "aupro": "twin"}

    rc = cli.main(["eval", "--data", str(dataset), "--category", "syn", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "ev"), "--no-progress"])
    assert rc == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert again["aupro"] == pytest.approx(metrics["aupro"])

    images = dataset / "syn" / "test" / "good"
    rc = cli.main(["predict", "--checkpoint", str(out), "--input", str(images), "--out", str(tmp_path / "pred"), "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "pred" / "scores.csv").open()))
    assert len(rows) == len(list(images.iterdir()))
    png = Image.open(rows[0]["heatmap"])
    assert png.size[1] == 32 and png.size[0] > 64 and png.mode == "RGB"

    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    for folder, message in ((tmp_path / "empty", "holds no image file"), (tmp_path / "absent", "folder not found")):
        rc = cli.main(["predict", "--checkpoint", str(out), "--input", str(folder), "--out", str(tmp_path / "p2"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and str(folder) in err, err
    assert not (tmp_path / "p2" / "scores.csv").exists()


def test_train_resume_continues(stand_in, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", str(dataset), "--category", "syn", "--out", str(out), "--batch-size", "4", "--no-progress", "--no-eval"]
    assert cli.main(base + ["--epochs", "2"]) == 0
    assert cli.main(base + ["--epochs", "3", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "trained epochs 3-3" in text
    assert load_checkpoint(out / "last.pt")["training"]["epoch"] == 2


def test_errors_name_the_problem(stand_in, dataset, tmp_path, capsys):
    rc = cli.main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "missing" in capsys.readouterr().err
    rc = cli.main(["eval", "--data", str(dataset), "--category", "syn", "--checkpoint", str(tmp_path / "nope.pt")])
    assert rc == 2 and "nope.pt" in capsys.readouterr().err
    rc = cli.main(["train", "--data", str(dataset), "--category", "syn", "--input-size", "30", "--out", str(tmp_path / "o")])
    assert rc == 2 and "input_size" in capsys.readouterr().err
    for device, message in (("tpu", "is not a device name; use cpu, cuda"), ("cuda:99", "--device cuda:99")):
        rc = cli.main(["demo", "--out", str(tmp_path / "demo"), "--device", device, "--no-progress"])
        assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists(), "a bad --device must fail before anything is written"


def test_corrupt_training_image_is_named(stand_in, tmp_path, capsys):
    root = tmp_path / "data"
    base = write_synthetic_dataset(root, "syn", num_train=4, num_test=4, input_size=32)
    bad = base / "train" / "good" / "002.png"
    bad.write_bytes(bad.read_bytes()[:60])
    rc = cli.main(["train", "--data", str(root), "--category", "syn", "--out", str(tmp_path / "o"), "--epochs", "1", "--no-progress", "--no-eval"])
    assert rc == 2 and "002.png" in capsys.readouterr().err


def _count_torch_loads(monkeypatch):
    import torch

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(Path(f).name) or real_load(f, *a, **k))
    return loads


def test_train_resume_reads_last_pt_once(stand_in, dataset, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    base = ["train", "--data", str(dataset), "--category", "syn", "--out", str(out), "--batch-size", "4", "--no-progress", "--no-eval"]
    assert cli.main(base + ["--epochs", "1"]) == 0
    loads = _count_torch_loads(monkeypatch)
    assert cli.main(base + ["--epochs", "2", "--resume"]) == 0
    assert loads == ["last.pt"]
    copy = tmp_path / "copy.pt"
    copy.write_bytes((out / "last.pt").read_bytes())
    loads.clear()
    assert cli.main(base + ["--epochs", "3", "--checkpoint", str(copy)]) == 0
    assert loads == ["copy.pt"]
    assert "trained epochs 2-2" in capsys.readouterr().out
    monkeypatch.undo()
    assert load_checkpoint(out / "last.pt")["training"]["epoch"] == 2


def test_console_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "msflow_fast.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "demo" in proc.stdout


# ---------------------------------------------------------------------------------------------
# the real MSFlow with a small random-initialised timm backbone (no network needed)
# ---------------------------------------------------------------------------------------------

_SMALL = ["--input-size", "64", "--backbone", "resnet18", "--no-pretrained", "--parallel-blocks", "1", "1", "1"]


def test_real_msflow_train_eval_predict(tmp_path, capsys):
    root = tmp_path / "data"
    write_synthetic_dataset(root, "syn", num_train=4, num_test=4, input_size=64, seed=2)
    out = tmp_path / "run"
    rc = cli.main(["train", "--data", str(root), "--category", "syn", "--out", str(out), "--epochs", "2", "--batch-size", "2", "--lr", "1e-3", "--no-progress", *_SMALL])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    state = load_checkpoint(out / "last.pt")
    assert state["config"]["backbone"] == "resnet18" and state["config"]["input_size"] == [64, 64]
    # a random-initialised timm backbone cannot be rebuilt from the config: its weights are stored
    assert state["model"] == "msflow" and state["extractors"]["extractor"]["source"] == "random"
    assert any(k.startswith("extractor.backbone.") for k in state["weights"])
    rc = cli.main(["eval", "--data", str(root), "--category", "syn", "--checkpoint", str(out), "--out", str(tmp_path / "ev"), "--no-progress"])
    assert rc == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"], abs=1e-6)
    rc = cli.main(["predict", "--checkpoint", str(out / "last.pt"), "--input", str(root / "syn" / "test" / "good"), "--out", str(tmp_path / "pred"), "--no-progress"])
    assert rc == 0
    assert len(list((tmp_path / "pred" / "heatmaps").glob("*.png"))) == 2


def test_real_msflow_demo_console_script(tmp_path):
    exe = Path(sys.executable).with_name("msflow-fast")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "msflow_fast.cli"]
    proc = subprocess.run(
        cmd + ["demo", "--out", str(tmp_path), "--epochs", "1", "--num-train", "4", "--num-test", "4", "--batch-size", "4", "--no-progress", "--input-size", "64"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "image AUROC" in proc.stdout and "pixel AUROC" in proc.stdout and "AUPRO" in proc.stdout
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "last.pt").is_file()
    assert len(list((tmp_path / "run" / "heatmaps").glob("*.png"))) == 4


def test_models_lists_the_registered_models(capsys):
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    msflow = [line for line in lines if line.startswith("msflow ")]
    assert len(msflow) == 1 and "MSFlow" in msflow[0] and "TNNLS 2024" in msflow[0]
    assert len(lines) == len(registry.available())
    assert cli.main(["models", "--verbose"]) == 0
    assert "msflow_fast.models.msflow.model.MSFlow" in capsys.readouterr().out


def test_model_flag_picks_the_model_and_its_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", "tiny_cli", "--help"])
    text = capsys.readouterr().out
    assert "TinyConfig fields" in text and "--pool-type" in text and "--c-cond" not in text
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "MSFlowConfig fields" in text and "--c-cond" in text and "(default: 1e-4" not in text
    assert "learning rate (default: 0.0001, adam)" in text and "max gradient norm, or 'none' (default: 2.0)" in text
    assert cli.main(["train", "--model", "msflw", "--data", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'msflw'" in err and "Did you mean 'msflow'" in err
    with pytest.raises(SystemExit):  # not a command: the benchmarks have their own entry point (python -m benchmarks.run)
        cli.main(["bench"])


def test_training_flags_are_validated(stand_in, dataset, tmp_path, capsys):
    base = ["train", "--data", str(dataset), "--category", "syn", "--out", str(tmp_path / "o"), "--no-progress"]
    for flags, message in ((["--grad-clip", "0"], "positive max norm"), (["--grad-clip", "-2"], "positive max norm"),
                           (["--lr", "0"], "finite number > 0"), (["--epochs", "0"], "positive int"), (["--lr", "nan"], "finite number > 0"),
                           (["--weight-decay", "-1"], "finite number >= 0")):
        with pytest.raises(SystemExit):
            cli.main(base + flags)
        assert message in capsys.readouterr().err, flags
    assert cli.main(base + ["--epochs", "1", "--grad-clip", "none", "--no-eval"]) == 0


def test_demo_runs_any_registered_model(stand_in, tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--num-train", "4", "--num-test", "4", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "trained 2 epochs of tiny_cli" in text and "image AUROC" in text
    assert load_checkpoint(tmp_path / "run")["model"] == "tiny_cli"
