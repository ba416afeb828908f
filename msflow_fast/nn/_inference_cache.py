"""Tensors derived from parameters (weight slices, concatenated weights, Winograd weights, a conv
of a constant condition), computed once and reused between inference calls while their sources
are unchanged."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


def _cacheable(sources: Sequence[torch.Tensor]) -> bool:
    # Only under torch.no_grad(): with autograd on, the derived tensor must be part of the graph.
    # Not in inference mode (its tensors carry no version counter, so an in-place change could not
    # be seen, and they cannot join autograd later) nor while torch.compile traces.
    if torch.is_grad_enabled() or torch.is_inference_mode_enabled() or torch.compiler.is_compiling():
        return False
    return not any(t.is_inference() for t in sources)


class InferenceCache:
    """Named entries ``name -> (key, sources, value)``; a lookup hits while every source has the same
    storage, version, shape, strides and dtype and the caller's ``extra`` key is equal.

    An entry keeps its sources alive (detached), so their storage cannot be reused by new tensors
    while it is held. Copies and pickles of a cache are empty.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, list[torch.Tensor], Any]] = {}

    def get(self, name: str, sources: Sequence[torch.Tensor], make: Callable[[], Any], extra: Hashable = ()) -> Any:
        """``make()``, or its cached result when nothing it depends on has changed (see the class)."""
        if not _cacheable(sources):
            return make()
        key = tuple((t.data_ptr(), t._version, t.shape, t.stride(), t.dtype) for t in sources) + (extra,)
        entry = self._entries.get(name)
        if entry is not None and entry[0] == key:
            return entry[2]
        value = make()
        self._entries[name] = (key, [t.detach() for t in sources], value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __reduce__(self):
        # deepcopy and pickle give an empty cache.
        return (InferenceCache, ())


class InferenceCachedModule(nn.Module):
    """Base for modules with an :class:`InferenceCache` in ``self._inference_cache``; ``.to()``,
    ``.half()``, ``.cuda()`` and the like replace the parameters and drop the cache."""

    def __init__(self) -> None:
        super().__init__()
        self._inference_cache = InferenceCache()

    def _apply(self, *args, **kwargs):
        self._inference_cache.clear()
        return super()._apply(*args, **kwargs)

    def _conv3x3(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.conv2d(x, weight, bias, padding=1)``; where :func:`msflow_fast.ops.winograd_enabled`
        (CPU inference), by Winograd with ``weight``'s transform cached under ``name``."""
        if self._winograd(x, weight):
            return self._winograd_conv(name, x, weight, bias)
        return F.conv2d(x, weight, bias, padding=1)

    def _conv_module(self, name: str, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """``conv(x)`` for a 3x3, stride-1, padding-1 ``conv``; by Winograd as :meth:`_conv3x3` where it
        applies (the module is then not called: its hooks do not fire)."""
        if self._winograd(x, conv.weight):
            return self._winograd_conv(name, x, conv.weight, conv.bias)
        return conv(x)

    def _winograd_conv(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        winograd = self._inference_cache.get(name, (weight,), lambda: ops.conv3x3_winograd_weight(weight))
        return ops.conv3x3(x, weight, bias, weight_winograd=winograd)

    @staticmethod
    def _winograd(x: torch.Tensor, weight: torch.Tensor) -> bool:
        return ops.winograd_enabled(x) and _cacheable((weight,))
