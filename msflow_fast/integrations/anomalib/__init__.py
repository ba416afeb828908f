"""msflow_fast inside anomalib (2.7): the only place in msflow_fast that imports anomalib.

- :mod:`.patching`: :func:`patch` / :func:`patched` rebind anomalib's ``AllInOneBlock`` to the fused
  block in every anomalib model module that binds it; :func:`to_stock` / :func:`to_fused` convert
  built models both ways with the same weights.
- :mod:`.lightning`: the zoo's models as anomalib ``AnomalibModule`` s (``MSFlowModule``,
  ``FastFlowModule``) for ``anomalib.engine.Engine`` (imported on first use).
"""

from __future__ import annotations

from typing import Any

from .patching import AnomalibAllInOneBlock, PatchReport, count_blocks, patch, patched, stock_block, to_fused, to_stock, unpatch

_LIGHTNING = ("ZooModule", "MSFlowModule", "FastFlowModule")


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        from . import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AnomalibAllInOneBlock",
    "FastFlowModule",
    "MSFlowModule",
    "PatchReport",
    "ZooModule",
    "count_blocks",
    "patch",
    "patched",
    "stock_block",
    "to_fused",
    "to_stock",
    "unpatch",
]
