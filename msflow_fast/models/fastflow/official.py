"""FastFlow checkpoints of anomalib and of gathierry/FastFlow (MODELS_SPEC.md Part A §1.8), read safely.

- anomalib: a Lightning ``.ckpt`` (``state_dict`` with ``model.fast_flow_blocks.{k}...``,
  ``model.norms.{k}...``, ``model.feature_extractor...``; ``hyper_parameters`` with the backbone,
  steps, kernels and hidden ratio), or the ``state_dict`` of a ``FastflowModel`` (no ``model.``).
  The subnet convs are ``subnet.0`` / ``subnet.2`` (anomalib 2.x, ``padding="same"``) or
  ``subnet.1`` / ``subnet.4`` (the variant with ``ZeroPad2d`` layers); both load.
- gathierry/FastFlow: ``{"epoch", "model_state_dict", "optimizer_state_dict"}`` with
  ``nf_flows.{k}...``, ``norms.{k}...``, ``feature_extractor...``, or that state dict itself.

Both store FrEIA-0.2 matrix permutations, which :class:`~msflow_fast.nn.AllInOneBlock` reads as
they are. Files are read with ``weights_only=True``: tensors and plain values only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..checkpoint import read_source
from .config import FastFlowConfig
from .model import FastFlow

_SUBNET = re.compile(r"\.subnet\.(\d+)\.")
_ZERO_PAD_INDICES = {"1": "0", "4": "2"}


def _subnet_keys(key: str, zero_pad: bool) -> str:
    if not zero_pad:
        return key
    return _SUBNET.sub(lambda m: f".subnet.{_ZERO_PAD_INDICES.get(m.group(1), m.group(1))}.", key)


def _vit(model: FastFlow) -> bool:
    return model.config.vit_block is not None and model.extractor.source != "module"


def convert_state(state: Mapping[str, torch.Tensor], model: FastFlow, *, flows: str, norms: str, extractor: str) -> dict[str, torch.Tensor]:
    """A FastFlow state dict with the given prefixes -> this model's keys (``flows.``, ``norms.``, ``extractor.backbone.``)."""
    zero_pad = any(".subnet.4." in k for k in state if k.startswith(flows))
    backbone = "extractor.backbone.model." if _vit(model) else "extractor.backbone."
    out = {}
    for key, value in state.items():
        if key.startswith(flows + "."):
            out[_subnet_keys("flows." + key[len(flows) + 1 :], zero_pad)] = value
        elif key.startswith(norms + "."):
            out["norms." + key[len(norms) + 1 :]] = value
        elif key.startswith(extractor + "."):
            out[backbone + key[len(extractor) + 1 :]] = value
    return out


def _load(model: FastFlow, converted: dict[str, torch.Tensor], where: str, strict: bool) -> FastFlow:
    if not converted:
        raise ValueError(f"{where} holds no FastFlow weights (no flow or norm keys)")
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in converted.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{where} does not match the model (another preset, input size or backbone?): " + "; ".join(wrong[:4]))
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if any(k.startswith("extractor.") for k in converted):
        model.extractor.source = "file"  # its weights are the file's now: msflow_fast's checkpoints store them
    missing = [k for k in missing if not k.startswith("extractor.")]  # a file may omit the frozen backbone
    if strict and (missing or unexpected):
        raise ValueError(f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def load_anomalib(model: FastFlow, checkpoint: str | os.PathLike | Mapping, *, map_location: Any = "cpu", strict: bool = True) -> FastFlow:
    """Load anomalib FastFlow weights (a Lightning checkpoint or a ``FastflowModel`` state dict) into ``model``, in place."""
    data, where = read_source(checkpoint, map_location)
    state = data.get("state_dict", data) if isinstance(data, Mapping) else data
    prefix = "model." if any(str(k).startswith("model.fast_flow_blocks.") for k in state) else ""
    converted = convert_state(
        state, model, flows=f"{prefix}fast_flow_blocks", norms=f"{prefix}norms", extractor=f"{prefix}feature_extractor"
    )
    return _load(model, converted, where, strict)


def load_gathierry(model: FastFlow, checkpoint: str | os.PathLike | Mapping, *, map_location: Any = "cpu", strict: bool = True) -> FastFlow:
    """Load gathierry/FastFlow weights (``{"model_state_dict": ...}`` or the state dict) into ``model``, in place."""
    data, where = read_source(checkpoint, map_location)
    state = data.get("model_state_dict", data) if isinstance(data, Mapping) else data
    converted = convert_state(state, model, flows="nf_flows", norms="norms", extractor="feature_extractor")
    return _load(model, converted, where, strict)


def anomalib_config(checkpoint: str | os.PathLike | Mapping, *, map_location: Any = "cpu", **changes: Any) -> FastFlowConfig:
    """The :class:`FastFlowConfig` of an anomalib Lightning checkpoint: its ``hyper_parameters``
    (backbone, steps, kernels, hidden ratio) and the input size its norms were built for."""
    data, where = read_source(checkpoint, map_location)
    hyper = data.get("hyper_parameters") if isinstance(data, Mapping) else None
    if not isinstance(hyper, Mapping) or "backbone" not in hyper:
        raise ValueError(f"{where} has no anomalib hyper_parameters (backbone, flow_steps, ...); build the model yourself and use load_anomalib")
    backbone = str(hyper["backbone"])
    preset = {"deit_base_distilled_patch16_384": "deit", "cait_m48_448": "cait"}.get(backbone)
    fields: dict[str, Any] = {
        "backbone": backbone,
        "pretrained": bool(hyper.get("pre_trained", True)),
        "flow_steps": int(hyper.get("flow_steps", 8)),
        "conv3x3_only": bool(hyper.get("conv3x3_only", False)),
        "hidden_ratio": float(hyper.get("hidden_ratio", 1.0)),
    }
    if preset is not None:
        from .config import PRESETS

        fields = {**PRESETS[preset], **fields}
    else:
        norm = data["state_dict"].get("model.norms.0.weight")
        if norm is None:
            raise ValueError(f"{where} has no model.norms.0.weight to read the input size from")
        fields["input_size"] = (int(norm.shape[1]) * 4, int(norm.shape[2]) * 4)
    return FastFlowConfig(**{**fields, **changes})


__all__ = ["anomalib_config", "convert_state", "load_anomalib", "load_gathierry"]
