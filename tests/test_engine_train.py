"""fit(): recipes and stages, schedule, input kinds, checkpoints, exact resume, non-finite values, AMP, DDP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from msflow_fast.engine import EpochSchedule, SyntheticDefects, fit
from msflow_fast.models import read as load_checkpoint
from msflow_fast.models.base import TrainRecipe, TrainStage
from msflow_fast.models.msflow import OFFICIAL_RECIPE
from test_engine_protocol import TinyFlowModel


class _Images(Dataset):
    def __init__(self, n=12, size=16, fail_at=None):
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(n, 3, size, size, generator=g) * 2 + 0.5
        self.fail_at, self.calls = fail_at, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return {"image": self.x[i]}


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_official_schedule_matches_torch_schedulers():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-4)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, end_factor=1.0, total_iters=12)
    decay = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[70, 90], gamma=0.33)
    sched = EpochSchedule.for_stage(OFFICIAL_RECIPE.stages[0])
    assert sched.warmup_epochs == 12 and sched.milestones == (70, 90)
    for epoch in range(100):
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * sched(epoch), rel=1e-9)
        opt.step()
        warm.step()
        decay.step()
    scaled = EpochSchedule.for_stage(OFFICIAL_RECIPE.stages[0].replace(epochs=10))
    assert scaled.warmup_epochs == 1 and scaled.milestones == (7, 9)
    assert scaled(0) == pytest.approx(0.1) and scaled(1) == 1.0 and scaled(9) == pytest.approx(0.33**2)


@pytest.mark.parametrize("kind", ["dataset", "loader", "tensors", "dicts"])
def test_fit_accepts_input_kinds_and_lowers_loss(kind):
    ds = _Images()
    data = {
        "dataset": ds,
        "loader": DataLoader(ds, batch_size=4),
        "tensors": [ds.x[i : i + 4] for i in range(0, 12, 4)],
        "dicts": [{"image": ds.x[i : i + 4]} for i in range(0, 12, 4)],
    }[kind]
    model = TinyFlowModel(input_size=16)
    result = fit(model, data, epochs=8, lr=0.05, batch_size=4, progress=False, warmup_epochs=0)
    assert len(result.losses) == 8 and result.losses[-1] < result.losses[0]


def test_fit_rejects_bad_arguments():
    model = TinyFlowModel(input_size=16)
    with pytest.raises(TypeError, match="loss"):
        fit(torch.nn.Linear(2, 2), [torch.zeros(1, 3, 4, 4)], epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        fit(model, [torch.zeros(1, 3, 16, 16)], epochs=0)
    with pytest.raises(TypeError, match="one-shot"):
        fit(model, iter([torch.zeros(1, 3, 16, 16)]), epochs=2, progress=False)
    with pytest.raises(ValueError, match="amp"):
        fit(model, [torch.zeros(1, 3, 16, 16)], epochs=1, amp="int8")


def test_checkpoint_every_epoch_and_contents(tmp_path):
    model = TinyFlowModel(input_size=16)
    fit(model, _Images(), epochs=3, lr=0.01, batch_size=4, shuffle=False, out_dir=tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["format"] == "msflow_fast" and state["format_version"] == 3 and state["model"] == "tiny_flow"
    training = state["training"]
    assert training["stage"] == "train" and training["epoch"] == 2 and len(training["history"]["train"]["loss"]) == 3
    assert set(state["versions"]) == {"msflow_fast", "torch", "python"}
    assert training["optimizer"] is not None and training["scheduler"] is not None
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    torch.testing.assert_close(state["weights"]["mu"], model.mu.detach())


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    kwargs = dict(epochs=5, lr=0.02, batch_size=4, shuffle=False, progress=False, warmup_epochs=2, milestones=[3])
    ref = TinyFlowModel(input_size=16)
    torch.manual_seed(0)
    model = TinyFlowModel(input_size=16)
    model.load_state_dict(ref.state_dict())
    fit(ref, _Images(), **kwargs)

    # interrupted during epoch 4 (12 items per epoch): epochs 1-3 are checkpointed
    with pytest.raises(KeyboardInterrupt):
        fit(model, _Images(fail_at=12 * 3 + 5), out_dir=tmp_path, **kwargs)
    assert load_checkpoint(tmp_path)["training"]["epoch"] == 2
    fresh = TinyFlowModel(input_size=16)
    result = fit(fresh, _Images(), out_dir=tmp_path, resume=True, **kwargs)
    assert result.start_epoch == 3 and len(result.losses) == 2
    for key, value in _params(ref).items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    # resuming a finished run does nothing
    again = fit(fresh, _Images(), out_dir=tmp_path, resume=True, **kwargs)
    assert again.losses == []


class _Exploding(TinyFlowModel):
    def __init__(self, after):
        super().__init__(input_size=16)
        self.after, self.steps = after, 0

    def loss(self, batch):
        self.steps += 1
        loss = super().loss(batch)
        return loss * float("nan") if self.steps > self.after else loss


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = _Exploding(after=7)  # 3 steps per epoch: fails in epoch 3
    with pytest.raises(RuntimeError, match=r"non-finite training loss .* epoch 3, step 2.*last\.pt") as info:
        fit(model, _Images(), epochs=5, batch_size=4, shuffle=False, out_dir=tmp_path, progress=False)
    assert "resume" in str(info.value)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["training"]["epoch"] == 1
    restored = TinyFlowModel(input_size=16)
    restored.load_state_dict(state["weights"])
    assert all(torch.isfinite(v).all() for v in restored.state_dict().values())


def test_non_finite_without_checkpoint_says_so():
    with pytest.raises(RuntimeError, match="No checkpoint was written"):
        fit(_Exploding(after=0), _Images(), epochs=1, batch_size=4, progress=False)


def test_bf16_autocast_on_cpu_trains():
    model = TinyFlowModel(input_size=16)
    result = fit(model, _Images(), epochs=2, lr=0.01, batch_size=6, amp="bf16", progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_progress_bars_run(capsys):
    fit(TinyFlowModel(input_size=16), _Images(), epochs=1, batch_size=6, progress=True)
    assert "epoch 1/1" in capsys.readouterr().out


def test_fit_on_synthetic_dataset_dicts_with_masks():
    ds = SyntheticDefects("train", 4, 16, seed=0)
    result = fit(TinyFlowModel(input_size=16), ds, epochs=1, batch_size=2, progress=False)
    assert len(result.losses) == 1


def _ddp_worker(rank, world, init_file, out_dir, result_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        model = TinyFlowModel(input_size=16)
        fit(model, _Images(n=8), epochs=2, lr=0.05, batch_size=2, out_dir=out_dir, progress=False, seed=0)
        torch.save(model.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_cpu_processes_gloo(tmp_path):
    out, res = tmp_path / "out", tmp_path / "res"
    res.mkdir()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out), str(res)), nprocs=2, join=True)
    a, b = torch.load(res / "rank0.pt"), torch.load(res / "rank1.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    state = load_checkpoint(out / "last.pt")
    assert state["training"]["epoch"] == 1
    torch.testing.assert_close(state["weights"]["mu"], a["mu"])
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]


def test_fp16_autocast_with_grad_scaler():
    model = TinyFlowModel(input_size=16)
    result = fit(model, _Images(), epochs=2, lr=0.01, batch_size=6, amp="fp16", progress=False)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_seed_everything_makes_flow_permutations_reproducible():
    from msflow_fast.engine import seed_everything
    from msflow_fast.nn import AllInOneBlock, subnet_conv_ln

    def build():
        return AllInOneBlock([(16, 1, 1)], subnet_constructor=subnet_conv_ln, affine_clamping=1.9)

    seed_everything(3)
    first = build()
    seed_everything(3)
    second = build()
    third = build()
    assert torch.equal(first.w_perm, second.w_perm)
    assert not torch.equal(second.w_perm, third.w_perm)
    for (name, p), q in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------------------
# host reads per step, non-finite gradients and images, resume reads the checkpoint once
# ---------------------------------------------------------------------------------------------

_HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def _count_host_reads_from(monkeypatch, filename):
    """Count tensor -> Python value reads (each is a device sync on an accelerator) called directly
    from ``filename``: ``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``math.isfinite(t)``, ..."""
    import sys

    calls = []
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith(filename):
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize("grad_clip", [2.0, None])
def test_fit_reads_the_device_once_per_step(monkeypatch, grad_clip):
    model = TinyFlowModel(input_size=16)
    data = _Images()  # 12 images, batch 4: 3 steps per epoch
    reads = _count_host_reads_from(monkeypatch, "msflow_fast/engine/train.py".replace("/", os.sep))
    result = fit(model, data, epochs=2, lr=0.01, batch_size=4, shuffle=False, grad_clip=grad_clip, progress=False)
    monkeypatch.undo()
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert len(reads) == 6, f"expected one host read per step (6 steps), got {len(reads)}: {reads}"


class _BadGradient(TinyFlowModel):
    """Finite loss, NaN gradient (d sqrt(u)/du at 0 is inf, times du/dmu = 0)."""

    def loss(self, batch):
        return super().loss(batch) + (self.mu - self.mu.detach()).abs().sum().sqrt()


def test_non_finite_gradient_norm_stops_before_the_step():
    model = _BadGradient(input_size=16)
    before = _params(model)
    with pytest.raises(RuntimeError, match=r"non-finite training gradient norm \(nan\) at epoch 1, step 1.*No checkpoint"):
        fit(model, _Images(), epochs=2, batch_size=4, progress=False)
    for key, value in before.items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert all(p.grad is None for p in model.parameters())


class _PathImages(_Images):
    def __init__(self, bad_index, value):
        super().__init__(n=8)
        self.x[bad_index, 1, 2, 3] = value

    def __getitem__(self, i):
        return {"image": self.x[i], "path": f"/data/img_{i:03d}.png"}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_image_names_the_file(value):
    with pytest.raises(ValueError, match=r"/data/img_005\.png \(image 1 of the batch\) in training batch 2 of epoch 1 contains NaN or infinite"):
        fit(TinyFlowModel(input_size=16), _PathImages(5, value), epochs=1, batch_size=4, shuffle=False, progress=False)
    # plain tensors: no file names, the image's place in the batch instead
    images = torch.rand(4, 3, 16, 16)
    images[2, 0, 0, 0] = value
    with pytest.raises(ValueError, match=r"image 2 of the batch in training batch 1 of epoch 1 contains NaN"):
        fit(TinyFlowModel(input_size=16), [images], epochs=1, progress=False)


def _count_checkpoint_reads(monkeypatch):
    from msflow_fast.models import checkpoint as model_checkpoint

    reads = []
    original = model_checkpoint.read

    def counting(path, **kwargs):
        reads.append(str(path))
        return original(path, **kwargs)

    monkeypatch.setattr(model_checkpoint, "read", counting)
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(f"torch.load {f}") or real_load(f, *a, **k))
    return reads


def test_resume_reads_last_pt_once(tmp_path, monkeypatch):
    kwargs = dict(lr=0.02, batch_size=4, shuffle=False, progress=False)
    fit(TinyFlowModel(input_size=16), _Images(), epochs=2, out_dir=tmp_path, **kwargs)
    reads = _count_checkpoint_reads(monkeypatch)
    result = fit(TinyFlowModel(input_size=16), _Images(), epochs=3, out_dir=tmp_path, resume=True, **kwargs)
    assert result.start_epoch == 2 and len(reads) == 2, reads  # one read, one torch.load in it
    # a checkpoint dict already read (e.g. by the CLI to build the model) is used as it is
    monkeypatch.undo()
    state = load_checkpoint(tmp_path)
    reads = _count_checkpoint_reads(monkeypatch)
    resumed = TinyFlowModel(input_size=16)
    result = fit(resumed, _Images(), epochs=4, resume=state, **kwargs)
    assert result.start_epoch == 3 and len(result.losses) == 1 and reads == []
    with pytest.raises(ValueError, match="without training state"):
        fit(TinyFlowModel(input_size=16), _Images(), epochs=4, resume={k: v for k, v in state.items() if k != "training"}, **kwargs)


# ---------------------------------------------------------------------------------------------
# recipes, stages, exact resume with shuffling, weights checked before a checkpoint
# ---------------------------------------------------------------------------------------------


def test_fit_takes_its_defaults_from_the_recipe(monkeypatch):
    seen = {}
    real = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *args, **kwargs):
        seen["clip"] = max_norm
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    model = TinyFlowModel(input_size=16)
    result = fit(model, _Images(), epochs=10, progress=False)
    # TINY_RECIPE: lr 1e-4, warm-up from 0.1 over round(0.12 * 10) = 1 epoch, x0.33 at 7 and 9, clip 2
    assert result.lrs[0] == pytest.approx(1e-5) and result.lrs[1] == pytest.approx(1e-4)
    assert result.lrs[7] == pytest.approx(0.33e-4) and result.lrs[9] == pytest.approx(0.33**2 * 1e-4)
    assert seen["clip"] == 2.0
    seen.clear()
    fit(model, _Images(), epochs=1, grad_clip=False, progress=False)
    assert "clip" not in seen
    with pytest.raises(ValueError, match="grad_clip"):
        fit(model, _Images(), epochs=1, grad_clip=0, progress=False)
    with pytest.raises(ValueError, match="grad_clip"):
        fit(model, _Images(), epochs=1, grad_clip=-1.0, progress=False)


class _TwoStage(TinyFlowModel):
    """Stage "mu" trains mu only (Adam), stage "sigma" trains log_sigma only (AdamW)."""

    stages_seen: list

    @classmethod
    def recipe_for(cls, config):
        return TrainRecipe((
            TrainStage(name="mu", epochs=2, batch_size=4, lr=0.05),
            TrainStage(name="sigma", epochs=3, batch_size=6, lr=0.02, optimizer="adamw", weight_decay=0.0),
        ))

    def set_stage(self, stage):
        self.stages_seen.append(stage)

    def stage_parameters(self, stage):
        return [self.mu] if stage == "mu" else [self.log_sigma]


def test_two_stage_recipe_runs_stages_in_order_and_resumes_mid_stage(tmp_path):
    model = _TwoStage(input_size=16)
    model.stages_seen = []
    sigma_before = model.log_sigma.detach().clone()
    fit(model, _Images(), stages=["mu"], progress=False)
    assert model.stages_seen == ["mu"] and torch.equal(model.log_sigma.detach(), sigma_before)
    reference = _TwoStage(input_size=16)
    reference.stages_seen = []
    reference.load_state_dict(model.state_dict())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(reference, _Images(), shuffle=True, seed=3, progress=False)
    assert reference.stages_seen == ["mu", "sigma"] and result.stages == [("mu", 2), ("sigma", 3)]
    assert result.epochs == 5 and len(result.losses) == 5
    # interrupted in the second stage, resumed: the same weights, bit for bit
    interrupted = _TwoStage(input_size=16)
    interrupted.stages_seen = []
    interrupted.load_state_dict(start)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, _Images(fail_at=12 * 2 + 12 + 5), shuffle=True, seed=3, out_dir=tmp_path, progress=False)
    state = load_checkpoint(tmp_path)
    assert state["training"]["stage"] == "sigma" and state["training"]["epoch"] == 0
    resumed = _TwoStage(input_size=16)
    resumed.stages_seen = []
    result = fit(resumed, _Images(), shuffle=True, seed=3, out_dir=tmp_path, resume=True, progress=False)
    assert resumed.stages_seen == ["sigma"] and result.start_epoch == 3 and len(result.losses) == 2
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    with pytest.raises(ValueError, match="unknown stage"):
        fit(resumed, _Images(), stages=["nope"], progress=False)


def test_resume_with_shuffling_gives_the_same_weights_bit_for_bit(tmp_path):
    kwargs = dict(epochs=4, lr=0.02, batch_size=4, shuffle=True, seed=11, progress=False)
    start = TinyFlowModel(input_size=16).state_dict()
    reference = TinyFlowModel(input_size=16)
    reference.load_state_dict(start)
    fit(reference, _Images(), **kwargs)
    interrupted = TinyFlowModel(input_size=16)
    interrupted.load_state_dict(start)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, _Images(fail_at=12 * 2 + 7), out_dir=tmp_path, **kwargs)
    resumed = TinyFlowModel(input_size=16)
    fit(resumed, _Images(), out_dir=tmp_path, resume=True, **kwargs)
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


class _Saturating(TinyFlowModel):
    """A finite loss whatever the weights (tanh), so a blown-up update makes the weights infinite
    unnoticed by the loss. AdamW with weight decay 1 multiplies the weights by (1 - lr) per step."""

    @classmethod
    def recipe_for(cls, config):
        return TrainRecipe((TrainStage(name="train", epochs=3, batch_size=4, lr=1e-3, optimizer="adamw", weight_decay=1.0),))

    def loss(self, batch):
        images = batch["image"]
        return torch.tanh(self.mu).sum() + torch.tanh(self.log_sigma).sum() + 0.0 * images.mean()


def test_non_finite_weights_never_replace_the_last_good_checkpoint(tmp_path):
    # AdamW with weight decay 1 multiplies the weights by (1 - lr) per step, then adds Adam's step
    # (about -lr). lr 1e20 after a one-epoch warm-up from 1e-20: epoch 1 (lr 1) leaves -1, epoch 2
    # about 1e20 (finite, checkpointed), epoch 3 about -1e40: past float32's range, while the loss
    # (tanh of the weights) stays finite. The last epoch's checkpoint must not replace epoch 2's.
    model = _Saturating(input_size=16)
    with pytest.raises(RuntimeError, match=r"non-finite training weights .* end of epoch 3 .*last\.pt \(not replaced\)"):
        fit(model, _Images(n=4), lr=1e20, warmup_epochs=1, warmup_start=1e-20, out_dir=tmp_path, progress=False)
    state = load_checkpoint(tmp_path)
    assert state["training"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["weights"].values())
    assert not torch.isfinite(model.mu).all()


def test_schedule_overrides_that_change_nothing_are_refused():
    model = _Saturating(input_size=16)  # a constant-rate recipe
    with pytest.raises(ValueError, match="warmup_epochs=2 has no effect.*warmup_start"):
        fit(model, _Images(n=4), warmup_epochs=2, progress=False)
    with pytest.raises(ValueError, match="milestones=.1. have no effect.*gamma"):
        fit(model, _Images(n=4), milestones=[1], progress=False)
    result = fit(model, _Images(n=4), lr=1.0, warmup_epochs=2, warmup_start=0.5, milestones=[2], gamma=0.1, progress=False)
    assert result.lrs == pytest.approx([0.5, 0.75, 0.1])
