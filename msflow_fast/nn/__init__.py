"""Reusable ``torch.nn`` blocks of msflow_fast: the FrEIA-compatible flow block, flow containers,
cross-scale couplings and subnets. No model composition lives here (see :mod:`msflow_fast.models`).

Modules here call only the public functions of :mod:`msflow_fast.ops`. They are plain modules by
default; :func:`enable_fast_paths` switches on the fast paths listed in :data:`FAST_PATHS`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

from . import compat
from ._inference_cache import FAST_PATHS, enable_fast_paths
from .all_in_one import AllInOneBlock, FusedAllInOneBlock
from .fusion import ChannelPermutation, FusionCouplingLayer
from .norms import SampleLayerNorm
from .sequence import ParallelFlows, SequenceFlow
from .subnets import FusionCrossConvs, FusionSTNets, SubnetConvLN, SubnetConvReLU, subnet_conv_ln, subnet_conv_relu

_FREIA_MODULES = ("FrEIA.modules", "FrEIA.modules.all_in_one_block")


@contextlib.contextmanager
def patch_freia(block: type = AllInOneBlock) -> Iterator[None]:
    """Swap FrEIA's ``AllInOneBlock`` for ``block`` while the context is active, then restore it.

    Replaces the name in ``FrEIA.modules`` and ``FrEIA.modules.all_in_one_block``, so code that
    looks it up at call time (``Fm.AllInOneBlock``) builds this package's block. Names bound
    earlier with ``from FrEIA.modules import AllInOneBlock`` are not affected.

    Raises:
        ImportError: FrEIA is not installed (``pip install FrEIA``).
    """
    try:
        modules = [importlib.import_module(name) for name in _FREIA_MODULES]
    except ImportError as exc:
        raise ImportError("patch_freia() needs the FrEIA package: pip install FrEIA==0.2") from exc
    originals = [module.AllInOneBlock for module in modules]
    try:
        for module in modules:
            module.AllInOneBlock = block
        yield
    finally:
        for module, original in zip(modules, originals):
            module.AllInOneBlock = original


__all__ = [
    "FAST_PATHS",
    "AllInOneBlock",
    "ChannelPermutation",
    "FusedAllInOneBlock",
    "FusionCouplingLayer",
    "FusionCrossConvs",
    "FusionSTNets",
    "ParallelFlows",
    "SampleLayerNorm",
    "SequenceFlow",
    "SubnetConvLN",
    "SubnetConvReLU",
    "compat",
    "enable_fast_paths",
    "patch_freia",
    "subnet_conv_ln",
    "subnet_conv_relu",
]
