"""Checkpoints: atomic writes (temporary file in the same folder + ``os.replace``) and resume.

A checkpoint is a ``torch.save`` dict::

    {"format": 1, "model": model.state_dict(), "config": model.config.to_dict() or None,
     "optimizer": ..., "scheduler": ..., "scaler": ..., "epoch": last finished epoch (0-based),
     "history": {...}, "versions": {"msflow_fast", "torch", "python"}}

The whole model state (backbone included) is stored, so models with randomly initialised backbones
reload exactly.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_NAME", "atomic_write_bytes", "atomic_write_json", "load_checkpoint", "save_checkpoint", "versions"]

CHECKPOINT_NAME = "last.pt"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    from .. import __version__

    return {"msflow_fast": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a partial one."""
    return _atomic(Path(path), lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _config_dict(model: torch.nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return config.to_dict()
    return None


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
    """Atomically save the model (and training state) to ``path``.

    Args:
        epoch: index (0-based) of the last finished epoch; ``-1`` for an untrained model.
    """
    state = {
        "format": FORMAT_VERSION,
        "model": model.state_dict(),
        "config": _config_dict(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "history": history or {},
        "versions": versions(),
    }
    if extra:
        state.update(extra)
    return _atomic(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable msflow_fast checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or "model" not in state or "format" not in state:
        raise ValueError(f"not an msflow_fast checkpoint: {path} (missing 'model'/'format' entries)")
    state["path"] = str(path)
    return state
