"""CS-Flow weights of anomalib 2.7 and of the official code, read safely, and anomalib's loss.

- anomalib: a Lightning ``.ckpt`` (``state_dict`` with ``model.graph.graph.module_list.{2i+1}.
  cross_convolution{1,2}.*``) or the ``state_dict`` of a ``CsFlowModel`` (no ``model.``) or of its
  ``CrossScaleFlow`` (``graph.module_list...``). Its permutations are not stored: they are
  ``np.random.default_rng(i)`` draws, so the model must be built with ``permutation="anomalib"``.
  Its extractor (torchvision's EfficientNet-B5) is not read: pass that network as ``backbone`` if
  the features must match too.
- official (marco-rudolph/cs-flow): the code saves whole pickled modules, which are never
  unpickled here; the ``state_dict()`` of its flow (``module_list.{4+2i}.s{1,2}.*``) loads, into a
  model built with ``permutation="official"`` (its ``np.random.seed(i)`` draws).

Files are read with ``weights_only=True``: tensors and plain values only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..checkpoint import read_source
from .model import CSFlow

_ANOMALIB = re.compile(r"^(?:model\.)?(?:graph\.)?graph\.module_list\.(\d+)\.cross_convolution([12])\.(.+)$")
_OFFICIAL = re.compile(r"^(?:nf\.)?module_list\.(\d+)\.s([12])\.(.+)$")


def _read(checkpoint: str | os.PathLike | Mapping, map_location: Any) -> tuple[Mapping, str]:
    try:
        data, where = read_source(checkpoint, map_location)
    except ValueError as exc:  # a file that load_file refuses
        raise ValueError(
            f"{exc}. The official CS-Flow code saves whole pickled models (torch.save(model)), which are not "
            "read here because unpickling can run code: load it in the official code and save model.state_dict()"
        ) from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} is not a state dict (got {type(data).__name__})")
    return data.get("state_dict", data), where


def _load(model: CSFlow, state: Mapping, pattern: re.Pattern, index_of: Any, scheme: str, where: str, strict: bool) -> CSFlow:
    if model.config.permutation != scheme:
        raise ValueError(
            f"{where}: {scheme} weights need the {scheme} permutations, which files do not store; build the model with "
            f"permutation={scheme!r} (it has {model.config.permutation!r})"
        )
    converted = {}
    for key, value in state.items():
        match = pattern.match(str(key))
        if match:
            block = index_of(int(match.group(1)))
            converted[f"flow.couplings.{block}.subnet_{match.group(2)}.{match.group(3)}"] = value
    if not converted:
        raise ValueError(f"{where} holds no CS-Flow coupling weights (no keys like {pattern.pattern!r})")
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in converted.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{where} does not match the model (another width, kernel size or channel count?): " + "; ".join(wrong[:4]))
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if k.startswith("flow.couplings.")]
    if strict and (missing or unexpected):
        raise ValueError(f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def load_anomalib(model: CSFlow, checkpoint: str | os.PathLike | Mapping, *, map_location: Any = "cpu", strict: bool = True) -> CSFlow:
    """Load anomalib CS-Flow flow weights into ``model`` (built with ``permutation="anomalib"``), in place."""
    state, where = _read(checkpoint, map_location)
    return _load(model, state, _ANOMALIB, lambda i: (i - 1) // 2, "anomalib", where, strict)


def load_official(model: CSFlow, checkpoint: str | os.PathLike | Mapping, *, map_location: Any = "cpu", strict: bool = True) -> CSFlow:
    """Load the official code's flow ``state_dict`` into ``model`` (built with ``permutation="official"``), in place."""
    state, where = _read(checkpoint, map_location)
    return _load(model, state, _OFFICIAL, lambda i: (i - 4) // 2, "official", where, strict)


def anomalib_state_dict(model: CSFlow, prefix: str = "graph.graph.") -> dict[str, torch.Tensor]:
    """The model's coupling weights under anomalib's ``CsFlowModel`` keys (``prefix`` ``"model.graph.graph."``
    for a Lightning checkpoint; ``"graph."`` for a ``CrossScaleFlow``)."""
    out = {}
    for key, value in model.state_dict().items():
        match = re.match(r"^flow\.couplings\.(\d+)\.subnet_([12])\.(.+)$", key)
        if match:
            out[f"{prefix}module_list.{2 * int(match.group(1)) + 1}.cross_convolution{match.group(2)}.{match.group(3)}"] = value
    return out


def anomalib_loss(latents: Sequence[torch.Tensor], logdet: torch.Tensor) -> torch.Tensor:
    """anomalib 2.7's ``CsFlowLoss``: ``mean_b(0.5 * sum z^2 - sum_b' logdet_b') / D`` -- the log-det
    summed over the whole batch is subtracted from every sample (B times the official weight)."""
    flat = torch.cat([z.reshape(z.shape[0], -1) for z in latents], dim=1)
    return torch.mean(0.5 * flat.square().sum(dim=1) - logdet.sum()) / flat.shape[1]


__all__ = ["anomalib_loss", "anomalib_state_dict", "load_anomalib", "load_official"]
