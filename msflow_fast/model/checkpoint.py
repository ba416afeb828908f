"""Checkpoints: this package's one model format, and loading of the official MSFlow checkpoints.

Own format (written by :func:`save_checkpoint`, read by :func:`load_checkpoint`): a ``torch.save``
dict, written atomically (a temporary file in the same folder, then ``os.replace``)::

    {
        "format": "msflow_fast",
        "format_version": 2,
        "kind": "msflow",                   # or "module" (any other nn.Module, see below)
        "config": MSFlowConfig.to_dict(),
        "channels": [C_1, C_2, C_3],        # the backbone's feature channels, checked on load
        "flows": MSFlow.flow_state_dict(),  # parallel flows + fusion flow (no backbone)
        "backbone_source": "pretrained" | "random" | "module",
        "backbone_class": type name of the backbone module,
        "backbone": backbone.state_dict(),  # only for "random" and "module", see below
        "versions": {"msflow_fast", "torch", "python"},
    }

The backbone is frozen, so its weights are stored only when they cannot be rebuilt from the config:

- ``"pretrained"``: a timm name with ``config.pretrained=True``. Not stored; :func:`load_checkpoint`
  rebuilds it from ``config.backbone`` with timm's pretrained weights, which needs network access or
  those weights in the timm / Hugging Face cache (or pass ``backbone=`` to supply the module).
- ``"random"``: a timm name with ``config.pretrained=False`` (random initialisation). Stored; the
  loader builds the timm model without downloading and loads the stored weights.
- ``"module"``: a user-supplied ``nn.Module``. Stored; the loader needs the module back through
  ``backbone=`` (any instance of the same architecture: the stored weights are loaded into it).

``kind="module"`` holds any other ``nn.Module`` (the engine's model protocol): ``"state_dict"``
(its full ``state_dict``) and ``"config"`` (``model.config.to_dict()`` or ``None``) instead of the
flow and backbone entries. It loads into an existing model with :func:`load_checkpoint_state`.

Training checkpoints (``msflow_fast.engine``) are this dict plus a ``"training"`` entry.

Official format (MSFLOW_SPEC.md §1.14): ``torch.save`` of a dict with ``parallel_flows`` (a list
of FrEIA ``SequenceINN`` state dicts, FrEIA 0.2 matrix permutations) and ``fusion_flow`` (a FrEIA
``GraphINN`` state dict whose ``module_list`` order of the per-scale ``PermuteRandom`` modules
changes between processes). Those permutations are mapped to scales by their length.
"""

from __future__ import annotations

import os
import pickle
import platform
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import torch
from torch import nn

from .config import MSFlowConfig
from .msflow import MSFlow

FORMAT = "msflow_fast"
FORMAT_VERSION = 2
BACKBONE_SOURCES = ("pretrained", "random", "module")

_MODULE_KEY = re.compile(r"^module_list\.(\d+)\.(.+)$")


def versions() -> dict[str, str]:
    """Versions recorded in every checkpoint: ``{"msflow_fast", "torch", "python"}``."""
    from .. import __version__

    return {"msflow_fast": str(__version__), "torch": str(torch.__version__), "python": platform.python_version()}


def _torch_load(path: str, map_location: Any, weights_only: bool) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, AttributeError, ImportError) as exc:
        text = str(exc)
        if weights_only and isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
            detail = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error" in line), "")
            raise ValueError(
                f"cannot read checkpoint {path!r}: it holds Python objects other than tensors and plain values, "
                f"which msflow_fast checkpoints never contain, so it is not one of them ({detail})"
            ) from exc
        raise ValueError(
            f"cannot read checkpoint {path!r}: the file is corrupt, truncated or not written by torch.save "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'})"
        ) from exc


def _load_object(source: str | os.PathLike | Mapping, map_location: Any, weights_only: bool = False) -> Mapping:
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(source).__name__}")
    data = _torch_load(os.fspath(source), map_location, weights_only)
    if not isinstance(data, Mapping):
        raise ValueError(f"checkpoint {os.fspath(source)!r} holds a {type(data).__name__}, not a dict")
    return data


def convert_official_fusion_state(fusion_state: Mapping[str, torch.Tensor], channels: list[int]) -> dict[str, torch.Tensor]:
    """Official ``GraphINN`` fusion state dict -> :class:`~msflow_fast.nn.FusionFlow` keys.

    ``module_list.{i}.perm``/``.perm_inv`` go to ``permutations.{k}`` where ``k`` is the scale whose
    channel count equals the permutation's length (scales with equal counts keep their
    ``module_list`` order); the module holding ``subnet_*`` keys goes to ``coupling``.

    Raises:
        ValueError: the permutations do not match ``channels`` or the coupling is missing.
    """
    modules: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in fusion_state.items():
        match = _MODULE_KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected key {key!r} in the fusion_flow state dict (expected module_list.<i>.*)")
        modules.setdefault(int(match.group(1)), {})[match.group(2)] = value
    perms = {i: m for i, m in modules.items() if set(m) == {"perm", "perm_inv"}}
    couplings = [i for i, m in modules.items() if any(k.startswith("subnet_") for k in m)]
    if len(couplings) != 1:
        raise ValueError(f"expected exactly one fusion coupling module (subnet_* keys) in fusion_flow, found {len(couplings)}")
    if len(perms) != len(channels) or len(modules) != len(channels) + 1:
        raise ValueError(
            f"fusion_flow holds {len(perms)} permutations and {len(modules)} modules; expected {len(channels)} "
            f"permutations (one per scale, channels {channels}) and one coupling"
        )
    out: dict[str, torch.Tensor] = {}
    free = list(range(len(channels)))
    for i in sorted(perms):
        length = perms[i]["perm"].numel()
        scale = next((k for k in free if channels[k] == length), None)
        if scale is None:
            raise ValueError(
                f"fusion_flow module_list.{i} permutes {length} channels, which matches no remaining scale of {channels}"
            )
        free.remove(scale)
        out[f"permutations.{scale}.perm"] = perms[i]["perm"].long()
        out[f"permutations.{scale}.perm_inv"] = perms[i]["perm_inv"].long()
    for name, value in modules[couplings[0]].items():
        out[f"coupling.{name}"] = value
    return out


def load_official_checkpoint(
    model: MSFlow, checkpoint: str | os.PathLike | Mapping, *, map_location: Any = "cpu", strict: bool = True
) -> MSFlow:
    """Load an official MSFlow checkpoint (``best_det.pt``, ``last.pt``, ...) into ``model``, in place.

    Args:
        model: an :class:`MSFlow` with the checkpoint's architecture (channels and blocks).
        checkpoint: a path or the loaded dict (keys ``parallel_flows`` and ``fusion_flow``).
        map_location: passed to ``torch.load``.
        strict: as in ``load_state_dict``.

    Returns:
        ``model``.
    """
    data = _load_object(checkpoint, map_location)
    if "parallel_flows" not in data or "fusion_flow" not in data:
        where = f"{os.fspath(checkpoint)!r} is " if isinstance(checkpoint, (str, os.PathLike)) else ""
        raise ValueError(
            f"{where}not an official MSFlow checkpoint: expected the keys 'parallel_flows' and 'fusion_flow', "
            f"got {sorted(map(str, data))[:8]}"
        )
    parallel = data["parallel_flows"]
    if len(parallel) != len(model.parallel_flows.flows):
        raise ValueError(f"checkpoint has {len(parallel)} parallel flows but the model has {len(model.parallel_flows.flows)}")
    for k, (flow, state) in enumerate(zip(model.parallel_flows.flows, parallel)):
        try:
            flow.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise ValueError(f"parallel flow {k} does not match the checkpoint: {exc}") from exc
    model.fusion_flow.load_state_dict(convert_official_fusion_state(data["fusion_flow"], model.channels), strict=strict)
    return model


# ---------------------------------------------------------------------------------------------- own format


def _backbone_source(model: MSFlow) -> str:
    if model.backbone_is_module:
        return "module"
    return "pretrained" if model.config.pretrained else "random"


def checkpoint_state(model: nn.Module) -> dict[str, Any]:
    """The checkpoint dict of ``model`` (see the module docstring for the layout).

    Args:
        model: an :class:`MSFlow` (``kind="msflow"``: config, flow weights, and the backbone weights
            only when the config cannot rebuild them), or any other ``nn.Module``
            (``kind="module"``: its full ``state_dict`` and ``model.config.to_dict()`` if it has one).

    Returns:
        A dict of plain Python values and tensors (the tensors are the model's own, not copies);
        ``torch.load(..., weights_only=True)`` reads it back.
    """
    if isinstance(model, MSFlow):
        source = _backbone_source(model)
        state: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "msflow",
            "config": model.config.to_dict(),
            "channels": list(model.channels),
            "flows": model.flow_state_dict(),
            "backbone_source": source,
            "backbone_class": type(model.extractor.backbone).__name__,
            "versions": versions(),
        }
        if source != "pretrained":
            state["backbone"] = model.extractor.backbone.state_dict()
        return state
    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "module",
            "module_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "config": config.to_dict() if callable(getattr(config, "to_dict", None)) else None,
            "state_dict": model.state_dict(),
            "versions": versions(),
        }
    raise TypeError(f"model must be an nn.Module (an MSFlow for the full format), got {type(model).__name__}")


_REQUIRED = {
    "msflow": ("config", "channels", "flows", "backbone_source"),
    "module": ("state_dict",),
}


def check_checkpoint_state(state: object, source: str = "checkpoint") -> Mapping[str, Any]:
    """Validate the layout of a checkpoint dict; returns it unchanged.

    Args:
        state: the loaded object.
        source: what to call it in error messages (the file name).

    Raises:
        ValueError: not this package's format (an official MSFlow checkpoint gets a pointer to
            :func:`load_official_checkpoint`), an unsupported ``format_version``, or missing entries.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"{source} is not an {FORMAT} checkpoint: it holds a {type(state).__name__}, not a dict")
    if "parallel_flows" in state and "fusion_flow" in state:
        raise ValueError(f"{source} is an official MSFlow checkpoint; load it with load_official_checkpoint(model, path)")
    if state.get("format") != FORMAT:
        if isinstance(state.get("format"), int) and "model" in state:
            raise ValueError(
                f"{source} uses an earlier msflow_fast training-checkpoint layout (format {state['format']}), "
                f"which this version no longer reads; retrain, or load state['model'] into the model by hand"
            )
        raise ValueError(
            f"{source} is not an {FORMAT} checkpoint (expected 'format': {FORMAT!r}, got keys {sorted(map(str, state))[:8]})"
        )
    version = state.get("format_version")
    if not isinstance(version, int) or version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise ValueError(
            f"{source} has format_version {version!r}; this msflow_fast reads version {FORMAT_VERSION}"
            + (" (upgrade msflow_fast)" if newer else "")
        )
    kind = state.get("kind")
    if kind not in _REQUIRED:
        raise ValueError(f"{source}: unknown checkpoint kind {kind!r} (expected one of {sorted(_REQUIRED)})")
    missing = [key for key in _REQUIRED[kind] if key not in state]
    if kind == "msflow" and state.get("backbone_source") in ("random", "module") and "backbone" not in state:
        missing.append("backbone")
    if missing:
        raise ValueError(f"{source} is incomplete: the {kind!r} checkpoint lacks {missing}")
    if kind == "msflow" and state["backbone_source"] not in BACKBONE_SOURCES:
        raise ValueError(f"{source}: backbone_source must be one of {BACKBONE_SOURCES}, got {state['backbone_source']!r}")
    return state


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> str:
    """Create or replace ``path`` so that readers see the old file or the new one, never a part.

    ``write(f)`` fills a temporary file in the same folder (created if needed); it is flushed to
    disk, then renamed over ``path``. On any error the temporary file is removed. Returns ``path``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> str:
    """``torch.save`` ``state`` to ``path`` atomically (see :func:`atomic_write`). Returns ``path``."""
    return atomic_write(path, lambda f: torch.save(dict(state), f))


def read_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint file (``weights_only`` unpickling: tensors and plain values only).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is corrupt or truncated, or not in this package's format; the
            message names the file.
    """
    path = os.fspath(path)
    state = _torch_load(path, map_location, weights_only=True)
    check_checkpoint_state(state, f"checkpoint {path!r}")
    return state


def load_checkpoint_state(model: nn.Module, state: Mapping[str, Any], *, strict: bool = True) -> nn.Module:
    """Load the weights of a checkpoint dict into an existing ``model``, in place (e.g. to resume).

    For ``kind="msflow"`` the flows are loaded, and the backbone too when the checkpoint stores it
    (a ``"pretrained"`` backbone is left as the model has it). For ``kind="module"`` the full
    ``state_dict`` is loaded.

    Raises:
        TypeError: an ``"msflow"`` checkpoint and a model that is not an :class:`MSFlow`.
        ValueError: the channels or the weights do not match the model.
    """
    check_checkpoint_state(state)
    if state["kind"] == "module":
        try:
            model.load_state_dict(state["state_dict"], strict=strict)
        except RuntimeError as exc:
            raise ValueError(f"checkpoint does not match the model: {exc}") from exc
        return model
    if not isinstance(model, MSFlow):
        raise TypeError(f"an 'msflow' checkpoint loads into an MSFlow, got {type(model).__name__}")
    if list(model.channels) != list(state["channels"]):
        raise ValueError(f"the backbone gives channels {model.channels} but the checkpoint was saved with {state['channels']}")
    missing, unexpected = model.load_state_dict(state["flows"], strict=False)
    missing = [k for k in missing if not k.startswith("extractor.")]
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if "backbone" in state:
        try:
            model.extractor.backbone.load_state_dict(state["backbone"], strict=strict)
        except RuntimeError as exc:
            raise ValueError(
                f"the checkpoint's backbone weights ({state.get('backbone_class')}) do not match the model's backbone: {exc}"
            ) from exc
    return model


# Fields that decide which weights the backbone has: never overridden on load.
_FIXED_ON_LOAD = ("backbone", "pretrained", "out_indices")


def model_from_checkpoint_state(
    state: Mapping[str, Any], *, backbone: nn.Module | None = None, strict: bool = True, **overrides: Any
) -> MSFlow:
    """Rebuild an :class:`MSFlow` from a checkpoint dict (see :func:`load_checkpoint`)."""
    check_checkpoint_state(state)
    if state["kind"] != "msflow":
        raise ValueError(
            f"this checkpoint holds a {state.get('module_class', 'non-MSFlow module')}, not an MSFlow; build that "
            "model yourself and load the weights with load_checkpoint_state(model, state)"
        )
    fixed = sorted(set(overrides) & set(_FIXED_ON_LOAD))
    if fixed:
        raise ValueError(f"cannot override {fixed} when loading a checkpoint (they decide the backbone weights); pass backbone= instead")
    config = MSFlowConfig.from_dict(dict(state["config"]))
    if overrides:
        config = config.replace(**overrides)
    source = state["backbone_source"]
    if backbone is None and source == "module":
        raise ValueError(
            f"this checkpoint was saved with a user-supplied backbone ({state.get('backbone_class')}); pass an "
            "instance of it as backbone= (its weights are replaced by the stored ones)"
        )
    # "random": config.pretrained is False, so the timm model is built without a download.
    model = MSFlow(config, backbone=backbone)
    return load_checkpoint_state(model, state, strict=strict)


def save_checkpoint(model: MSFlow, path: str | os.PathLike, **extra: Any) -> str:
    """Write :func:`checkpoint_state` of ``model`` (plus ``extra`` entries) atomically to ``path``.

    Returns:
        ``path`` as a string.
    """
    if not isinstance(model, MSFlow):
        raise TypeError(f"model must be an MSFlow, got {type(model).__name__}")
    state = checkpoint_state(model)
    clash = sorted(set(extra) & set(state))
    if clash:
        raise ValueError(f"extra entries {clash} would overwrite checkpoint fields")
    state.update(extra)
    return write_checkpoint(state, path)


def load_checkpoint(
    checkpoint: str | os.PathLike | Mapping,
    *,
    backbone: nn.Module | None = None,
    map_location: Any = "cpu",
    strict: bool = True,
    **overrides: Any,
) -> MSFlow:
    """Build an :class:`MSFlow` from a checkpoint written by :func:`save_checkpoint` (or by training).

    The backbone comes from, in order: ``backbone`` (the given module; stored backbone weights are
    loaded into it); else the stored weights (``backbone_source`` ``"random"``: the timm model is
    built without pretrained weights, so nothing is downloaded); else, for ``"pretrained"``, timm's
    pretrained weights for ``config.backbone`` — **this needs network access or those weights in the
    local timm / Hugging Face cache**. A checkpoint of a user-supplied backbone (``"module"``) needs
    ``backbone``.

    Args:
        checkpoint: path or already loaded dict.
        backbone: an ``nn.Module`` to use as the backbone (see above). A timm name's reflect padding
            (``config.reflect_padding``) is not applied to a given module.
        map_location: passed to ``torch.load``.
        strict: as in ``load_state_dict``.
        **overrides: config fields to change that do not decide the backbone weights (e.g.
            ``score="log_space"``); ``backbone``, ``pretrained`` and ``out_indices`` are refused.

    Raises:
        FileNotFoundError: no such file.
        ValueError: corrupt or truncated file, another format (the message names the file), or
            weights that do not match.
    """
    if isinstance(checkpoint, Mapping):
        state = check_checkpoint_state(checkpoint)
    elif isinstance(checkpoint, (str, os.PathLike)):
        state = read_checkpoint(checkpoint, map_location=map_location)
    else:
        raise TypeError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
    return model_from_checkpoint_state(state, backbone=backbone, strict=strict, **overrides)

__all__ = [
    "BACKBONE_SOURCES",
    "FORMAT",
    "FORMAT_VERSION",
    "check_checkpoint_state",
    "checkpoint_state",
    "convert_official_fusion_state",
    "load_checkpoint",
    "load_checkpoint_state",
    "load_official_checkpoint",
    "model_from_checkpoint_state",
    "read_checkpoint",
    "save_checkpoint",
    "versions",
    "write_checkpoint",
]
