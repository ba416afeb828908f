"""Frozen features computed once per dataset: the cache behind ``fit(feature_cache=...)``.

A model's frozen part (:meth:`~msflow_fast.models.base.AnomalyModel.frozen_features`: a frozen
backbone and what follows it without training) gives an image the same output in every epoch,
so once the data pipeline is deterministic recomputing it is wasted work. ``fit`` then keeps the
features that a stage's first epoch computes anyway, computes those that epoch did not see (an
incomplete last batch the recipe drops), and trains every later epoch on the cache: the same
batches in the same order, hence the same training (per-epoch losses equal to float32 rounding;
only the frozen part's batch grouping differs).

Policy (``fit(feature_cache=)``, CLI ``--feature-cache``):

- ``"auto"`` (default): on for a map-style dataset that declares ``deterministic_items`` (no
  random augmentation: :func:`~msflow_fast.engine.data.deterministic_items`) and a model with
  frozen features; in memory when it fits :func:`memory_budget`, else on disk in the run folder
  (``out_dir``), else off. A disk cache left by an earlier run with the same key is reused.
- ``"memory"`` / ``"disk"``: forced (for a dataset that does not declare itself deterministic:
  the caller vouches for it). ``"disk"`` needs ``out_dir`` and a dataset ``fingerprint()``.
- ``"off"``: the backbone runs in every epoch.

On disk, ``out_dir/feature_cache/`` holds one raw file per feature map (``features_<k>.bin``,
read memory-mapped: no unpickling) and ``meta.json`` (key, shapes, dtypes, labels, paths). It is
written in a hidden ``.feature_cache.partial.*`` folder and renamed into place when complete, so
a reader never sees half of one (a killed writer's partial folder is removed by the next run in
that folder). Its key is a sha256 of the model's ``frozen_fingerprint()`` (frozen weights and
config), the dataset's ``fingerprint()`` (each file's path, size and modification time, the
input size), the stage, the autocast dtype, the storage dtype and the torch version: a stale
cache is never used.

Distributed (``torchrun``): each rank computes the features of its shard in the first epoch;
the ranks then exchange them (one all-reduce per map) so that any later epoch can draw any
batch. Under DDP the cache lives in memory.

``feature_cache_dtype="bfloat16"`` stores features in bf16 (half the memory); they are cast back
to their own dtype per batch. That rounds the flows' inputs: no longer the same training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = [
    "INDEX_KEY",
    "CACHE_FOLDER",
    "CACHE_MODES",
    "CacheReport",
    "FeatureCache",
    "IndexedDataset",
    "IndexDataset",
    "cache_key",
    "memory_budget",
    "storage_dtype",
]

CACHE_MODES = ("auto", "off", "memory", "disk")
CACHE_FOLDER = "feature_cache"
INDEX_KEY = "_cache_index"
KEPT_ENTRIES = ("label", "path", "defect")
"""Batch entries the cache keeps besides the features (masks are not kept: see ``frozen_features``)."""
_FORMAT = 1


@dataclass
class CacheReport:
    """What the feature cache of a stage did (``FitResult.feature_cache``).

    Attributes:
        storage: ``"memory"``, ``"disk"`` or ``"off"``.
        reason: why that storage (e.g. why it is off), for the user.
        bytes: size of the cached features (bytes).
        items: images cached.
        path: the disk cache folder (``None`` in memory).
        reused: a complete disk cache from an earlier run was used (no backbone pass at all).
        build_seconds: time spent in the frozen part while the cache was built (first epoch and
            the images it did not see).
    """

    storage: str
    reason: str
    bytes: int = 0
    items: int = 0
    path: str | None = None
    reused: bool = False
    build_seconds: float = 0.0


def memory_budget() -> int:
    """Bytes a memory cache may take: half of the memory available now (Linux ``MemAvailable``;
    elsewhere half of the free physical pages, else 2 GiB)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def storage_dtype(value: Any) -> torch.dtype | None:
    """``None`` (keep the features' dtype), or ``"bfloat16"`` / ``"float16"`` / ``"float32"``."""
    if value is None or isinstance(value, torch.dtype):
        return value
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if value not in names:
        raise ValueError(f"feature_cache_dtype: expected None, 'bfloat16', 'float16' or 'float32', got {value!r}")
    return names[value]


def cache_key(model: Any, data: Any, stage: str, amp_dtype: torch.dtype | None, stored: torch.dtype | None) -> str | None:
    """The disk cache's key (sha256 hex), or ``None`` when the model or the dataset has no fingerprint."""
    frozen = model.frozen_fingerprint() if callable(getattr(model, "frozen_fingerprint", None)) else None
    dataset = data.fingerprint() if callable(getattr(data, "fingerprint", None)) else None
    if frozen is None or dataset is None:
        return None
    parts = {"format": _FORMAT, "model": frozen, "data": dataset, "stage": stage, "amp": str(amp_dtype),
             "stored": str(stored), "torch": torch.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class IndexedDataset(Dataset):
    """``data`` whose items are dicts that also carry their index (``"_cache_index"``)."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.data[index]
        out = {"image": item} if isinstance(item, torch.Tensor) else dict(item)
        out[INDEX_KEY] = index
        return out


class IndexDataset(Dataset):
    """``0..n-1``: the items of an epoch served from the cache (``collate_fn=cache.batch``)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class FeatureCache:
    """The frozen features of one dataset for one stage: ``[N, ...]`` per feature map.

    Filled by :meth:`store` (rows by index), completed by :meth:`finish`, read by :meth:`batch`.

    Args:
        size: items in the dataset (``N``).
        storage: ``"auto"``, ``"memory"`` or ``"disk"`` (decided on the first :meth:`store`,
            when the features' size is known).
        folder: the run folder (``out_dir``) for a disk cache, or ``None``.
        key: the disk cache's key (:func:`cache_key`), or ``None``.
        stored: storage dtype (``None``: the features' own).
        budget: bytes a memory cache may take (``auto``).
        distributed: under DDP (memory only).
    """

    def __init__(self, size: int, *, storage: str, folder: str | os.PathLike | None, key: str | None,
                 stored: torch.dtype | None, budget: int, distributed: bool) -> None:
        self.size = int(size)
        self.storage, self.folder, self.key, self.stored = storage, Path(folder) if folder is not None else None, key, stored
        self.budget, self.distributed = int(budget), distributed
        self.filled = torch.zeros(self.size, dtype=torch.bool)
        self.maps: list[torch.Tensor] | None = None
        self.dtypes: list[torch.dtype] = []
        self.labels = torch.zeros(self.size, dtype=torch.long)
        self.paths = [""] * self.size
        self.defects = [""] * self.size
        self.entries: set[str] = set()
        self.active = True
        self.complete = False
        self.report = CacheReport(storage="memory" if storage == "memory" else storage, reason="")
        self._partial: Path | None = None

    # ------------------------------------------------------------------ reuse

    @classmethod
    def open(cls, folder: str | os.PathLike, key: str, size: int) -> "FeatureCache | None":
        """The complete disk cache in ``folder/feature_cache`` if its key and size match, else ``None``."""
        final = Path(folder) / CACHE_FOLDER
        try:
            meta = json.loads((final / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, Mapping) or meta.get("format") != _FORMAT or meta.get("key") != key or meta.get("size") != size:
            return None
        cache = cls(size, storage="disk", folder=folder, key=key, stored=None, budget=0, distributed=False)
        maps, dtypes = [], []
        try:
            for k, entry in enumerate(meta["maps"]):
                shape = [int(v) for v in entry["shape"]]
                stored_dtype = getattr(torch, entry["stored"])
                numel = size * math.prod(shape)
                path = final / f"features_{k}.bin"
                if path.stat().st_size != numel * torch.empty((), dtype=stored_dtype).element_size():
                    return None
                maps.append(torch.from_file(str(path), shared=False, size=numel, dtype=stored_dtype).view(size, *shape))
                dtypes.append(getattr(torch, entry["dtype"]))
            cache.labels = torch.tensor([int(v) for v in meta["labels"]], dtype=torch.long)
            cache.paths = [str(v) for v in meta["paths"]]
            cache.defects = [str(v) for v in meta["defects"]]
            cache.entries = set(meta["entries"]) & set(KEPT_ENTRIES)
        except (KeyError, TypeError, ValueError, AttributeError, OSError, RuntimeError):
            return None
        if len(cache.labels) != size or len(cache.paths) != size or len(cache.defects) != size:
            return None
        cache.maps, cache.dtypes = maps, dtypes
        cache.filled[:] = True
        cache.complete = True
        cache.report = CacheReport("disk", "reused the complete disk cache of an earlier run with the same key",
                                   bytes=sum(m.numel() * m.element_size() for m in maps), items=size, path=str(final), reused=True)
        return cache

    # ------------------------------------------------------------------ filling

    def deactivate(self, reason: str) -> None:
        """Stop caching (the epoch goes on computing features); frees what was stored."""
        self.abort()
        self.active, self.maps = False, None
        self.report = CacheReport("off", reason)

    def _allocate(self, features: Sequence[torch.Tensor]) -> None:
        shapes = [tuple(f.shape[1:]) for f in features]
        self.dtypes = [f.dtype for f in features]
        stored = [self.stored or d for d in self.dtypes]
        nbytes = sum(self.size * math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in zip(shapes, stored))
        storage = self.storage
        if storage == "auto":
            if nbytes <= self.budget:
                storage = "memory"
            elif self.folder is not None and not self.distributed and self.key is not None:
                storage = "disk"
            else:
                why = "no out_dir for a disk cache" if self.folder is None else (
                    "a disk cache is single-process" if self.distributed else "the dataset has no fingerprint() to key a disk cache")
                self.deactivate(f"off: the features would take {_size(nbytes)}, over the memory budget of "
                                f"{_size(self.budget)}, and {why}")
                return
        if storage == "memory":
            self.maps = [torch.empty((self.size, *s), dtype=d) for s, d in zip(shapes, stored)]
            self.report = CacheReport("memory", f"in memory ({_size(nbytes)})", bytes=nbytes, items=self.size)
        else:
            assert self.folder is not None
            self.folder.mkdir(parents=True, exist_ok=True)
            self._partial = Path(tempfile.mkdtemp(dir=self.folder, prefix=f".{CACHE_FOLDER}.partial."))
            maps = []
            for k, (s, d) in enumerate(zip(shapes, stored)):
                path = self._partial / f"features_{k}.bin"
                numel = self.size * math.prod(s)
                with open(path, "wb") as f:
                    f.truncate(numel * torch.empty((), dtype=d).element_size())
                maps.append(torch.from_file(str(path), shared=True, size=numel, dtype=d).view(self.size, *s))
            self.maps = maps
            why = "as asked" if self.storage == "disk" else f"over the memory budget of {_size(self.budget)}"
            self.report = CacheReport("disk", f"on disk ({_size(nbytes)}, {why})",
                                      bytes=nbytes, items=self.size, path=str(self.folder / CACHE_FOLDER))

    def store(self, indices: torch.Tensor, features: Sequence[torch.Tensor], batch: Mapping[str, Any]) -> None:
        """Keep the rows ``indices [B]`` of ``features`` (``[B, ...]`` each) and the batch's kept entries."""
        if not self.active or self.complete:
            return
        if self.maps is None:
            self._allocate(features)
            if not self.active:
                return
        assert self.maps is not None
        if len(features) != len(self.maps) or any(tuple(f.shape[1:]) != tuple(m.shape[1:]) for f, m in zip(features, self.maps)):
            got = [tuple(f.shape[1:]) for f in features]
            self.deactivate(f"off: the features' shapes changed between batches ({[tuple(m.shape[1:]) for m in self.maps]} "
                            f"then {got}); images of different sizes cannot be cached")
            return
        idx = torch.as_tensor(indices, dtype=torch.long).cpu()
        for m, f in zip(self.maps, features):
            m[idx] = f.detach().to("cpu", m.dtype)
        self.filled[idx] = True
        rows = idx.tolist()
        for name in KEPT_ENTRIES:
            if name not in batch:
                continue
            self.entries.add(name)
            value = batch[name]
            if name == "label":
                self.labels[idx] = torch.as_tensor(value).cpu().long().reshape(-1)
            else:
                target = self.paths if name == "path" else self.defects
                for i, v in zip(rows, value):
                    target[i] = str(v)

    def missing(self) -> list[int]:
        """Indices not stored yet."""
        return (~self.filled).nonzero().flatten().tolist()

    def share(self, compute_missing) -> None:
        """Under DDP: every rank ends with every row. Rows no rank has are computed round-robin by
        ``compute_missing(indices)`` (which calls :meth:`store`), then one all-reduce per map."""
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

        active = torch.tensor([1 if self.active else 0], device=device)
        dist.all_reduce(active, op=dist.ReduceOp.MIN)
        if not int(active.item()):
            if self.active:
                self.deactivate("off: the cache is off on another rank (all ranks must hold it)")
            return

        def gather_filled() -> torch.Tensor:
            filled = self.filled.to(device, torch.uint8)
            parts = [torch.zeros_like(filled) for _ in range(world)]
            dist.all_gather(parts, filled)
            return torch.stack(parts).bool().cpu()

        owners = gather_filled()
        nobody = (~owners.any(0)).nonzero().flatten().tolist()
        compute_missing(nobody[rank::world])
        # every rank must know the shapes (a rank whose shard was empty allocated nothing)
        shapes = [None] * world
        mine = None if self.maps is None else [(tuple(m.shape[1:]), _dtype_name(m.dtype), _dtype_name(d)) for m, d in zip(self.maps, self.dtypes)]
        dist.all_gather_object(shapes, mine)
        reference = next((s for s in shapes if s is not None), None)
        if reference is None:
            return
        if self.maps is None:
            self.maps = [torch.zeros((self.size, *s), dtype=getattr(torch, st)) for s, st, _ in reference]
            self.dtypes = [getattr(torch, d) for *_, d in reference]
        owners = gather_filled()
        if not owners.any(0).all():
            raise RuntimeError("feature cache: some images were cached by no rank; run with feature_cache='off'")
        first = owners.int().argmax(0)  # the lowest rank holding each row contributes it
        keep = first == rank
        for k, m in enumerate(self.maps):
            contribution = torch.where(keep.view(-1, *([1] * (m.dim() - 1))), m, torch.zeros((), dtype=m.dtype)).to(device)
            dist.all_reduce(contribution)
            self.maps[k] = contribution.cpu()
        labels = torch.where(keep, self.labels, torch.zeros((), dtype=torch.long)).to(device)
        dist.all_reduce(labels)
        self.labels = labels.cpu()
        texts: list = [None] * world
        dist.all_gather_object(texts, ({i: (self.paths[i], self.defects[i]) for i in keep.nonzero().flatten().tolist()}, sorted(self.entries)))
        for rows, entries in texts:
            for i, (path, defect) in rows.items():
                self.paths[i], self.defects[i] = path, defect
            self.entries.update(entries)
        self.filled[:] = True
        self.report.bytes = sum(m.numel() * m.element_size() for m in self.maps)

    def finish(self) -> None:
        """Mark the cache complete; a disk cache is written out and renamed into place."""
        if not self.active or self.maps is None:
            return
        if not bool(self.filled.all()):
            raise RuntimeError(f"feature cache: {len(self.missing())} image(s) were never cached")
        self.complete = True
        self.report.items = self.size
        if self._partial is None:
            return
        assert self.folder is not None
        meta = {
            "format": _FORMAT, "key": self.key, "size": self.size, "torch": torch.__version__,
            "maps": [{"shape": list(m.shape[1:]), "dtype": _dtype_name(d), "stored": _dtype_name(m.dtype)} for m, d in zip(self.maps, self.dtypes)],
            "labels": self.labels.tolist(), "paths": self.paths, "defects": self.defects, "entries": sorted(self.entries),
        }
        (self._partial / "meta.json").write_text(json.dumps(meta))
        for path in self._partial.iterdir():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(self._partial, 0o777 & ~_umask())
        final = self.folder / CACHE_FOLDER
        old = None
        if final.exists():
            old = self.folder / f".{CACHE_FOLDER}.old.{os.getpid()}.partial.{time.time_ns()}"
            os.replace(final, old)
        os.replace(self._partial, final)
        self._partial = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove a half-written disk cache (nothing of it is left behind)."""
        if self._partial is not None:
            self.maps = None
            shutil.rmtree(self._partial, ignore_errors=True)
            self._partial = None

    # ------------------------------------------------------------------ reading

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """The batch of items ``indices``: ``"features"`` (each map's rows in its own dtype) and the
        kept entries (``"label"`` ``[B]``, ``"path"``, ``"defect"``) the dataset had."""
        assert self.maps is not None and self.complete
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        out: dict[str, Any] = {"features": [m.index_select(0, idx).to(d) for m, d in zip(self.maps, self.dtypes)]}
        rows = idx.tolist()
        if "label" in self.entries:
            out["label"] = self.labels.index_select(0, idx)
        if "path" in self.entries:
            out["path"] = [self.paths[i] for i in rows]
        if "defect" in self.entries:
            out["defect"] = [self.defects[i] for i in rows]
        return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

