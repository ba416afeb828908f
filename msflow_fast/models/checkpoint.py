"""Checkpoints: one format for every registered model.

:func:`save` writes, atomically, a ``torch.save`` dict of tensors and plain values only::

    {
        "format": "msflow_fast",
        "format_version": 3,
        "model": "msflow",                       # registry name (models.registry)
        "config": model.config.to_dict(),
        "weights": {name: tensor},               # the state_dict, less pretrained extractors
        "extractors": {prefix: {"source": "pretrained" | "random" | "module", "class": str}},
        "versions": {"msflow_fast", "torch", "python"},
        "training": {...},                       # only in training checkpoints (the engine's state)
    }

Frozen extractors (:class:`~msflow_fast.models.extractor.FeatureExtractor`) with
``source="pretrained"`` are not stored: :func:`load_model` rebuilds them from the config with timm's
pretrained weights, which **needs network access or those weights in the timm / Hugging Face
cache**. A ``"random"`` extractor (a timm name without pretrained weights) or a ``"file"`` one (a
timm name whose weights a loader read from another file, e.g. an anomalib checkpoint) is stored
and rebuilt without a download; a ``"module"`` extractor (a user-supplied backbone) is stored, and
loading needs an instance of its class through ``backbone=``.

Reading is :func:`read`: ``torch.load(weights_only=True)`` (a file holding any other Python object
is refused before anything in it runs), then one validation. Format 2 files (msflow_fast 0.1,
MSFlow only) are read and upgraded in memory.
"""

from __future__ import annotations

import os
import pickle
import platform
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import atomic_write
from .._version import __version__
from . import registry
from .base import AnomalyModel
from .extractor import FeatureExtractor

FORMAT = "msflow_fast"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
_REQUIRED = ("model", "config", "weights", "extractors")


def versions() -> dict[str, str]:
    """Versions recorded in every checkpoint: ``{"msflow_fast", "torch", "python"}``."""
    return {"msflow_fast": str(__version__), "torch": str(torch.__version__), "python": platform.python_version()}


def frozen_extractors(model: nn.Module) -> dict[str, FeatureExtractor]:
    """``{state_dict prefix: extractor}`` of every :class:`FeatureExtractor` in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FeatureExtractor)}


def _stored_keys(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, str]]]:
    extractors = frozen_extractors(model)
    skip = tuple(f"{prefix}." for prefix, e in extractors.items() if e.source == "pretrained")
    weights = {k: v for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}
    meta = {prefix: {"source": e.source, "class": type(e.backbone).__name__} for prefix, e in extractors.items()}
    return weights, meta


def checkpoint_state(model: AnomalyModel, training: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint dict of a registered ``model`` (layout in the module docstring).

    The tensors are the model's own (not copies). ``training`` is stored as given (the engine's
    training state: plain values and tensors).

    Raises:
        TypeError: ``model`` is not a registered :class:`~msflow_fast.models.base.AnomalyModel`.
    """
    if not isinstance(model, AnomalyModel) or not model.name:
        raise TypeError(
            f"model must be a registered AnomalyModel (see msflow_fast.models.registry), got {type(model).__name__}"
        )
    weights, extractors = _stored_keys(model)
    state: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.name,
        "config": model.config.to_dict(),
        "weights": weights,
        "extractors": extractors,
        "versions": versions(),
    }
    if training is not None:
        state["training"] = dict(training)
    return state


def save(model: AnomalyModel, path: str | os.PathLike, training: Mapping[str, Any] | None = None) -> Path:
    """Write :func:`checkpoint_state` of ``model`` to ``path`` atomically (old file or new, never a part).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return write_torch(path, checkpoint_state(model, training), "checkpoint")


def write_torch(path: str | os.PathLike, obj: Any, what: str = "file") -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically; a failed write (disk full, read-only) is an
    ``OSError`` that names the file, and the previous file stays as it was."""
    try:
        return atomic_write(path, lambda f: torch.save(obj, f))
    except RuntimeError as exc:  # torch's zip writer reports a failed write as a RuntimeError
        text = str(exc)
        if "PytorchStreamWriter" not in text and "file write failed" not in text and "enforce fail" not in text:
            raise
        first = next((line.strip() for line in text.splitlines() if "failed" in line), text.splitlines()[0] if text else "")
        raise OSError(
            f"cannot write {what} {os.fspath(path)}: the disk is full or the folder is not writable ({first}); "
            "the previous file, if any, is unchanged"
        ) from exc


# ---------------------------------------------------------------------------------------------- reading


def _torch_load(path: str, map_location: Any) -> Any:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} is not a file")
    _check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        detail = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error" in line), text.splitlines()[0] if text else "")
        raise ValueError(
            f"cannot read checkpoint {path!r}: it holds Python objects other than tensors and plain values, "
            f"which are never loaded (loading them could run code from the file) ({detail})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, ImportError, KeyError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise ValueError(
            f"cannot read checkpoint {path!r}: the file is corrupt, truncated or not written by torch.save "
            f"({type(exc).__name__}: {first})"
        ) from exc


def _check_archive(path: str) -> None:
    """Verify the CRC-32 of every entry of a zip-format ``torch.save`` file (torch.load does not:
    flipped bytes inside a tensor would load as wrong weights)."""
    if not zipfile.is_zipfile(path):
        return  # a legacy (non-zip) file, or not a checkpoint: torch.load reports it
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot read checkpoint {path!r}: the file is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    if bad is not None:
        raise ValueError(
            f"cannot read checkpoint {path!r}: its entry {bad!r} fails its CRC check, so the file is corrupt "
            "(damaged on disk or in a copy); use another copy"
        )


def load_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file (no validation).

    Raises:
        FileNotFoundError: no such file.
        ValueError: corrupt, truncated, or holding Python objects other than tensors and plain values.
    """
    return _torch_load(os.fspath(path), map_location)


def read_source(source: str | os.PathLike | Mapping, map_location: Any = "cpu", given: str = "the checkpoint") -> tuple[Any, str]:
    """``(contents, where)`` of a weights source: a file (:func:`load_file`; ``where`` is its quoted
    path) or an already loaded mapping (returned as it is; ``where`` is ``given``). ``where`` names
    the source in error messages.

    Raises:
        TypeError: neither a path nor a mapping.
        FileNotFoundError, ValueError: as :func:`load_file`.
    """
    if isinstance(source, Mapping):
        return source, given
    if isinstance(source, (str, os.PathLike)):
        return load_file(source, map_location), repr(os.fspath(source))
    raise TypeError(f"checkpoint must be a path or a dict, got {type(source).__name__}")


def _upgrade_v2(state: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A format 2 checkpoint (``kind="msflow"``: ``flows`` + optional ``backbone``) in the format 3 layout."""
    if state.get("kind") != "msflow":
        raise ValueError(
            f"{source} is a format 2 checkpoint of kind {state.get('kind')!r} (a generic module), which this "
            "version cannot rebuild; load its 'state_dict' entry into the model by hand"
        )
    for key in ("config", "flows", "backbone_source"):
        if key not in state:
            raise ValueError(f"{source} is incomplete: the format 2 checkpoint lacks {key!r}")
    weights = dict(state["flows"])
    source_kind = state["backbone_source"]
    if source_kind != "pretrained":
        if "backbone" not in state:
            raise ValueError(f"{source} is incomplete: its backbone ({source_kind}) weights are missing")
        weights.update({f"extractor.backbone.{k}": v for k, v in state["backbone"].items()})
    out = {k: v for k, v in state.items() if k not in ("kind", "flows", "backbone", "backbone_source", "backbone_class", "channels")}
    out.update(
        format_version=FORMAT_VERSION,
        model="msflow",
        weights=weights,
        extractors={"extractor": {"source": source_kind, "class": str(state.get("backbone_class", ""))}},
        upgraded_from=2,
    )
    return out


def validate(state: object, source: str = "checkpoint") -> dict[str, Any]:
    """Check the layout of a loaded checkpoint (upgrading format 2); returns the format 3 dict.

    Args:
        state: the loaded object.
        source: what to call it in messages (the file name).

    Raises:
        ValueError: not this package's format (an official MSFlow file gets a pointer to its
            loader), an unreadable version, missing entries or an unknown model name.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"{source} is not an {FORMAT} checkpoint: it holds a {type(state).__name__}, not a dict")
    if "parallel_flows" in state and "fusion_flow" in state:
        raise ValueError(
            f"{source} is an official MSFlow checkpoint; load it with "
            "msflow_fast.models.msflow.load_official(model, path)"
        )
    if state.get("format") != FORMAT:
        raise ValueError(
            f"{source} is not an {FORMAT} checkpoint (expected 'format': {FORMAT!r}, got keys {sorted(map(str, state))[:8]})"
        )
    version = state.get("format_version")
    if not isinstance(version, int) or version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise ValueError(
            f"{source} has format_version {version!r}; this msflow_fast reads versions {list(READABLE_VERSIONS)}"
            + (" (upgrade msflow_fast)" if newer else "")
        )
    if version == 2:
        state = _upgrade_v2(state, source)
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise ValueError(f"{source} is incomplete: it lacks {missing}")
    if not isinstance(state["weights"], Mapping) or not all(isinstance(v, torch.Tensor) for v in state["weights"].values()):
        raise ValueError(f"{source}: 'weights' must map names to tensors")
    if not isinstance(state["config"], Mapping):
        raise ValueError(f"{source}: 'config' must be a dict, got {type(state['config']).__name__}")
    for prefix, meta in state["extractors"].items():
        if not isinstance(meta, Mapping) or meta.get("source") not in FeatureExtractor.SOURCES:
            raise ValueError(f"{source}: extractor {prefix!r} has no valid source (one of {FeatureExtractor.SOURCES})")
    try:
        registry.get(state["model"])
    except ValueError as exc:
        raise ValueError(f"{source} holds a model this installation does not have: {exc}") from None
    return dict(state)


def read(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint file; returns the (format 3) dict with ``"path"`` added.

    ``path`` may be a training run's folder (its ``last.pt`` is read). Only tensors and plain
    values are unpickled: a file that holds anything else is refused before it can run code.

    Raises:
        FileNotFoundError: no such file.
        ValueError: corrupt, truncated or foreign file; the message names it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    state = validate(_torch_load(os.fspath(path), map_location), f"checkpoint {str(path)!r}")
    state["path"] = str(path)
    return state


def _source_name(state: Mapping[str, Any]) -> str:
    return f"checkpoint {state['path']!r}" if "path" in state else "the checkpoint"


def load_weights(model: AnomalyModel, state: Mapping[str, Any], *, strict: bool = True) -> AnomalyModel:
    """Load the weights of a checkpoint dict (from :func:`read`) into an existing ``model``, in place.

    Pretrained extractors (not stored) keep the model's own weights.

    Raises:
        TypeError: the checkpoint holds another model than ``model``.
        ValueError: the weights do not match the model (the message names the keys).
    """
    state = validate(state, _source_name(state))
    if state["model"] != getattr(model, "name", None):
        raise TypeError(f"{_source_name(state)} holds a {state['model']!r} model, not a {getattr(model, 'name', type(model).__name__)!r}")
    _check_shapes(model, state)
    missing, unexpected = model.load_state_dict(state["weights"], strict=False)
    not_stored = tuple(f"{p}." for p, meta in state["extractors"].items() if meta["source"] == "pretrained")
    missing = [k for k in missing if not (not_stored and k.startswith(not_stored))]
    if strict and (missing or unexpected):
        raise ValueError(
            f"{_source_name(state)} does not match the model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    return model


def _check_shapes(model: nn.Module, state: Mapping[str, Any]) -> None:
    own = model.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in state["weights"].items()
        if k in own and own[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(
            f"{_source_name(state)} does not match the model (different architecture or backbone?): "
            + "; ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else "")
        )


def load_model(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    *,
    backbone: nn.Module | None = None,
    map_location: Any = "cpu",
    strict: bool = True,
    **overrides: Any,
) -> AnomalyModel:
    """Build the model a checkpoint holds (any registered model) and load its weights.

    The backbone comes from ``backbone`` (a module of the stored class: the stored weights are
    loaded into it), else from the stored weights (``"random"``: built without a download), else
    (``"pretrained"``) from timm's pretrained weights (network access or the local cache). A
    ``"module"`` backbone needs ``backbone``.

    Args:
        checkpoint: a path (a file, or a run folder holding ``last.pt``) or a dict from :func:`read`.
        backbone: an ``nn.Module`` to use as the backbone.
        map_location: passed to ``torch.load``.
        strict: as in ``load_state_dict``.
        **overrides: config fields to change that do not decide stored weights (e.g.
            ``score="log_space"``); the model's ``fixed_on_load`` fields are refused.

    Raises:
        FileNotFoundError: no such file.
        ValueError: corrupt, truncated or foreign file, a missing backbone module, refused
            overrides or weights that do not match (the message names the file).
    """
    if isinstance(checkpoint, Mapping):
        state = validate(checkpoint, _source_name(checkpoint))
        if "path" in checkpoint:
            state["path"] = checkpoint["path"]
    elif isinstance(checkpoint, (str, os.PathLike)):
        state = read(checkpoint, map_location=map_location)
    else:
        raise TypeError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
    cls = registry.get(state["model"])
    fixed = sorted(set(overrides) & set(cls.fixed_on_load))
    if fixed:
        raise ValueError(f"cannot override {fixed} when loading a checkpoint (they decide the stored weights); pass backbone= instead")
    module_sources = [p for p, meta in state["extractors"].items() if meta["source"] == "module"]
    if module_sources and backbone is None:
        meta = state["extractors"][module_sources[0]]
        raise ValueError(
            f"{_source_name(state)} was saved with a user-supplied backbone ({meta.get('class')}); pass an "
            "instance of it as backbone= (its weights are replaced by the stored ones)"
        )
    try:
        config = cls.config_class.from_dict(dict(state["config"]))
        if overrides:
            config = config.replace(**overrides)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{_source_name(state)} has a config this version cannot use: {exc}") from exc
    # Stored backbone weights replace timm's pretrained ones: build without the download.
    stored = any(meta["source"] in ("random", "file") for meta in state["extractors"].values())
    build = config.replace(pretrained=False) if stored and getattr(config, "pretrained", False) else config
    model = cls(build, backbone=backbone)
    model.config = config
    modules = dict(model.named_modules())
    for prefix, meta in state["extractors"].items():
        if isinstance(modules.get(prefix), FeatureExtractor):
            modules[prefix].source = meta["source"]
    return load_weights(model, state, strict=strict)


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "checkpoint_state",
    "write_torch",
    "frozen_extractors",
    "load_file",
    "load_model",
    "load_weights",
    "read",
    "read_source",
    "save",
    "validate",
    "versions",
]
