"""Faults and bad inputs on the CLI and API: kills, locks, stale files, corrupt files, unusual images,
and messages that say the true thing. Items not covered here are tested beside their code (the
crafted-pickle test in test_model.py, image formats in test_engine_data.py, ...)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reliability_worker as worker
from msflow_fast import cli
from msflow_fast.engine import SyntheticDefects, evaluate, fit, predict_folder, write_synthetic_dataset
from msflow_fast.engine.run_folder import LOCK_NAME, RunLock, fresh_folder
from msflow_fast.models import read, save
from test_cli import TinyCLIModel  # noqa: F401  (registers tiny_cli)
from test_engine_protocol import TinyFlowModel

TESTS = Path(__file__).resolve().parent
WORKER = [sys.executable, str(TESTS / "reliability_worker.py")]


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(WORKER + [str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until(proc: subprocess.Popen, done, what: str, timeout: float = 60.0) -> None:
    """Poll ``done()`` (a file it reads may be missing or half-written: retried) until it is true;
    fails if the worker exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the worker exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if done():
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"{what} after {timeout} s")


def _wait_for_epoch(out: Path, epoch: int, proc: subprocess.Popen) -> None:
    """Until ``out/last.pt`` records ``epoch`` (0-based) as finished."""
    _wait_until(proc, lambda: read(out)["training"]["epoch"] >= epoch, f"no checkpoint of epoch {epoch + 1}")


def _wait_for_lock(out: Path, proc: subprocess.Popen) -> None:
    """Until ``proc`` holds the run folder's lock (its pid in the lock file)."""
    _wait_until(proc, lambda: json.loads((out / LOCK_NAME).read_text()).get("pid") == proc.pid, f"the worker took no lock of {out}")


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith(".tmp") or ".partial." in p.name)


def _uninterrupted(tmp_path: Path) -> dict[str, torch.Tensor]:
    model = worker.initial_model()
    fit(model, worker.SlowImages(), out_dir=tmp_path / "reference", **worker.FIT)
    return model.state_dict()


# ------------------------------------------------------------------------------------- kills and resume


def test_resume_after_sigkill_mid_epoch_gives_the_same_weights_bit_for_bit(tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_epoch(out, 1, proc)
    time.sleep(0.05)  # into epoch 3
    _kill(proc)
    assert read(out)["training"]["epoch"] in (1, 2)
    resumed = TinyFlowModel(input_size=16)
    result = fit(resumed, worker.SlowImages(), out_dir=out, resume=True, **worker.FIT)
    assert result.start_epoch in (2, 3) and len(result.losses) == worker.EPOCHS - result.start_epoch
    for key, value in _uninterrupted(tmp_path).items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_killed_at_random_points_a_loadable_checkpoint_always_remains(tmp_path):
    """Fault injection: SIGKILL at random moments (checkpoint writes included), five times; after each
    kill the newest last.pt loads, and the next run leaves no temporary file and no lock behind."""
    out = tmp_path / "run"
    rng = random.Random(1207)  # kills at 1.41, 0.25, 1.60, 1.66 and 0.36 epochs into the runs: three get through one
    proc = _start(out, "", "0.01")
    _wait_for_epoch(out, 0, proc)
    _kill(proc)
    epochs = [read(out)["training"]["epoch"]]
    for _ in range(5):
        proc = _start(out, "resume", "0.1")  # an epoch: 8 images of 0.1 s
        _wait_for_lock(out, proc)  # past the interpreter start (it trains from here), however slow the machine is
        time.sleep(rng.uniform(0.2, 1.9) * worker.IMAGES * 0.1)  # then somewhere in an epoch or a save
        _kill(proc)
        state = read(out)  # never a half-written or missing checkpoint
        assert 0 <= state["training"]["epoch"] < worker.EPOCHS
        assert all(torch.isfinite(v).all() for v in state["weights"].values())
        epochs.append(state["training"]["epoch"])
    assert epochs[-1] > epochs[0], f"the killed runs never got through an epoch (epochs after each kill: {epochs})"
    assert (out / LOCK_NAME).exists()  # a killed process cannot remove its lock: the next run takes it over
    proc = _start(out, "resume", "0")
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    assert _temporaries(out) == [] and not (out / LOCK_NAME).exists()
    assert read(out)["training"]["epoch"] == worker.EPOCHS - 1


def test_leftover_temporary_files_of_a_killed_writer_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "run"
    fit(TinyFlowModel(input_size=16), worker.SlowImages(), out_dir=out, epochs=1, progress=False)
    for name in (".last.pt.k3j_2x.tmp", ".metrics.json.9z8y.tmp"):
        (out / name).write_bytes(b"half a file")
    (out / "heatmaps").mkdir()
    (out / "heatmaps" / ".x.png.abc.tmp").write_bytes(b"")
    (out / ".heatmaps.partial.zz").mkdir()
    fit(TinyFlowModel(input_size=16), worker.SlowImages(), out_dir=out, epochs=2, resume=True, progress=False)
    assert _temporaries(out) == []


def test_sigterm_stops_like_ctrl_c(tmp_path):
    """docker stop / Slurm / Kubernetes send SIGTERM: the CLI stops cleanly, says where the last epoch is, exit 143."""
    data = tmp_path / "data"
    write_synthetic_dataset(data, "syn", num_train=8, num_test=4, input_size=32, seed=0)
    out = tmp_path / "run"
    script = (
        "import sys, time; sys.path.insert(0, %r); import test_cli; from msflow_fast import cli\n"
        "import msflow_fast.engine.data.folders as f\n"
        "real = f.load_image\n"
        "def slow(*a, **k):\n    time.sleep(0.05); return real(*a, **k)\n"
        "f.load_image = slow\n"
        "sys.exit(cli.main(%r))\n"
    ) % (str(TESTS), ["train", "--model", "tiny_cli", "--data", str(data), "--category", "syn", "--out", str(out),
                      "--epochs", "50", "--batch-size", "4", "--no-progress", "--no-eval"])
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(out, 0, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM) (the last finished epoch is in" in err and "--resume" in err
    assert _temporaries(out) == [] and not (out / LOCK_NAME).exists()
    assert read(out)["training"]["epoch"] >= 0


# ------------------------------------------------------------------------------------- one writer per folder


def test_a_second_training_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "", "0.05")
    try:
        _wait_for_epoch(out, 0, proc)
        with pytest.raises(RuntimeError, match=rf"{out} is in use by another training \(pid {proc.pid} on .*wait for it"):
            fit(TinyFlowModel(input_size=16), worker.SlowImages(), out_dir=out, resume=True, epochs=1, progress=False)
    finally:
        _kill(proc)
    # its process is gone: the lock is stale and taken over
    fit(TinyFlowModel(input_size=16), worker.SlowImages(), out_dir=out, resume=True, **worker.FIT)
    assert not (out / LOCK_NAME).exists()


def test_lock_is_reentrant_and_names_a_live_owner(tmp_path):
    with RunLock(tmp_path):
        with RunLock(tmp_path):  # the CLI holds it around fit, which takes it again
            pass
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(RuntimeError, match="pid 1 on elsewhere.*delete"):
        with RunLock(tmp_path):
            pass


def test_a_new_run_never_overwrites_a_finished_one_silently(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic_dataset(data, "syn", num_train=4, num_test=4, input_size=32, seed=0)
    out = tmp_path / "run"
    base = ["train", "--model", "tiny_cli", "--data", str(data), "--category", "syn", "--out", str(out), "--epochs", "1", "--no-progress"]
    assert cli.main(base) == 0
    first = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert cli.main(base) == 2
    err = capsys.readouterr().err
    assert "already holds a run (last.pt, metrics.json, scores.csv)" in err and "--resume" in err and "--overwrite" in err
    assert json.loads((out / "metrics.json").read_text()) == first  # untouched
    # --overwrite starts over: the earlier run's files go first (no stale metrics beside a new model)
    assert cli.main(base + ["--overwrite", "--no-eval"]) == 0
    assert (out / "last.pt").exists() and not (out / "metrics.json").exists() and not (out / "scores.csv").exists()
    with pytest.raises(ValueError, match="already holds a run"):
        fit(TinyFlowModel(input_size=32), [torch.rand(2, 3, 32, 32)], epochs=1, out_dir=out, progress=False)


# ------------------------------------------------------------------------------------- checks before epoch 1


def test_bad_test_files_and_unwritable_out_are_reported_before_training(tmp_path, capsys):
    data = tmp_path / "data"
    base = write_synthetic_dataset(data, "syn", num_train=4, num_test=6, input_size=32, seed=0)
    bad_image = next((base / "test" / "good").glob("*.png"))
    bad_image.write_bytes(bad_image.read_bytes()[:80])
    mask = next((base / "ground_truth").rglob("*.png"))
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(mask)
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny_cli", "--data", str(data), "--category", "syn", "--out", str(out), "--epochs", "1", "--no-progress"]
    started = time.monotonic()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "2 bad file(s)" in err and bad_image.name in err and f"{mask.name} is 32x16 but its image is 32x32" in err
    assert not (out / "last.pt").exists(), "nothing may be trained before the files are checked"
    assert time.monotonic() - started < 30
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    good = write_synthetic_dataset(tmp_path / "good", "syn", num_train=4, num_test=4, input_size=32, seed=0).parent
    assert cli.main(["train", "--model", "tiny_cli", "--data", str(good), "--category", "syn", "--out", str(blocker / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write to {blocker / 'run'}" in err  # one line, no traceback


# ------------------------------------------------------------------------------------- diverged, saturated, results


class _Overshooting(TinyFlowModel):
    """Loss (mu - 1)^2, finite for any weights: a huge learning rate overshoots and the loss explodes."""

    def loss(self, batch):
        return ((self.mu - 1.0) ** 2).sum() + 0.0 * batch["image"].mean()


def test_a_diverged_but_finite_run_is_warned_about(tmp_path, capsys):
    images = [torch.rand(4, 3, 16, 16)]
    with pytest.warns(RuntimeWarning, match=r"training diverged in stage 'train': the epoch loss rose from 3 \(epoch 1\)"):
        result = fit(_Overshooting(input_size=16), images, epochs=3, lr=1e4, grad_clip=False, progress=False)
    assert len(result.warnings) == 1 and "Lower the learning rate" in result.warnings[0]
    quiet = fit(TinyFlowModel(input_size=16), worker.SlowImages(), epochs=3, lr=0.02, progress=False)
    assert quiet.warnings == []


class _Constant(TinyFlowModel):
    def predict(self, images):
        pred = super().predict(images)
        return pred._replace(score=torch.ones_like(pred.score))


def test_identical_scores_are_warned_about():
    data = SyntheticDefects("test", 6, 16, seed=0)
    result = evaluate(_Constant(input_size=16), data, progress=False)
    assert any("every image got the same score (1)" in w and "score=log_space" in w for w in result["warnings"])
    assert evaluate(TinyFlowModel(input_size=16), data, progress=False)["warnings"] == []


def test_heat_maps_are_a_fresh_folder_written_whole_or_not_at_all(tmp_path, monkeypatch):
    model = TinyFlowModel(input_size=16)
    evaluate(model, SyntheticDefects("test", 6, 16, seed=0), out_dir=tmp_path, heatmaps=True, progress=False)
    first = sorted(p.name for p in (tmp_path / "heatmaps").iterdir())
    assert len(first) == 6
    import importlib

    evaluate_module = importlib.import_module("msflow_fast.engine.evaluate")
    real, calls = evaluate_module.save_overlay, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "save_overlay", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, SyntheticDefects("test", 4, 16, seed=5), out_dir=tmp_path, heatmaps=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "heatmaps").iterdir()) == first  # the old folder, whole
    monkeypatch.undo()
    evaluate(model, SyntheticDefects("test", 2, 16, seed=5), out_dir=tmp_path, heatmaps=True, progress=False)
    assert len(list((tmp_path / "heatmaps").iterdir())) == 2  # no mix with the earlier run's overlays
    assert _temporaries(tmp_path) == []
    with fresh_folder(tmp_path / "x") as folder:
        (folder / "a").write_text("1")
    assert (tmp_path / "x" / "a").read_text() == "1"


def test_result_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        model = TinyFlowModel(input_size=16)
        fit(model, worker.SlowImages(), epochs=1, out_dir=tmp_path, progress=False)
        evaluate(model, SyntheticDefects("test", 4, 16, seed=0), out_dir=tmp_path, heatmaps=True, progress=False)
    finally:
        os.umask(old)
    for name in ("last.pt", "metrics.json", "scores.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert (tmp_path / "heatmaps").stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (tmp_path / "heatmaps").iterdir())


# ------------------------------------------------------------------------------------- checkpoints


def test_flipped_bytes_inside_a_checkpoint_tensor_are_detected(tmp_path):
    path = tmp_path / "model.pt"
    save(TinyFlowModel(input_size=16), path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        entry = next(i for i in archive.infolist() if "/data/" in i.filename)
    local = entry.header_offset  # the local header's name and extra lengths (torch pads the extra field)
    start = local + 30 + int.from_bytes(data[local + 26 : local + 28], "little") + int.from_bytes(data[local + 28 : local + 30], "little")
    data[start + 2] ^= 0x5A  # a bit flip inside the tensor's bytes: torch.load alone would not notice
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # loads (wrong weights) without a word
    with pytest.raises(ValueError, match=r"model\.pt.*fails its CRC check"):
        read(path)


def test_a_full_disk_is_a_one_line_os_error_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = TinyFlowModel(input_size=16)
    path = save(model, tmp_path / "last.pt")
    before = path.read_bytes()
    real = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/3: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write checkpoint .*last\.pt: the disk is full .*file write failed.*unchanged"):
        save(model, path)
    assert path.read_bytes() == before and _temporaries(tmp_path) == []


def test_config_errors_from_a_checkpoint_name_it(tmp_path):
    path = tmp_path / "model.pt"
    save(TinyFlowModel(input_size=16), path)
    state = read(path)
    state["config"]["input_size"] = [30, 30]
    torch.save({k: v for k, v in state.items() if k != "path"}, tmp_path / "bad.pt")
    from msflow_fast import load_model

    with pytest.raises(ValueError, match=r"bad\.pt.*has a config this version cannot use: input_size"):
        load_model(tmp_path / "bad.pt")


# ------------------------------------------------------------------------------------- predict


def test_predict_skips_and_reports_unreadable_files_when_asked(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    model = TinyFlowModel(input_size=16)
    with pytest.raises(ValueError, match=r"(?s)1 of 4 images cannot be read .*--skip-unreadable.*broken\.png"):
        predict_folder(model, folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "scores.csv").exists()
    results = predict_folder(model, folder, tmp_path / "out", skip_unreadable=True, progress=False)
    assert [r["error"] is None for r in results] == [True, True, True, False] and "broken.png" in results[3]["error"]
    rows = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,score,heatmap,error" and "broken.png" in rows[-1] and len(rows) == 5
    ckpt = save(model, tmp_path / "model.pt")
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--input", str(folder), "--out", str(tmp_path / "p"), "--skip-unreadable", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "skipped: cannot read image" in err and "broken.png" in err


def test_heat_map_names_never_collide(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(a / "x.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(b / "x.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(b / "x_2.png")
    results = predict_folder(TinyFlowModel(input_size=16), [a / "x.png", b / "x.png", b / "x_2.png"], tmp_path / "out", progress=False)
    names = [Path(r["heatmap"]).name for r in results]
    assert len(set(names)) == 3 and names[0] == "x.png"


# ------------------------------------------------------------------------------------- models: bad inputs


def test_model_inputs_and_backbones_get_clear_errors():
    from msflow_fast import MSFlow

    small = dict(backbone="resnet18", pretrained=False, parallel_blocks=(1, 1, 1))
    model = MSFlow(input_size=64, **small)
    for dtype in (torch.float16, torch.float64):
        with pytest.raises(TypeError, match=f"images are {dtype} but the model's weights are torch.float32"):
            model.predict(torch.randn(1, 3, 64, 64, dtype=dtype))
    with pytest.raises(ValueError, match=r"input_size \(16, 16\) does not suit this backbone: images must be at least 32x32"):
        MSFlow(input_size=16, **small)
    with pytest.raises(ValueError, match=r"out_indices \[7\].*stage numbers"):
        MSFlow(input_size=64, backbone="resnet18", pretrained=False, out_indices=(7,), parallel_blocks=(1,))
    with pytest.raises(ValueError, match="timm has no model 'resnet_nope'"):
        MSFlow(input_size=64, backbone="resnet_nope", pretrained=False)
    vit = MSFlow(input_size=224, backbone="vit_tiny_patch16_224", pretrained=False, parallel_blocks=(1, 1, 1))
    assert vit.extractor.strides == [16, 16, 16] and vit.predict(torch.randn(1, 3, 224, 224)).score.shape == (1,)


def test_no_network_for_pretrained_weights_says_what_to_do(monkeypatch):
    import timm

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise ConnectionError("Max retries exceeded with url: /timm/wide_resnet50_2.tv_in1k")
        raise AssertionError("only the pretrained build is tried here")

    monkeypatch.setattr(timm, "create_model", offline)
    from msflow_fast import MSFlow

    with pytest.raises(RuntimeError, match=r"could not load the pretrained weights of 'wide_resnet50_2\.tv_in1k'.*--no-pretrained"):
        MSFlow()


# ------------------------------------------------------------------------------------- messages


def test_messages_say_the_true_thing(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic_dataset(data, "syn", num_train=4, num_test=4, input_size=32, seed=0)
    out = tmp_path / "run"
    base = ["train", "--model", "tiny_cli", "--data", str(data), "--category", "syn", "--out", str(out), "--no-progress", "--no-eval"]
    # --resume with no last.pt starts a new run, and says so
    assert cli.main(base + ["--epochs", "2", "--resume"]) == 0
    captured = capsys.readouterr()
    assert "--resume found no" in captured.err and "starting a new run" in captured.err
    # --resume of a finished run trains nothing, and says so (not "epochs 3-2")
    assert cli.main(base + ["--epochs", "2", "--resume"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    # a boolean flag given a value: the hint, not argparse's bare "unrecognized arguments"
    assert cli.main(base + ["--pretrained", "false"]) == 2
    assert "--pretrained takes no value: write --pretrained or --no-pretrained" in capsys.readouterr().err
    # a first-epoch NaN with --out set: no checkpoint yet, and the message says when the first comes
    with pytest.raises(RuntimeError, match=r"No checkpoint was written yet \(the first, .*last\.pt, is written at the end of the first epoch\)"):
        fit(_NaN(input_size=16), worker.SlowImages(), epochs=2, out_dir=tmp_path / "nan", progress=False)


class _NaN(TinyFlowModel):
    def loss(self, batch):
        return super().loss(batch) * float("nan")


def test_ctrl_c_before_any_checkpoint_does_not_claim_one(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    write_synthetic_dataset(data, "syn", num_train=4, num_test=4, input_size=32, seed=0)
    import msflow_fast.engine.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_run_epoch", interrupted)
    argv = ["train", "--model", "tiny_cli", "--data", str(data), "--category", "syn", "--out", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(argv) == 130
    assert "interrupted (no checkpoint was written)" in capsys.readouterr().err
