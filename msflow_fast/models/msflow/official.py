"""The official MSFlow checkpoint format (cool-xuan/msflow ``save_weights`` / ``load_weights``): read and write.

An official file is ``torch.save`` of a dict (MSFLOW_SPEC.md §1.14)::

    {"epoch": int,                               # 0-based index of the last finished epoch
     "parallel_flows": [SequenceINN state dict per scale],   # FrEIA 0.2: 0/1 matrix permutations
     "fusion_flow": GraphINN state dict,         # module_list.{0..K-1}.perm/.perm_inv (one
                                                 #   PermuteRandom per scale, in an order that
                                                 #   changes between processes), module_list.{K}.subnet_*
     "optimizer": Adam state dict}               # last.pt only

The official loader maps the permutations to its own graph by their length, loads with
``strict=False`` and returns ``state["epoch"]``. :func:`save_official` writes what it reads (the
permutations numbered by scale, the coupling at ``module_list.{K}``); :func:`load_official` reads
the official files (and ours), mapping permutations to scales by length, with
``weights_only=True``: tensors and plain values only, so a crafted file cannot run code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import read_source, write_torch
from .model import MSFlow

_MODULE_KEY = re.compile(r"^module_list\.(\d+)\.(.+)$")
OFFICIAL_FILES = ("last.pt", "best_det.pt", "best_loc_auroc.pt", "best_loc_pro.pt")
"""The file names the official training script writes (``last.pt`` also holds the optimizer)."""


def convert_official_fusion_state(fusion_state: Mapping[str, torch.Tensor], channels: list[int]) -> dict[str, torch.Tensor]:
    """Official ``GraphINN`` fusion state dict -> :class:`~msflow_fast.models.msflow.flows.FusionFlow` keys.

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


def load_official(
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

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an official MSFlow file, an unreadable one (including one holding Python
            objects other than tensors: never unpickled), or weights that do not match the model.
    """
    if not isinstance(model, MSFlow):
        raise TypeError(f"model must be an MSFlow, got {type(model).__name__}")
    data, where = read_source(checkpoint, map_location, given="")
    where = f"{where} is " if where else ""
    if not isinstance(data, Mapping) or "parallel_flows" not in data or "fusion_flow" not in data:
        keys = sorted(map(str, data))[:8] if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(
            f"{where}not an official MSFlow checkpoint: expected the keys 'parallel_flows' and 'fusion_flow', got {keys}"
        )
    parallel = data["parallel_flows"]
    flows = model.parallel_flows.flows
    if len(parallel) != len(flows):
        raise ValueError(f"checkpoint has {len(parallel)} parallel flows but the model has {len(flows)}")
    for k, (flow, state) in enumerate(zip(flows, parallel)):
        try:
            flow.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise ValueError(f"parallel flow {k} does not match the checkpoint: {exc}") from exc
    try:
        model.fusion_flow.load_state_dict(convert_official_fusion_state(data["fusion_flow"], model.channels), strict=strict)
    except RuntimeError as exc:
        raise ValueError(f"the fusion flow does not match the checkpoint: {exc}") from exc
    return model


def official_state(model: MSFlow, *, epoch: int = 0, optimizer: Mapping | None = None) -> dict[str, Any]:
    """The official checkpoint dict of ``model`` (the module docstring's layout; tensors are copies on the CPU).

    Args:
        epoch: the ``epoch`` entry (0-based index of the last finished epoch).
        optimizer: an optional Adam ``state_dict`` for the ``optimizer`` entry (the official
            ``last.pt`` has one; its parameter order is the official script's, not ours).
    """
    if not isinstance(model, MSFlow):
        raise TypeError(f"model must be an MSFlow, got {type(model).__name__}")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")

    def cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    scales = len(model.channels)
    fusion: dict[str, torch.Tensor] = {}
    for k, permutation in enumerate(model.fusion_flow.permutations):
        fusion[f"module_list.{k}.perm"] = permutation.perm.detach().cpu().clone()
        fusion[f"module_list.{k}.perm_inv"] = permutation.perm_inv.detach().cpu().clone()
    fusion.update({f"module_list.{scales}.{k}": v for k, v in cpu(model.fusion_flow.coupling.state_dict()).items()})
    state: dict[str, Any] = {
        "epoch": int(epoch),
        "fusion_flow": fusion,
        "parallel_flows": [cpu(flow.state_dict()) for flow in model.parallel_flows.flows],
    }
    if optimizer is not None:
        state["optimizer"] = dict(optimizer)
    return state


def save_official(model: MSFlow, path: str | os.PathLike, *, epoch: int = 0, optimizer: Mapping | None = None) -> Path:
    """Write :func:`official_state` of ``model`` to ``path`` atomically; the official ``load_weights`` reads it.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return write_torch(path, official_state(model, epoch=epoch, optimizer=optimizer), "official checkpoint")


__all__ = ["OFFICIAL_FILES", "convert_official_fusion_state", "load_official", "official_state", "save_official"]
