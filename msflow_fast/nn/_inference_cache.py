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
    """Base for modules with fast paths: an :class:`InferenceCache` in ``self._inference_cache``
    (``.to()``, ``.half()``, ``.cuda()`` and the like replace the parameters and drop it) and a
    :attr:`fast_paths` switch.

    Attributes:
        fast_paths: ``False`` (default): the module behaves as a plain module: every submodule is
            called in ``forward`` (its hooks fire) and nothing is cached. ``True``: the fast paths
            of :data:`FAST_PATHS` run; they compute the same maths (to rounding) but may skip a
            submodule's call. Switch it for a whole model with :func:`enable_fast_paths`.
    """

    fast_paths: bool = False

    def __init__(self) -> None:
        super().__init__()
        self._inference_cache = InferenceCache()

    def _apply(self, *args, **kwargs):
        self._inference_cache.clear()
        return super()._apply(*args, **kwargs)

    def _fast(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        # Inference with fast paths, outside autocast (which casts per call; F.conv2d handles it).
        return (
            self.fast_paths
            and x.dtype == weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
            and _cacheable((weight,))
        )

    def _conv3x3(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.conv2d(x, weight, bias, padding=1)``; with fast paths at inference through
        :func:`msflow_fast.ops.conv3x3`, by Winograd where it applies, ``weight``'s transform cached under ``name``."""
        if not self._fast(x, weight):
            return F.conv2d(x, weight, bias, padding=1)
        return ops.conv3x3(x, weight, bias, weight_winograd=self._winograd_weight(name, weight))

    def _conv_module(self, name: str, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """``conv(x)`` for a 3x3, stride-1, padding-1 ``conv``; with fast paths at inference as
        :meth:`_conv3x3` (the module is then not called: its hooks do not fire)."""
        if not self._fast(x, conv.weight):
            return conv(x)
        return ops.conv3x3(x, conv.weight, conv.bias, weight_winograd=self._winograd_weight(name, conv.weight))

    def _winograd_weight(self, name: str, weight: torch.Tensor) -> Callable[[], torch.Tensor]:
        # Called by ops.conv3x3 only when Winograd runs: the backend is resolved once per call.
        return lambda: self._inference_cache.get(name, (weight,), lambda: ops.conv3x3_winograd_weight(weight))


FAST_PATHS = (
    "CPU inference (torch.no_grad, float32/float64, cpp backend): 3x3 convolutions by Winograd "
    "F(4x4, 3x3) with cached transformed weights (ops.conv3x3); the nn.Conv2d modules are not called",
    "a batch-constant condition (e.g. a positional encoding) goes through its share of the first "
    "subnet convolution once per batch, cached at inference; the conv module is not called",
    "the fusion subnet's scale and shift convolutions run as one convolution of stacked weights",
    "the subnet LayerNorm + ReLU run as one fused op (ops.channel_layer_norm_relu) instead of calling the LayerNorm module",
    "a 1x1 Conv-ReLU-Conv subnet runs as two batched GEMMs over the pixels of each sample; the conv modules are not called",
)
"""What :attr:`InferenceCachedModule.fast_paths` switches on (the one place that lists them)."""


def enable_fast_paths(module: nn.Module, enabled: bool = True) -> int:
    """Switch the fast paths (:data:`FAST_PATHS`) of every :class:`InferenceCachedModule` in ``module``.

    The models of the zoo call this for themselves; the drop-in blocks (``AllInOneBlock`` and the
    subnets used on their own) are plain modules until it is called.

    Returns:
        The number of modules switched.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, InferenceCachedModule):
            m.fast_paths = bool(enabled)
            m._inference_cache.clear()
            count += 1
    return count
