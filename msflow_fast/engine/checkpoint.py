"""Training checkpoints: the model checkpoint of :mod:`msflow_fast.model.checkpoint` plus a
``"training"`` entry, written atomically (temporary file in the same folder + ``os.replace``).

Layout (``torch.save`` dict)::

    {**msflow_fast.model.checkpoint_state(model),       # format, format_version, kind, config,
                                                         # flows (+ backbone when needed), versions
     "training": {"optimizer": ..., "scheduler": ..., "scaler": ... or None,
                  "epoch": last finished epoch (0-based), "history": {"loss": [...], "lr": [...]}}}

So ``last.pt`` is also a model checkpoint: ``msflow_fast.model.load_checkpoint("last.pt")`` rebuilds
the MSFlow from it. Models that are not an MSFlow (anything following the engine's ``loss`` /
``predict`` protocol) are stored with ``kind="module"``: their full ``state_dict``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..model import atomic_write, checkpoint_state, read_checkpoint, versions, write_checkpoint

__all__ = ["CHECKPOINT_NAME", "atomic_write_bytes", "atomic_write_json", "load_checkpoint", "save_checkpoint", "versions"]

CHECKPOINT_NAME = "last.pt"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a partial one."""
    return Path(atomic_write(path, lambda f: f.write(data)))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    epoch: int = -1,
    history: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Atomically save the model checkpoint plus the training state to ``path``.

    Args:
        epoch: index (0-based) of the last finished epoch; ``-1`` for an untrained model.
        extra: more top-level entries (must not replace the checkpoint's own).
    """
    state = checkpoint_state(model)
    state["training"] = {
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "history": history or {},
    }
    if extra:
        clash = sorted(set(extra) & set(state))
        if clash:
            raise ValueError(f"extra: entries {clash} would overwrite checkpoint fields")
        state.update(extra)
    return Path(write_checkpoint(state, path))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint (a training checkpoint, or a model checkpoint without ``"training"``).

    Args:
        path: the file, or a folder holding ``last.pt``.

    Returns:
        The checkpoint dict, with ``"path"`` (the file read) added.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is corrupt, truncated or not an msflow_fast checkpoint (the message
            names the file).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = read_checkpoint(path, map_location=map_location)
    state["path"] = str(path)
    return state
