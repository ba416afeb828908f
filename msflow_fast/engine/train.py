"""Training: the model's recipe, stage by stage, with atomic checkpoints, exact resume, AMP and DDP.

The engine knows a model through :mod:`msflow_fast.models.base` only: ``fit`` takes its defaults
from ``model.recipe()`` (one or more stages, each with its optimizer, schedule, length, batch size
and gradient clipping; arguments of ``fit`` override them), calls ``model.set_stage(name)`` before
each stage and ``model.loss(batch)`` on every batch dict (``"image"`` and, where the data has
them, ``"mask"``, ``"label"``, ``"path"``). A module that only has ``loss`` trains with
:data:`DEFAULT_RECIPE`.

Checkpoints: after every epoch, rank 0 writes ``out_dir/last.pt`` with
:func:`msflow_fast.models.checkpoint.save`: the model and a ``"training"`` entry (the stage, the
last finished epoch in it, optimizer / scheduler / scaler states and the loss history). A
checkpoint replaces the previous one only when every parameter is finite, so ``last.pt`` always
holds the last good weights. With a ``seed`` the shuffling order of each epoch is a function of
(seed, stage, epoch), so a resumed run sees the batches an uninterrupted one would.

Distributed training: when ``torch.distributed`` is initialised (``torchrun``), the loss is computed
through :class:`~torch.nn.parallel.DistributedDataParallel` (gloo on CPU, NCCL on GPU), a Dataset gets
a :class:`~torch.utils.data.DistributedSampler`, the batch size is per process, and only rank 0 writes
checkpoints.

Feature cache: a model's frozen part (``frozen_features``) runs once per image, in a stage's first
epoch; later epochs train on the kept features, with the same batches in the same order
(:mod:`msflow_fast.engine.feature_cache` states the policy: when, where, keys, DDP).

Epoch-dependent data: a dataset with ``set_epoch`` (DataLoader's dataset included) is told
``set_epoch(stage_index * 100000 + epoch)`` before every epoch (a DataLoader with
``persistent_workers=True`` keeps its workers' copies and would not see it). A stage for which
``model.pseudo_anomalies(stage)`` declares pseudo anomalies trains on the good images wrapped in
:class:`~.data.pseudo_anomaly.PseudoAnomalyDataset` (masks, labels and ``"clean_image"`` in every
batch; new anomalies every epoch); the feature cache is off there.

Per step the loop reads the device once (the reported loss and the gradient norm together, to stop
on a non-finite value before the step is applied). Input images on the CPU are checked for NaN/inf
before they move to the device, except from datasets of decoded files (8-bit, always finite).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from ..models import checkpoint as model_checkpoint
from ..models.base import TrainRecipe, TrainStage, as_batch, batch_paths
from .data import check_finite_images, decoded_finite, deterministic_items
from .data.pseudo_anomaly import PseudoAnomalyConfig, PseudoAnomalyDataset
from .feature_cache import CACHE_MODES, INDEX_KEY, CacheReport, FeatureCache, IndexDataset, IndexedDataset, cache_key, memory_budget, storage_dtype
from .optim import EpochSchedule, make_optimizer
from .run_folder import RUN_FILES, RunLock, remove_stale_temporaries

__all__ = ["CHECKPOINT_NAME", "DEFAULT_RECIPE", "FitResult", "batch_to_device", "fit", "seed_everything"]

CHECKPOINT_NAME = "last.pt"
DEFAULT_RECIPE = TrainRecipe((TrainStage(name="train", epochs=100, batch_size=8, optimizer="adam", lr=1e-4),))
"""For modules with ``loss`` but no ``recipe()``: Adam 1e-4, 100 epochs, batch 8, constant rate, no clipping."""


@dataclass
class FitResult:
    """What :func:`fit` did.

    Attributes:
        epochs: total epochs of the stages planned (over all stages).
        start_epoch: epochs already done when this call started (0, or where a resume continued).
        losses, lrs: per-epoch mean loss and learning rate of the epochs run in this call.
        epoch_seconds: wall time of each of those epochs (a caching epoch includes completing the cache).
        stages: ``(stage name, epochs run in this call)`` in order.
        checkpoint: ``last.pt`` (``None`` without ``out_dir``).
        seconds: wall time of the epochs.
        warnings: what looked wrong though nothing failed (a diverging loss); also issued as
            :class:`RuntimeWarning`.
        feature_cache: per stage run, what the feature cache did
            (:class:`~msflow_fast.engine.feature_cache.CacheReport`: storage, size, build time).
    """

    epochs: int
    start_epoch: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    stages: list[tuple[str, int]] = field(default_factory=list)
    checkpoint: str | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    feature_cache: dict[str, CacheReport] = field(default_factory=dict)


class _LossForward(nn.Module):
    """``forward(batch) = model.loss(batch)``, so DDP sees the loss computation as a forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model.loss(batch)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG (flow permutations are drawn from it, as in
    FrEIA 0.2) and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors (and lists of tensors) on ``device``; other entries as they are."""
    non_blocking = device.type == "cuda"

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=non_blocking)
        if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            return [v.to(device, non_blocking=non_blocking) for v in value]  # e.g. cached "features"
        return value

    return {k: move(v) for k, v in batch.items()}


def _dist_info() -> tuple[bool, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


def _epoch_seed(seed: int, stage_index: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + stage_index * 10_007 + epoch) % (2**63)


class _Loader:
    """A re-iterable source of batches for one stage; ``start_epoch(e)`` fixes epoch e's order.

    With a feature ``cache`` (a map-style dataset): the epochs before the cache is complete read
    the images (items carry their index, so their features can be stored); later epochs read the
    cache through a second loader with the same sampler, hence the same batches in the same order.
    """

    def __init__(self, data: Any, stage: TrainStage, shuffle: bool, num_workers: int, seed: int | None, stage_index: int,
                 cache: FeatureCache | None = None) -> None:
        distributed, rank, world = _dist_info()
        self.sampler: DistributedSampler | None = None
        self.generator: torch.Generator | None = None
        self.seed, self.stage_index = seed, stage_index
        self.one_shot = False
        self.cache = cache
        self.cache_loader: DataLoader | None = None
        dataset = data.dataset if isinstance(data, DataLoader) else data
        # A dataset whose items depend on the epoch (pseudo anomalies drawn anew) is told each epoch.
        self.epoch_dataset = dataset if callable(getattr(dataset, "set_epoch", None)) else None
        if self.epoch_dataset is not None and isinstance(data, DataLoader) and data.persistent_workers and data.num_workers > 0:
            warnings.warn(
                f"data: the DataLoader keeps its workers (persistent_workers=True), whose copies of the "
                f"{type(dataset).__name__} do not see set_epoch: every epoch repeats the first one's items. "
                "Pass persistent_workers=False, or the Dataset itself",
                stacklevel=3,
            )
        if isinstance(data, DataLoader):
            self.loader: Any = data
            if distributed and not isinstance(data.sampler, DistributedSampler) and not isinstance(data.dataset, IterableDataset):
                self.sampler = DistributedSampler(data.dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed or 0)
                self.loader = DataLoader(
                    data.dataset, batch_size=data.batch_size, sampler=self.sampler, num_workers=data.num_workers,
                    collate_fn=data.collate_fn, pin_memory=data.pin_memory, drop_last=data.drop_last,
                )
            elif isinstance(data.sampler, DistributedSampler):
                self.sampler = data.sampler
        elif isinstance(data, Dataset) and not isinstance(data, IterableDataset):
            if len(data) == 0:  # type: ignore[arg-type]
                raise ValueError("data: the dataset is empty")
            pin = torch.cuda.is_available()
            if distributed:
                self.sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed or 0, drop_last=stage.drop_last)
                order: dict[str, Any] = {"sampler": self.sampler}
            else:
                self.generator = torch.Generator() if seed is not None else None
                order = {"shuffle": shuffle, "generator": self.generator}
            common = {"batch_size": stage.batch_size, "drop_last": stage.drop_last, "pin_memory": pin, **order}
            images = IndexedDataset(data) if cache is not None else data
            self.loader = DataLoader(images, num_workers=num_workers, **common)
            if cache is not None:  # served from memory (or a memory map): no workers
                self.cache_loader = DataLoader(IndexDataset(len(data)), collate_fn=cache.batch, **common)
        elif isinstance(data, IterableDataset):
            self.loader = DataLoader(data, batch_size=stage.batch_size, num_workers=num_workers)
        elif isinstance(data, (torch.Tensor, Mapping)):
            self.loader = [data]
        elif isinstance(data, Iterable):
            self.loader = data
            self.one_shot = iter(data) is data
        else:
            raise TypeError(f"data: expected a Dataset, a DataLoader or an iterable of batches, got {type(data).__name__}")

    def epoch_batches(self) -> Any:
        """This epoch's batches: the cache's once it is complete, else the images'."""
        if self.cache_loader is not None and self.cache is not None and self.cache.complete:
            return self.cache_loader
        return self.loader

    def start_epoch(self, epoch: int) -> None:
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.stage_index * 100_000 + epoch)
        if self.generator is not None:
            self.generator.manual_seed(_epoch_seed(self.seed, self.stage_index, epoch))
        if self.epoch_dataset is not None:
            self.epoch_dataset.set_epoch(self.stage_index * 100_000 + epoch)


def _amp_dtype(amp: Any) -> torch.dtype | None:
    if amp in (None, False, "off", "none", "fp32", "float32"):
        return None
    if amp in (True, "bf16", "bfloat16", torch.bfloat16):
        return torch.bfloat16
    if amp in ("fp16", "float16", "half", torch.float16):
        return torch.float16
    raise ValueError(f"amp: expected None, 'bf16' or 'fp16', got {amp!r}")


def _device_of(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _plan(
    model: nn.Module, stages: Sequence[str] | None, overrides: dict[str, Any], grad_clip: float | bool | None
) -> list[tuple[int, TrainStage]]:
    """``(index in the recipe, stage with the overrides)`` for every stage to run."""
    recipe = model.recipe() if callable(getattr(model, "recipe", None)) else DEFAULT_RECIPE
    if not isinstance(recipe, TrainRecipe):
        raise TypeError(f"model.recipe() must return a TrainRecipe, got {type(recipe).__name__}")
    names = [s.name for s in recipe.stages]
    if stages is not None:
        unknown = [s for s in stages if s not in names]
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; the recipe has {names}")
    chosen = [(i, s) for i, s in enumerate(recipe.stages) if stages is None or s.name in stages]
    changes = {k: v for k, v in overrides.items() if v is not None}
    if grad_clip is not None and grad_clip is not True and grad_clip is not False:
        changes["grad_clip"] = grad_clip
    try:
        planned = [(i, s.replace(**changes) if changes else s) for i, s in chosen]
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"fit: {exc}") from None
    if grad_clip is False:
        planned = [(i, dataclasses.replace(s, grad_clip=None)) for i, s in planned]
    return planned


def _training_entry(state: Mapping[str, Any], first_stage: str, source: str) -> dict[str, Any]:
    training = state.get("training")
    if not isinstance(training, Mapping):
        raise ValueError(
            f"resume: {source} is a model checkpoint without training state (no 'training' entry); "
            "load the model from it and start a new fit instead"
        )
    training = dict(training)
    if "stage" not in training:  # format 2: one stage, history {"loss", "lr"}
        training["stage"] = first_stage
        training["history"] = {first_stage: training.get("history") or {"loss": [], "lr": []}}
    return training


# Where the initial backbone weights came from does not change the model a checkpoint restores.
_WEIGHT_SOURCE_KEYS = ("pretrained",)


def _architecture(config: Mapping[str, Any]) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if k not in _WEIGHT_SOURCE_KEYS}


def fit(
    model: nn.Module,
    data: Any,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    grad_clip: float | bool | None = None,
    warmup_epochs: int | None = None,
    milestones: Iterable[int] | None = None,
    gamma: float | None = None,
    warmup_start: float | None = None,
    stages: Sequence[str] | None = None,
    shuffle: bool = True,
    num_workers: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike | Mapping = False,
    overwrite: bool = False,
    amp: str | bool | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    progress: bool = True,
    find_unused_parameters: bool = False,
    feature_cache: str = "auto",
    feature_cache_dtype: str | torch.dtype | None = None,
    feature_cache_memory: int | None = None,
) -> FitResult:
    """Train ``model`` on normal images (and, for supervised models, their masks and labels).

    Args:
        model: a registered :class:`~msflow_fast.models.base.AnomalyModel` (or any module with
            ``loss(batch) -> scalar``; checkpoints need a registered model).
        data: a Dataset (items: tensor or dict with ``"image"``), a DataLoader, or any re-iterable of
            batches (tensors ``[B, 3, H, W]`` or dicts with ``"image"``). For a stage whose model
            declares pseudo anomalies (``model.pseudo_anomalies(stage)``), a map-style Dataset of
            good images, which ``fit`` wraps (see the module docstring).
        epochs, lr, batch_size, weight_decay: override every planned stage's setting (``None``:
            the recipe's). ``batch_size`` applies when ``data`` is a Dataset.
        grad_clip: maximum gradient norm per step; ``None``: the recipe's; ``False``: no clipping.
        warmup_epochs, milestones, gamma, warmup_start: override the schedule (epochs and factors;
            see :class:`~msflow_fast.engine.optim.EpochSchedule`, which refuses an override that
            would change nothing).
        stages: names of the recipe's stages to run (default: all, in order).
        out_dir: folder for ``last.pt`` (written atomically after every epoch); ``None`` = no checkpoints.
            The folder is locked while ``fit`` runs (:class:`~msflow_fast.engine.run_folder.RunLock`):
            a second process training into it is refused.
        resume: ``True`` continues from ``out_dir/last.pt`` if it exists; a path continues from that
            checkpoint; a dict already read by :func:`msflow_fast.models.checkpoint.read`
            continues from it without reading the file again.
        overwrite: without ``resume``, a folder that already holds a run (``last.pt``) is refused
            unless ``overwrite=True``, which first removes that run's files (``last.pt``,
            ``metrics.json``, ``scores.csv``, ``heatmaps/``).
        amp: ``None`` (fp32), ``"bf16"`` or ``"fp16"`` autocast (fp16 uses a GradScaler).
        device: where to train; default = the model's device.
        seed: fixes the shuffling order of every epoch (exact resume).
        progress: tqdm progress bars and one summary line per epoch (rank 0 only).
        find_unused_parameters: passed to DDP.
        feature_cache: ``"auto"`` (default), ``"memory"``, ``"disk"`` or ``"off"``: compute a frozen
            backbone's features once per dataset and train later epochs on them (same batches, same
            training; see :mod:`msflow_fast.engine.feature_cache` for the policy).
        feature_cache_dtype: ``None`` (the features' dtype) or ``"bfloat16"`` (half the memory; rounds
            the flows' inputs).
        feature_cache_memory: bytes a memory cache may take under ``"auto"`` (default: half the
            available memory).

    Returns:
        A :class:`FitResult`.

    Raises:
        ValueError: bad arguments, or a batch of CPU images holding NaN or infinity (named by file).
        RuntimeError: a non-finite loss, gradient norm or weights. The step (or the checkpoint)
            is not applied, and the last good checkpoint stays in ``out_dir``.
    """
    if not callable(getattr(model, "loss", None)):
        raise TypeError(f"model: expected a module with a loss(batch) method, got {type(model).__name__}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0):
        raise ValueError(f"epochs: expected a positive int, got {epochs!r}")
    if isinstance(grad_clip, (int, float)) and not isinstance(grad_clip, bool) and not grad_clip > 0:
        raise ValueError(f"grad_clip: expected a positive max norm (or False for no clipping), got {grad_clip!r}")
    if resume and out_dir is None and not isinstance(resume, (str, os.PathLike, Mapping)):
        raise ValueError("resume=True needs out_dir (where last.pt lives) or a checkpoint path")
    if out_dir is not None and not getattr(model, "name", ""):
        raise TypeError(
            f"out_dir: checkpoints need a registered model (msflow_fast.models.registry), got {type(model).__name__}; "
            "pass out_dir=None or register the model"
        )
    if feature_cache not in CACHE_MODES:
        raise ValueError(f"feature_cache: expected one of {CACHE_MODES}, got {feature_cache!r}")
    if feature_cache_memory is not None and (isinstance(feature_cache_memory, bool) or not isinstance(feature_cache_memory, int) or feature_cache_memory < 0):
        raise ValueError(f"feature_cache_memory: expected a number of bytes >= 0, got {feature_cache_memory!r}")
    cache_options = {"mode": feature_cache, "stored": storage_dtype(feature_cache_dtype),
                     "budget": memory_budget() if feature_cache_memory is None else feature_cache_memory}
    plan = _plan(model, stages, {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay}, grad_clip)
    amp_dtype = _amp_dtype(amp)
    distributed, rank, world = _dist_info()
    device = torch.device(device) if device is not None else _device_of(model)
    with contextlib.ExitStack() as stack:
        if out_dir is not None and rank == 0:
            stack.enter_context(RunLock(out_dir))
            remove_stale_temporaries(out_dir)
            _prepare_folder(Path(out_dir), resume, overwrite)
        schedule_overrides = {"warmup_epochs": warmup_epochs, "milestones": milestones, "gamma": gamma, "warmup_start": warmup_start}
        return _fit(model, data, plan, amp_dtype, distributed, rank, world, device, shuffle, num_workers,
                    out_dir, resume, schedule_overrides, seed, progress, find_unused_parameters, cache_options)


def _prepare_folder(folder: Path, resume: Any, overwrite: bool) -> None:
    """Refuse to train over an earlier run unless resuming it or told to overwrite it."""
    if resume is not False and resume is not None:
        return
    previous = [name for name in RUN_FILES if (folder / name).exists()]
    if not previous:
        return
    if not overwrite:
        raise ValueError(
            f"{folder} already holds a run ({', '.join(previous)}); continue it with resume=True (CLI: --resume), "
            "start over with overwrite=True (CLI: --overwrite), or choose another folder"
        )
    for name in previous:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _stage_cache(model: nn.Module, data: Any, stage: TrainStage, options: dict, out_dir: Any, amp_dtype: torch.dtype | None,
                 distributed: bool, rank: int) -> tuple[FeatureCache | None, CacheReport]:
    """The feature cache for ``stage`` (``None`` when off) and the report saying why."""
    mode = options["mode"]
    if mode == "off":
        return None, CacheReport("off", "off: feature_cache='off'")
    forced = mode in ("memory", "disk")
    if not callable(getattr(model, "frozen_features", None)):
        if forced:
            raise ValueError(f"feature_cache={mode!r}: {type(model).__name__} has no frozen_features(images); use 'auto' or 'off'")
        return None, CacheReport("off", "off: the model has no frozen part (frozen_features)")
    if not isinstance(data, Dataset) or isinstance(data, IterableDataset):
        if forced:
            raise ValueError(f"feature_cache={mode!r} needs a map-style Dataset (items by index), got {type(data).__name__}; "
                             "pass the Dataset rather than a DataLoader or an iterable")
        return None, CacheReport("off", f"off: data is a {type(data).__name__}, not a map-style Dataset")
    if forced and callable(getattr(data, "set_epoch", None)) and not deterministic_items(data):
        raise ValueError(f"feature_cache={mode!r}: the training items change every epoch (the dataset has set_epoch, e.g. pseudo "
                         "anomalies drawn anew), so their features cannot be computed once; use 'auto' or 'off'")
    if not forced and not deterministic_items(data):
        return None, CacheReport("off", "off: the dataset does not declare deterministic_items (random augmentation?)")
    if mode == "disk" and (out_dir is None or distributed):
        raise ValueError("feature_cache='disk' needs out_dir" + (" and a single process (under DDP use 'memory' or 'auto')" if distributed else ""))
    key = cache_key(model, data, stage.name, amp_dtype, options["stored"]) if out_dir is not None and not distributed else None
    if mode == "disk" and key is None:
        raise ValueError(f"feature_cache='disk': {type(data).__name__} has no fingerprint() (or the model no frozen_fingerprint()) "
                         "to key the cache; use 'memory'")
    size = len(data)
    if key is not None and mode in ("auto", "disk"):
        reused = FeatureCache.open(out_dir, key, size)
        if reused is not None:
            return reused, reused.report
    cache = FeatureCache(size, storage=mode, folder=out_dir if not distributed and rank == 0 else None, key=key,
                         stored=options["stored"], budget=options["budget"], distributed=distributed)
    return cache, cache.report


def _complete_cache(cache: FeatureCache, model: nn.Module, data: Any, stage: TrainStage, amp_dtype, device, distributed: bool, show: bool) -> None:
    """After a caching epoch: the images it did not see (a dropped last batch), the ranks' shards
    exchanged under DDP, then the cache marked complete (a disk cache renamed into place)."""

    indexed = IndexedDataset(data)
    finite_data = decoded_finite(data)

    def compute(indices: list[int]) -> None:
        for start in range(0, len(indices), stage.batch_size):
            batch = torch.utils.data.default_collate([indexed[i] for i in indices[start : start + stage.batch_size]])
            if not finite_data:
                check_finite_images(batch["image"], batch_paths(batch), "the images the first epoch did not see")
            _cache_batch(cache, model, batch, amp_dtype, device)

    if distributed:
        cache.share(compute)
    elif cache.active:
        compute(cache.missing())
    if cache.active:
        cache.finish()
        if show:
            _write(f"feature cache: {cache.report.reason}, {cache.report.items} images, built in {cache.report.build_seconds:.1f} s")


def _cache_batch(cache: FeatureCache, model: nn.Module, batch: dict[str, Any], amp_dtype, device) -> dict[str, Any]:
    """Compute an image batch's frozen features (under the run's autocast), store them and return
    the batch the loss sees: the features and the kept entries (no image, no mask) — the same
    entries a batch read from the cache has."""
    index = batch.pop(INDEX_KEY)
    if not cache.active:
        return batch
    started = time.perf_counter()
    images = batch["image"]
    moved = images.to(device, non_blocking=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        features = model.frozen_features(moved)
    if features is None:
        cache.deactivate("off: the model has no frozen part (frozen_features returned None)")
        return batch
    cache.store(index, features, batch)
    cache.report.build_seconds += time.perf_counter() - started
    out = {k: v for k, v in batch.items() if k not in ("image", "mask")}
    out["features"] = list(features)
    return out


def _stage_data(model: nn.Module, data: Any, stage: TrainStage, seed: int | None) -> Any:
    """The data ``stage`` trains on: ``data``, or, for a stage that declares pseudo anomalies
    (``model.pseudo_anomalies(stage)``), ``data``'s good images wrapped in a
    :class:`~.data.pseudo_anomaly.PseudoAnomalyDataset` yielding ``"clean_image"`` too."""
    declared = model.pseudo_anomalies(stage.name) if callable(getattr(model, "pseudo_anomalies", None)) else None
    if declared is None:
        return data
    if isinstance(data, PseudoAnomalyDataset):
        if not data.clean_image:
            raise ValueError(
                f"data: stage {stage.name!r} of {type(model).__name__} needs the clean images in its batches; build the "
                "PseudoAnomalyDataset with clean_image=True, or pass the good images and let fit wrap them"
            )
        return data
    if not isinstance(data, Dataset) or isinstance(data, IterableDataset):
        raise ValueError(
            f"data: stage {stage.name!r} of {type(model).__name__} trains on pseudo anomalies drawn on good images, which needs a "
            f"map-style Dataset of good images (items by index), got {type(data).__name__}; pass the Dataset itself "
            "(or a PseudoAnomalyDataset built with clean_image=True)"
        )
    fields = dict(declared)
    if fields.get("category") is None and isinstance(getattr(data, "category", None), str):
        fields["category"] = data.category  # the category's priors (rotation, foreground)
    try:
        config = PseudoAnomalyConfig(**fields)
    except TypeError as exc:
        raise TypeError(f"{type(model).__name__}.pseudo_anomalies({stage.name!r}): {exc}") from None
    return PseudoAnomalyDataset(data, config, seed=seed or 0, clean_image=True)


def _fit(model, data, plan, amp_dtype, distributed, rank, world, device, shuffle, num_workers,
         out_dir, resume, schedule_overrides, seed, progress, find_unused_parameters, cache_options) -> FitResult:
    if _device_of(model) != device:
        model.to(device)

    ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    state: Mapping | None = None
    if isinstance(resume, Mapping):
        state = resume  # already read (e.g. by the CLI, which built the model from it): no second read
    elif isinstance(resume, (str, os.PathLike)):
        state = model_checkpoint.read(resume, map_location=device)
    elif resume and ckpt_path is not None and ckpt_path.is_file():
        state = model_checkpoint.read(ckpt_path, map_location=device)
    resume_path = state.get("path", "the given checkpoint") if state is not None else None
    training: dict[str, Any] | None = None
    if state is not None:
        training = _training_entry(state, plan[0][1].name, resume_path)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict") and _architecture(config.to_dict()) != _architecture(state["config"]):
            raise ValueError(f"resume: the model's config differs from the one saved in {resume_path}; build the model from the checkpoint")
        model_checkpoint.load_weights(model, state)
        if training["stage"] not in [s.name for _, s in plan]:
            raise ValueError(f"resume: {resume_path} stopped in stage {training['stage']!r}, which is not among the stages to run {[s.name for _, s in plan]}")
    history: dict[str, dict[str, list[float]]] = dict(training["history"]) if training else {}

    total_epochs = sum(s.epochs for _, s in plan)
    done = 0
    start_position = 0  # stage position in the plan
    start_epoch_in_stage = 0
    if training is not None:
        start_position = [s.name for _, s in plan].index(training["stage"])
        start_epoch_in_stage = int(training["epoch"]) + 1
        done = sum(s.epochs for _, s in plan[:start_position]) + start_epoch_in_stage
    result = FitResult(epochs=total_epochs, start_epoch=done, checkpoint=str(ckpt_path) if ckpt_path else None)
    show = progress and rank == 0
    if resume_path is not None and show:
        _write(f"resumed from {resume_path} after {done} of {total_epochs} epochs (stage {training['stage']!r})")

    finite_data = decoded_finite(data)
    last_good = str(ckpt_path) if ckpt_path is not None and ckpt_path.is_file() else None
    started = time.perf_counter()
    for position in range(start_position, len(plan)):
        stage_index, stage = plan[position]
        first_epoch = start_epoch_in_stage if position == start_position else 0
        if first_epoch >= stage.epochs:
            continue
        if callable(getattr(model, "set_stage", None)):
            model.set_stage(stage.name)
        params = model.stage_parameters(stage.name) if callable(getattr(model, "stage_parameters", None)) else [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"model: stage {stage.name!r} has no trainable parameter (requires_grad=True)")
        # DDP after set_stage, once per stage: it reduces the gradients of the parameters trainable now.
        loss_module: nn.Module = _LossForward(model)
        if distributed:
            loss_module = _wrap_ddp(loss_module, model, device, find_unused_parameters)
        optimizer = make_optimizer(stage, params)
        schedule = EpochSchedule.for_stage(stage, **schedule_overrides)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        if training is not None and position == start_position and first_epoch > 0:
            if training.get("optimizer") is not None:
                optimizer.load_state_dict(training["optimizer"])
            if scaler is not None and training.get("scaler") is not None:
                scaler.load_state_dict(training["scaler"])
            # The schedule is a pure function of the epoch: set it for this run's stage length.
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * schedule(first_epoch)
            scheduler.last_epoch = first_epoch
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        stage_data = _stage_data(model, data, stage, seed)
        cache, cache_report = _stage_cache(model, stage_data, stage, cache_options, out_dir, amp_dtype, distributed, rank)
        result.feature_cache[stage.name] = cache_report
        loader = _Loader(stage_data, stage, shuffle, num_workers, seed, stage_index, cache)
        if loader.one_shot and total_epochs - done > 1:
            raise TypeError("data: a one-shot iterator can only be used for one epoch; pass a list, Dataset or DataLoader")
        model.train()
        try:
            _run_stage(model, loss_module, loader, cache, stage_data, optimizer, scheduler, params, scaler, stage, plan, first_epoch,
                       amp_dtype, device, distributed, world, rank, finite_data, ckpt_path, show, history, seed, result, started,
                       last_good)
        finally:
            if cache is not None:
                cache.abort()  # a half-written disk cache is removed (a complete one stays)
                result.feature_cache[stage.name] = cache.report
        done += stage.epochs - first_epoch
        last_good = str(ckpt_path) if ckpt_path is not None and ckpt_path.is_file() else last_good
        result.stages.append((stage.name, stage.epochs - first_epoch))
        stage_history = history[stage.name]
        diverged = _divergence(stage.name, stage_history["loss"])
        if diverged:
            result.warnings.append(diverged)
            warnings.warn(diverged, RuntimeWarning, stacklevel=3)
            if show:
                _write(f"warning: {diverged}")
    result.seconds = time.perf_counter() - started
    return result


def _run_stage(model, loss_module, loader, cache, data, optimizer, scheduler, params, scaler, stage, plan, first_epoch,
               amp_dtype, device, distributed, world, rank, finite_data, ckpt_path, show, history, seed, result, started,
               last_good) -> None:
    """The epochs ``first_epoch..`` of one stage, a checkpoint after each (rank 0)."""
    stage_history = history.setdefault(stage.name, {"loss": [], "lr": []})
    for epoch in range(first_epoch, stage.epochs):
        epoch_started = time.perf_counter()
        loader.start_epoch(epoch)
        lr_now = optimizer.param_groups[0]["lr"]
        caching = cache is not None and cache.active and not cache.complete
        mean_loss = _run_epoch(
            loss_module, loader.epoch_batches(), optimizer, params, scaler, stage, amp_dtype, device, distributed, world,
            finite_data, last_good, ckpt_path, show, f"{stage.name} " if len(plan) > 1 else "", epoch,
            (cache, model) if caching else None,
        )
        if caching:
            _complete_cache(cache, model, data, stage, amp_dtype, device, distributed, show)
        scheduler.step()
        result.epoch_seconds.append(time.perf_counter() - epoch_started)
        stage_history["loss"].append(mean_loss)
        stage_history["lr"].append(lr_now)
        result.losses.append(mean_loss)
        result.lrs.append(lr_now)
        if ckpt_path is not None and rank == 0:
            _check_finite_weights(params, stage, epoch, last_good, ckpt_path)
            training_state = {
                "stage": stage.name,
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "history": history,
                "seed": seed,
            }
            model_checkpoint.save(model, ckpt_path, training=training_state)
            last_good = str(ckpt_path)
        if distributed:
            torch.distributed.barrier()
        if show:
            where = f"{stage.name} " if len(plan) > 1 else ""
            _write(f"{where}epoch {epoch + 1}/{stage.epochs}  loss {mean_loss:.6g}  lr {lr_now:.3g}  ({time.perf_counter() - started:.1f} s)")


DIVERGENCE_FACTOR = 100.0
"""A stage whose last epoch loss exceeds its best by this many times ``max(1, |best|)`` has diverged."""


def _divergence(stage: str, losses: list[float]) -> str | None:
    """A warning when the loss ended far above its best: a diverged run whose loss stayed finite."""
    if len(losses) < 2:
        return None
    best = min(losses)
    best_epoch = losses.index(best) + 1
    if losses[-1] - best <= DIVERGENCE_FACTOR * max(1.0, abs(best)):
        return None
    return (
        f"training diverged in stage {stage!r}: the epoch loss rose from {best:.4g} (epoch {best_epoch}) to "
        f"{losses[-1]:.4g} (epoch {len(losses)}) while staying finite; the model is likely useless. Lower the "
        "learning rate (CLI: --lr) or keep gradient clipping on"
    )


def _run_epoch(
    loss_module, loader, optimizer, params, scaler, stage, amp_dtype, device, distributed, world,
    finite_data, last_good, ckpt_path, show, prefix, epoch, caching=None,
) -> float:
    """One epoch; ``caching = (cache, model)`` while the feature cache is being built: each image
    batch's frozen features are computed here, stored, and passed to the loss instead of the images."""
    total, count = 0.0, 0
    desc = f"{prefix}epoch {epoch + 1}/{stage.epochs}" + (" (caching features)" if caching is not None else "")
    bar = _progress(loader, desc, show)
    for step, raw in enumerate(bar):
        batch = as_batch(raw)
        if not finite_data and "image" in batch:
            # On the CPU (before the copy): a cheap pass over host memory, no device sync.
            check_finite_images(batch["image"], batch_paths(batch), f"training batch {step + 1} of epoch {epoch + 1}")
        if caching is not None and INDEX_KEY in batch:
            batch = _cache_batch(caching[0], caching[1], batch, amp_dtype, device)
        batch.pop(INDEX_KEY, None)
        batch = batch_to_device(batch, device)
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with autocast:
            loss = loss_module(batch)
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
        norm = torch.nn.utils.clip_grad_norm_(params, stage.grad_clip) if stage.grad_clip is not None else None
        if norm is not None and scaler is None:
            value, norm_value = torch.stack([reported, norm.detach().to(reported.device, torch.float32)]).tolist()
        else:
            value, norm_value = reported.item(), 0.0
        if not math.isfinite(value) or not math.isfinite(norm_value):
            optimizer.zero_grad(set_to_none=True)
            what, bad = ("loss", value) if not math.isfinite(value) else ("gradient norm", norm_value)
            raise RuntimeError(_non_finite_message(what, bad, f"epoch {epoch + 1}, step {step + 1}", last_good, ckpt_path))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        total += value
        count += 1
        if show and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{value:.4g}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
    if count == 0:
        raise ValueError(
            f"data: produced no batch in this epoch (batch size {stage.batch_size}"
            + (", incomplete last batch dropped by the recipe: give at least that many images or a smaller batch size)" if stage.drop_last else ")")
        )
    return total / count


def _check_finite_weights(params: list[torch.Tensor], stage: TrainStage, epoch: int, last_good: str | None, ckpt_path: Path) -> None:
    """Refuse to checkpoint non-finite weights (one reduction, one read per epoch)."""
    with torch.no_grad():
        finite = bool(torch.isfinite(torch.stack([p.detach().float().abs().amax() for p in params if p.numel()])).all())
    if not finite:
        where = f"the end of epoch {epoch + 1} (stage {stage.name!r})"
        raise RuntimeError(_non_finite_message("weights", float("nan"), where, last_good, ckpt_path))


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


def _non_finite_message(what: str, value: float, where: str, last_good: str | None, ckpt_path: Path | None) -> str:
    if last_good:
        restore = f"The last good checkpoint is {last_good} (not replaced); continue from it with resume=True (CLI: --resume) "
    elif ckpt_path is not None:
        restore = f"No checkpoint was written yet (the first, {ckpt_path}, is written at the end of the first epoch). Start again "
    else:
        restore = "No checkpoint was written (pass out_dir to keep one per epoch). Start again "
    return (
        f"non-finite training {what} ({value}) at {where}; {'this step was not applied' if what != 'weights' else 'no checkpoint was written'}. "
        f"{restore}after lowering the learning rate, disabling AMP or checking the input images for NaN/Inf."
    )


def _progress(loader: Any, desc: str, show: bool):
    if not show:
        return loader
    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(loader, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _write(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message)
