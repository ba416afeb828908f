"""Training loop with MSFlow's official schedule, atomic checkpoints, resume, AMP and DDP.

The model only needs ``model.loss(images: [B, 3, H, W]) -> scalar`` (the batch-mean NLL, in nats)
and trainable parameters; :class:`msflow_fast.model.MSFlow` provides it.

Official schedule (per epoch = one MSFlow "sub-epoch", 100 in total): Adam lr 1e-4; LinearLR warm-up
from 0.1 to 1.0 over the first 12 epochs; MultiStepLR at epochs 70 and 90 with gamma 0.33; gradient
norm clipped to 2 every step. For ``epochs != 100`` the warm-up length and milestones scale
proportionally (rounded).

Distributed training: when ``torch.distributed`` is initialised (``torchrun``), the loss is computed
through :class:`~torch.nn.parallel.DistributedDataParallel` (gloo on CPU, NCCL on GPU), a Dataset gets
a :class:`~torch.utils.data.DistributedSampler`, ``batch_size`` is per process, and only rank 0 writes
checkpoints.

Per step the loop reads the device once (the reported loss and the gradient norm together, to stop
on a non-finite value before the step is applied). Input images on the CPU are checked for NaN/inf
before they move to the device (see :func:`msflow_fast.engine.data.check_finite_images`).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import os
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from ..model import load_checkpoint_state
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .data import check_finite_images

__all__ = ["FitResult", "OfficialSchedule", "batch_images", "batch_paths", "fit"]


class OfficialSchedule:
    """Learning-rate factor per epoch: linear warm-up times step decay (picklable, for ``LambdaLR``).

    ``factor(e) = (start + (1 - start) * min(e, W) / W) * gamma ** #{m in milestones: m <= e}``, the
    closed form of ``LinearLR(start_factor=start, total_iters=W)`` chained with
    ``MultiStepLR(milestones, gamma)``.

    Args:
        epochs: total epochs; used to scale the official 12 / (70, 90) out of 100 when the explicit
            values are not given.
        warmup_epochs: W; ``None`` = ``round(0.12 * epochs)``; 0 disables the warm-up.
        milestones: decay epochs; ``None`` = ``(round(0.7 * epochs), round(0.9 * epochs))``.
        gamma: decay factor at each milestone.
        warmup_start: factor at epoch 0.
    """

    def __init__(
        self,
        epochs: int = 100,
        warmup_epochs: int | None = None,
        milestones: Iterable[int] | None = None,
        gamma: float = 0.33,
        warmup_start: float = 0.1,
    ) -> None:
        if epochs <= 0:
            raise ValueError(f"epochs: expected a positive int, got {epochs!r}")
        self.warmup_epochs = int(round(0.12 * epochs)) if warmup_epochs is None else int(warmup_epochs)
        if milestones is None:
            milestones = (int(round(0.7 * epochs)), int(round(0.9 * epochs)))
        self.milestones = tuple(sorted(int(m) for m in milestones))
        self.gamma, self.warmup_start = float(gamma), float(warmup_start)
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs: expected >= 0, got {warmup_epochs!r}")

    def __call__(self, epoch: int) -> float:
        if self.warmup_epochs > 0:
            warm = self.warmup_start + (1.0 - self.warmup_start) * min(epoch, self.warmup_epochs) / self.warmup_epochs
        else:
            warm = 1.0
        return warm * self.gamma ** sum(1 for m in self.milestones if m <= epoch)


@dataclass
class FitResult:
    """What :func:`fit` did: per-epoch mean losses and learning rates of the epochs run in this call."""

    epochs: int
    start_epoch: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    checkpoint: str | None = None
    seconds: float = 0.0


class _LossForward(nn.Module):
    """``forward(images) = model.loss(images)``, so DDP sees the loss computation as a forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.loss(images)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG (flow permutations are drawn from it, as in
    FrEIA 0.2) and torch (all devices), as the official training script does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_paths(batch: Any) -> list[str] | None:
    """The ``"path"`` entries of a dict batch (file names for error messages), else ``None``."""
    if isinstance(batch, dict):
        value = batch.get("path")
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        if isinstance(value, str):
            return [value]
    return None


def batch_images(batch: Any) -> torch.Tensor:
    """The image tensor ``[B, 3, H, W]`` of a batch: a tensor, a dict with ``"image"``, or a tuple/list whose first item is it."""
    if isinstance(batch, torch.Tensor):
        images = batch
    elif isinstance(batch, dict):
        if "image" not in batch:
            raise KeyError(f"batch dict has no 'image' entry (keys: {sorted(batch)})")
        images = batch["image"]
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        images = batch[0]
    else:
        raise TypeError(
            f"batch: expected a tensor [B, 3, H, W], a dict with 'image' or a (images, ...) tuple, got {type(batch).__name__}"
        )
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"batch images: expected [B, 3, H, W], got shape {tuple(images.shape)}")
    return images


def _dist_info() -> tuple[bool, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


def _make_loader(data: Any, batch_size: int, shuffle: bool, num_workers: int, seed: int | None, distributed: bool, rank: int, world: int):
    """A re-iterable source of batches and its sampler (for ``set_epoch``), from a Dataset, DataLoader or iterable."""
    if isinstance(data, DataLoader):
        if distributed and not isinstance(data.sampler, DistributedSampler) and not isinstance(data.dataset, IterableDataset):
            sampler = DistributedSampler(data.dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed or 0)
            loader = DataLoader(
                data.dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.num_workers,
                collate_fn=data.collate_fn, pin_memory=data.pin_memory, drop_last=data.drop_last,
            )
            return loader, sampler
        return data, data.sampler if isinstance(data.sampler, DistributedSampler) else None
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        if len(data) == 0:  # type: ignore[arg-type]
            raise ValueError("data: the dataset is empty")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if distributed:
            sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed or 0)
            return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers), sampler
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=generator), None
    if isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=batch_size, num_workers=num_workers), None
    if isinstance(data, (torch.Tensor, dict)):
        return [data], None
    if isinstance(data, Iterable):
        return data, None
    raise TypeError(f"data: expected a Dataset, a DataLoader or an iterable of batches, got {type(data).__name__}")


def _amp_dtype(amp: Any) -> torch.dtype | None:
    if amp in (None, False, "off", "none", "fp32", "float32"):
        return None
    if amp in (True, "bf16", "bfloat16", torch.bfloat16):
        return torch.bfloat16
    if amp in ("fp16", "float16", "half", torch.float16):
        return torch.float16
    raise ValueError(f"amp: expected None, 'bf16' or 'fp16', got {amp!r}")


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def fit(
    model: nn.Module,
    data: Any,
    *,
    epochs: int = 100,
    lr: float = 1e-4,
    batch_size: int = 8,
    shuffle: bool = True,
    num_workers: int = 0,
    warmup_epochs: int | None = None,
    milestones: Iterable[int] | None = None,
    gamma: float = 0.33,
    grad_clip: float | None = 2.0,
    out_dir: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike | Mapping = False,
    amp: str | bool | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    progress: bool = True,
    find_unused_parameters: bool = False,
) -> FitResult:
    """Train ``model`` on normal images with MSFlow's official schedule.

    Args:
        model: an ``nn.Module`` with ``loss(images [B, 3, H, W]) -> scalar`` (batch-mean NLL, nats).
        data: a Dataset (items: tensor or dict with ``"image"``), a DataLoader, or any re-iterable of
            batches (tensors ``[B, 3, H, W]`` or dicts with ``"image"``).
        epochs: total number of epochs (MSFlow: 100 sub-epochs). With ``resume`` training continues
            up to this total.
        lr: Adam learning rate (1e-4).
        batch_size: per process; used only when ``data`` is a Dataset.
        warmup_epochs, milestones, gamma: schedule (see :class:`OfficialSchedule`).
        grad_clip: max gradient norm per step (2); ``None`` disables clipping.
        out_dir: folder for ``last.pt`` (written atomically after every epoch); ``None`` = no checkpoints.
        resume: ``True`` continues from ``out_dir/last.pt`` if it exists (after its last finished
            epoch); a path continues from that checkpoint; a dict already read by
            :func:`~msflow_fast.engine.load_checkpoint` continues from it without reading the file again.
        amp: ``None`` (fp32), ``"bf16"`` or ``"fp16"`` autocast (fp16 uses a GradScaler).
        device: where to train; default = the model's device.
        seed: seeds the shuffling order.
        progress: tqdm progress bars and one summary line per epoch (rank 0 only).
        find_unused_parameters: passed to DDP.

    Returns:
        A :class:`FitResult`.

    Raises:
        ValueError: a batch of CPU images holds NaN or infinity (the message names the files when
            the batches carry ``"path"``). Batches already on the device are not checked (it would
            cost a sync per step); NaN there shows up as a non-finite loss.
        RuntimeError: non-finite loss or gradient norm. The step is not applied, and the last
            good checkpoint (if any) stays in ``out_dir`` and can be resumed.
    """
    if not callable(getattr(model, "loss", None)):
        raise TypeError(f"model: expected a module with a loss(images) method, got {type(model).__name__}")
    if not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs: expected a positive int, got {epochs!r}")
    if lr <= 0:
        raise ValueError(f"lr: expected a positive float, got {lr!r}")
    if resume and out_dir is None and not isinstance(resume, (str, os.PathLike, Mapping)):
        raise ValueError("resume=True needs out_dir (where last.pt lives) or a checkpoint path")
    amp_dtype = _amp_dtype(amp)
    distributed, rank, world = _dist_info()
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameter (requires_grad=True)")

    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = OfficialSchedule(epochs, warmup_epochs, milestones, gamma)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    start_epoch, history = 0, {"loss": [], "lr": []}
    state: Mapping | None = None
    if isinstance(resume, Mapping):
        state = resume  # already read (e.g. by the CLI, which built the model from it): no second read
    elif isinstance(resume, (str, os.PathLike)):
        state = load_checkpoint(resume, map_location=device)
    elif resume and ckpt_path is not None and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, map_location=device)
    resume_path = state.get("path", "the given checkpoint") if state is not None else None
    if state is not None:
        training = state.get("training")
        if not isinstance(training, dict):
            raise ValueError(
                f"resume: {resume_path} is a model checkpoint without training state (no 'training' entry); "
                "load the model from it and start a new fit instead"
            )
        config = getattr(model, "config", None)
        if state.get("config") is not None and config is not None and hasattr(config, "to_dict") and _architecture(config.to_dict()) != _architecture(state["config"]):
            raise ValueError(f"resume: the model's config differs from the one saved in {resume_path}; build the model from the checkpoint config")
        load_checkpoint_state(model, state)
        if training.get("optimizer") is not None:
            optimizer.load_state_dict(training["optimizer"])
        if scaler is not None and training.get("scaler") is not None:
            scaler.load_state_dict(training["scaler"])
        start_epoch = int(training["epoch"]) + 1
        history = training.get("history") or history
        # The schedule is a pure function of the epoch: set it for this run's total epochs.
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * schedule(start_epoch)
        scheduler.last_epoch = start_epoch
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    result = FitResult(epochs=epochs, start_epoch=start_epoch, checkpoint=str(ckpt_path) if ckpt_path else None)
    show = progress and rank == 0
    if resume_path is not None and show:
        _write(f"resumed from {resume_path} after epoch {start_epoch} of {epochs}")

    loss_module: nn.Module = _LossForward(model)
    if distributed:
        loss_module = _wrap_ddp(loss_module, model, device, find_unused_parameters)
    loader, sampler = _make_loader(data, batch_size, shuffle, num_workers, seed, distributed, rank, world)
    if epochs - start_epoch > 1 and iter(loader) is loader:
        raise TypeError("data: a one-shot iterator can only be used for one epoch; pass a list, Dataset or DataLoader")

    started = time.perf_counter()
    last_good = str(ckpt_path) if ckpt_path is not None and ckpt_path.is_file() else None
    model.train()
    for epoch in range(start_epoch, epochs):
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        lr_now = optimizer.param_groups[0]["lr"]
        total, count = 0.0, 0
        bar = _progress(loader, epoch, epochs, show)
        for step, batch in enumerate(bar):
            images = batch_images(batch)
            # On the CPU (before the copy): a cheap pass over host memory, no device sync.
            check_finite_images(images, batch_paths(batch), f"training batch {step + 1} of epoch {epoch + 1}")
            images = images.to(device, non_blocking=True)
            autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
            with autocast:
                loss = loss_module(images)
            loss = loss.float()
            if loss.dim() != 0:
                raise ValueError(f"model.loss: expected a scalar, got shape {tuple(loss.shape)}")
            reported = loss.detach().clone()
            if distributed:
                torch.distributed.all_reduce(reported)
                reported /= world
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            # One device -> host read per step: the reported loss, and (without a GradScaler, which
            # skips steps with inf/NaN gradients itself) the gradient norm, in one transfer.
            if grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if grad_clip is not None and scaler is None:
                value, norm_value = torch.stack([reported, norm.detach().to(reported.device, torch.float32)]).tolist()
            else:
                value, norm_value = reported.item(), 0.0
            if not math.isfinite(value) or not math.isfinite(norm_value):
                optimizer.zero_grad(set_to_none=True)
                what, bad = ("loss", value) if not math.isfinite(value) else ("gradient norm", norm_value)
                raise RuntimeError(_non_finite_message(what, bad, epoch, step, last_good))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            total += value
            count += 1
            if show and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{value:.4g}", lr=f"{lr_now:.3g}")
        if count == 0:
            raise ValueError("data: produced no batch in this epoch")
        scheduler.step()
        mean_loss = total / count
        history["loss"].append(mean_loss)
        history["lr"].append(lr_now)
        result.losses.append(mean_loss)
        result.lrs.append(lr_now)
        if ckpt_path is not None and rank == 0:
            save_checkpoint(ckpt_path, model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, epoch=epoch, history=history)
            last_good = str(ckpt_path)
        if distributed:
            torch.distributed.barrier()
        if show:
            _write(f"epoch {epoch + 1}/{epochs}  loss {mean_loss:.6g}  lr {lr_now:.3g}  ({time.perf_counter() - started:.1f} s)")
    result.seconds = time.perf_counter() - started
    return result


# Where the initial backbone weights came from does not change the model a checkpoint restores.
_WEIGHT_SOURCE_KEYS = ("pretrained",)


def _architecture(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _WEIGHT_SOURCE_KEYS}


def _wrap_ddp(loss_module: nn.Module, model: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """DDP around the loss; every parameter and buffer (frozen backbone and the non-persistent
    permutation indices included) starts as rank 0's."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            torch.distributed.broadcast(tensor, src=0)
    ddp = nn.parallel.DistributedDataParallel
    options: dict[str, Any] = {"find_unused_parameters": find_unused_parameters}
    # Buffers belong to the frozen extractor: synced once above, never per forward.
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        options["forward_sync_buffers"] = False
    else:
        options["broadcast_buffers"] = False
    return ddp(loss_module, device_ids=[device.index] if device.type == "cuda" else None, **options)


def _non_finite_message(what: str, value: float, epoch: int, step: int, last_good: str | None) -> str:
    where = f"epoch {epoch + 1}, step {step + 1}"
    restore = (
        f"The last good checkpoint is {last_good}; continue from it with resume=True (CLI: --resume) "
        if last_good
        else "No checkpoint was written yet (pass out_dir to keep one per epoch). "
    )
    return (
        f"non-finite training {what} ({value}) at {where}; this step was not applied. {restore}"
        "after lowering the learning rate, disabling AMP or checking the input images for NaN/Inf."
    )


def _progress(loader: Any, epoch: int, epochs: int, show: bool):
    if not show:
        return loader
    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(loader, total=total, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)


def _write(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message)
