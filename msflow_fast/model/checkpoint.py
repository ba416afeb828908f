"""Checkpoints: load official MSFlow checkpoints; save/load this package's own format (with the config).

Official format (MSFLOW_SPEC.md §1.14): ``torch.save`` of a dict with ``parallel_flows`` (a list
of FrEIA ``SequenceINN`` state dicts, FrEIA 0.2 matrix permutations) and ``fusion_flow`` (a FrEIA
``GraphINN`` state dict whose ``module_list`` order of the per-scale ``PermuteRandom`` modules
changes between processes). Those permutations are mapped to scales by their length.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import MSFlowConfig
from .msflow import MSFlow

FORMAT = "msflow_fast"
FORMAT_VERSION = 1

_MODULE_KEY = re.compile(r"^module_list\.(\d+)\.(.+)$")


def _load_object(source: str | os.PathLike | Mapping, map_location: Any) -> Mapping:
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(source).__name__}")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"checkpoint file not found: {os.fspath(source)!r}")
    return torch.load(source, map_location=map_location, weights_only=False)


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
        raise ValueError(
            "not an official MSFlow checkpoint: expected the keys 'parallel_flows' and 'fusion_flow', "
            f"got {sorted(data)[:8]}"
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


def save_checkpoint(model: MSFlow, path: str | os.PathLike, **extra: Any) -> None:
    """Write ``{format, version, config, state_dict (flows only), **extra}`` atomically to ``path``."""
    if not isinstance(model, MSFlow):
        raise TypeError(f"model must be an MSFlow, got {type(model).__name__}")
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "channels": list(model.channels),
        "state_dict": model.flow_state_dict(),
        **extra,
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(
    checkpoint: str | os.PathLike | Mapping,
    *,
    backbone: nn.Module | None = None,
    map_location: Any = "cpu",
    strict: bool = True,
    **overrides: Any,
) -> MSFlow:
    """Build an :class:`MSFlow` from a checkpoint written by :func:`save_checkpoint`.

    Args:
        checkpoint: path or loaded dict.
        backbone: the backbone module, when the model was built with one (a custom backbone is
            not stored); otherwise ``config.backbone`` is built with timm.
        map_location: passed to ``torch.load``.
        strict: as in ``load_state_dict``.
        **overrides: config fields to change (e.g. ``pretrained=False`` to skip a download).
    """
    data = _load_object(checkpoint, map_location)
    if data.get("format") != FORMAT:
        if "parallel_flows" in data:
            raise ValueError("this is an official MSFlow checkpoint; use load_official_checkpoint(model, path)")
        raise ValueError(f"not an {FORMAT} checkpoint (missing 'format': {FORMAT!r})")
    if int(data.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"checkpoint format version {data['version']} is newer than this package supports ({FORMAT_VERSION})")
    config = MSFlowConfig.from_dict(data["config"])
    model = MSFlow(config, backbone=backbone, **overrides)
    if list(model.channels) != list(data.get("channels", model.channels)):
        raise ValueError(f"the backbone gives channels {model.channels} but the checkpoint was saved with {data['channels']}")
    missing, unexpected = model.load_state_dict(data["state_dict"], strict=False)
    missing = [k for k in missing if not k.startswith("extractor.")]
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "convert_official_fusion_state",
    "load_checkpoint",
    "load_official_checkpoint",
    "save_checkpoint",
]
