"""Weights trained by the official DADF code (hmyao22/DADF), read safely into a :class:`DADF`.

- Stage 1 (``{backbone}_{class}_LightCC.pth`` / ``_CC.pth``): the state dict of its ``VIT``:
  ``patch_embed{1,2,3}.proj.*``, ``sem_token``, ``pos_embed`` (fixed, ``[1, N + 1, D]`` with a zero
  CLS slot), ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*``, ``norm.*``,
  ``decoder_pred{1,2,3}.*``.
- Stage 2 (``{backbone}_fuseflow.pt``): ``{"model_norms_state_dict": ..., "model_nf_flows": ...}``,
  the ``nn.LayerNorm([3C, H, W])`` norms (``{k}.weight``, ``{k}.bias``) and the FrEIA 0.2
  ``SequenceINN`` flows (``{k}.module_list.{i}.*``), which :class:`~msflow_fast.nn.AllInOneBlock`
  reads as they are.

The code loads torchvision's backbone weights (here the ``tv_in1k`` tag with ``pretrained=True``).
Files are read with ``weights_only=True``: tensors and plain values only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..checkpoint import read_source
from .model import DADF

_VIT_RULES = (
    (re.compile(r"^patch_embed(\d+)\.proj\.(weight|bias)$"), lambda m: f"embed.{int(m[1]) - 1}.{m[2]}"),
    (re.compile(r"^decoder_pred(\d+)\.(weight|bias)$"), lambda m: f"heads.{int(m[1]) - 1}.{m[2]}"),
    (re.compile(r"^sem_token$"), lambda m: "memory"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)$"), lambda m: f"blocks.{m[1]}.mlp.{0 if m[2] == '1' else 2}.{m[3]}"),
    (re.compile(r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj)\.(weight|bias)$"), lambda m: f"blocks.{m[1]}.{m[2]}.{m[3]}"),
    (re.compile(r"^norm\.(weight|bias)$"), lambda m: f"norm.{m[1]}"),
)


def _tensor_dict(state: Any, where: str, what: str) -> dict[str, torch.Tensor]:
    """``state`` as a dict of str -> finite tensor, else a ``ValueError`` naming ``where``."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{where}: {what} must be a state dict (a mapping of names to tensors), got {type(state).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: {what} entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{where}: {what} entry {key!r} holds NaN or inf values; the file is damaged or from a diverged run")
        out[key] = value
    return out


def convert_vit_state(state: Mapping[str, torch.Tensor], where: str = "the state dict") -> dict[str, torch.Tensor]:
    """The official ``VIT`` state dict -> :class:`~.transformer.DualAttentionTransformer` keys
    (``pos_embed`` left out: it is fixed, and checked by :func:`load_official`).

    Raises:
        ValueError: a key the official ``VIT`` does not have.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key == "pos_embed":
            continue
        for pattern, rename in _VIT_RULES:
            m = pattern.match(key)
            if m:
                out[rename(m)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{where} is not a DADF VIT state dict: unexpected keys {unknown[:5]}")
    return out


def load_official(model: DADF, transformer: str | os.PathLike | Mapping | None = None, flows: str | os.PathLike | Mapping | None = None,
                  *, map_location: Any = "cpu") -> DADF:
    """Load the official code's stage-1 file (``transformer``) and / or stage-2 file (``flows``) into
    ``model``, in place. The model must have the file's shapes (backbone, input size, widths, depth).

    Raises:
        ValueError: not such a file, shapes that do not match the model (another backbone or input
            size?), or fixed positions that differ from this model's (another token grid or width).
    """
    if transformer is None and flows is None:
        raise ValueError("load_official needs transformer= (the *_CC.pth / *_LightCC.pth file) and/or flows= (the *_fuseflow.pt file)")
    # Every file is read and checked against the model before anything is loaded: a bad file leaves the model as it was.
    loads: list[tuple[torch.nn.Module, dict[str, torch.Tensor], str]] = []
    if transformer is not None:
        raw, where = read_source(transformer, map_location, "the given state dict")
        state = _tensor_dict(raw, where, "the stage-1 file")
        converted = convert_vit_state(state, where)
        positions = state.get("pos_embed")
        if positions is not None:
            ours = model.transformer.positions
            if tuple(positions.shape) != (1, ours.shape[1] + 1, ours.shape[2]) or not torch.allclose(
                positions[:, 1:].to(ours), ours, atol=1e-5
            ):
                raise ValueError(f"{where}: its fixed positions {tuple(positions.shape)} differ from this model's "
                                 f"(1, {ours.shape[1] + 1}, {ours.shape[2]}); build the model for the file's input size and widths")
        loads.append((model.transformer, converted, where))
    if flows is not None:
        data, where = read_source(flows, map_location, "the given state dict")
        if not isinstance(data, Mapping) or "model_nf_flows" not in data or "model_norms_state_dict" not in data:
            raise ValueError(f"{where} is not a DADF flow file (no 'model_nf_flows' and 'model_norms_state_dict' entries)")
        loads.append((model.flows, _tensor_dict(data["model_nf_flows"], where, "'model_nf_flows'"), where))
        loads.append((model.norms, _tensor_dict(data["model_norms_state_dict"], where, "'model_norms_state_dict'"), where))
    for module, state, where in loads:
        _check_matches(module, state, where)
    for module, state, _ in loads:
        module.load_state_dict(state, strict=True)
    return model


def _check_matches(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``state`` has exactly ``module``'s keys and shapes, else a ``ValueError`` saying what differs."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in state.items() if own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{where} does not match the model (another backbone, input size or width?): " + "; ".join(wrong[:4]))


__all__ = ["convert_vit_state", "load_official"]
