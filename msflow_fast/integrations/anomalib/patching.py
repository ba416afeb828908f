"""msflow_fast's fused AllInOneBlock inside anomalib's flow models, and back.

anomalib builds FastFlow, CFlow, U-Flow and PatchFlow (and any later flow model) from its own copy
of FrEIA's block, ``anomalib.models.components.flow.AllInOneBlock``, which each model module binds
by name at import. Rebinding that one name cannot reach them, so :func:`patch` finds every module of
``anomalib.models`` that binds the stock class (by looking at the modules, not from a list) and
rebinds each to :class:`AnomalibAllInOneBlock`; models built afterwards hold the fused block.
Models built before are converted in place by :func:`to_fused`, and :func:`to_stock` swaps the
blocks back with the same weights (to export without msflow_fast, or to share a model with
someone who does not have it).

:class:`AnomalibAllInOneBlock` takes anomalib's arguments, has the same ``state_dict`` keys and
computes the same maths (FrEIA 0.2's clamp ``alpha * tanh(0.1 a)``); it also draws its
permutation and initial global scale as anomalib's copy does, so a model built under a seed
holds the same weights patched or not.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import torch
from torch import nn

from ...nn import AllInOneBlock

STOCK_MODULE = "anomalib.models.components.flow.all_in_one_block"
"""Where anomalib defines its block (the class itself is never replaced there)."""


def stock_block() -> type[nn.Module]:
    """anomalib's ``AllInOneBlock`` class.

    Raises:
        ImportError: anomalib is not installed (the message says how to install it).
    """
    try:
        module = importlib.import_module(STOCK_MODULE)
    except ImportError as exc:
        raise ImportError(
            "msflow_fast.integrations.anomalib needs anomalib: pip install 'anomalib==2.7.*' -c constraints.txt "
            "(the constraints file keeps your torch)"
        ) from exc
    return module.AllInOneBlock


class AnomalibAllInOneBlock(AllInOneBlock):
    """:class:`msflow_fast.nn.AllInOneBlock` standing in for ``anomalib.models.components.flow.AllInOneBlock``.

    Same arguments, ``state_dict`` keys and maths as anomalib's block; the hard permutation is drawn
    with ``torch.randperm`` and the initial global scale is computed in float32 torch, as anomalib
    does, so that the same seed builds the same weights.
    """

    def __init__(self, dims_in, dims_c=None, subnet_constructor=None, affine_clamping: float = 2.0, gin_block: bool = False,
                 global_affine_init: float = 1.0, global_affine_type: str = "SOFTPLUS", permute_soft: bool = False,
                 learned_householder_permutation: int = 0, reverse_permutation: bool = False) -> None:
        super().__init__(dims_in, dims_c, subnet_constructor, affine_clamping, gin_block, global_affine_init, global_affine_type,
                         permute_soft, learned_householder_permutation, reverse_permutation)
        self.global_affine_init = float(global_affine_init)
        with torch.no_grad():
            self.global_scale.fill_(_stock_global_scale(float(global_affine_init), global_affine_type))

    @staticmethod
    def draw_permutation(channels: int) -> torch.Tensor:
        """``torch.randperm(C)``: anomalib's draw (torch's global generator)."""
        return torch.randperm(channels)


def _stock_global_scale(init: float, affine_type: str) -> float:
    """anomalib's initial raw global scale, computed as it computes it (float32 torch)."""
    value = torch.tensor(init)
    if affine_type == "SOFTPLUS":
        return float(2.0 * torch.log(torch.exp(torch.tensor(0.5 * 10.0 * init)) - 1))
    if affine_type == "SIGMOID":
        return float(2.0 - torch.log(torch.tensor([10.0 / init - 1.0]))[0])
    return float(torch.log(value))


# ---------------------------------------------------------------------------------------------- patching


@dataclass
class PatchReport:
    """What :func:`patch` did.

    Attributes:
        patched: ``"module.NAME"`` of every binding rebound to the fused block.
        skipped: ``(module, reason)`` of the anomalib model modules that could not be imported (an
            optional dependency missing, say); a model in one of them is not patched.
    """

    patched: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def models(self) -> list[str]:
        """The anomalib model folders patched (``fastflow``, ``cflow``, ...), sorted."""
        names = {p.split(".")[3] for p in self.patched if p.startswith("anomalib.models.image.") or p.startswith("anomalib.models.video.")}
        return sorted(names)

    def __str__(self) -> str:
        lines = [f"msflow_fast: patched {len(self.patched)} binding(s) of anomalib's AllInOneBlock ({', '.join(self.models()) or 'no model'})"]
        lines += [f"  {p}" for p in self.patched]
        lines += [f"  not imported: {m} ({why})" for m, why in self.skipped]
        return "\n".join(lines)


_active: list[tuple[ModuleType, str, object]] = []


def _anomalib_model_modules() -> tuple[list[ModuleType], list[tuple[str, str]]]:
    """Every module under ``anomalib.models``, imported (those that fail to import are reported)."""
    stock_block()
    import anomalib.models as package

    modules, skipped = [package], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomalib's import-time deprecation notices
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            try:
                modules.append(importlib.import_module(info.name))
            except Exception as exc:  # noqa: BLE001 - an optional dependency of one model must not stop the others
                skipped.append((info.name, f"{type(exc).__name__}: {exc}"))
    return modules, skipped


def patch(block: type[nn.Module] = AnomalibAllInOneBlock) -> PatchReport:
    """Rebind anomalib's ``AllInOneBlock`` to ``block`` in every module of ``anomalib.models`` that
    binds it (FastFlow, CFlow, U-Flow, PatchFlow and any other found), so that models built
    afterwards use msflow_fast's fused block; undo with :func:`unpatch` (or use :func:`patched`).

    Returns:
        a :class:`PatchReport` naming every rebound binding (printing it says what was patched).

    Raises:
        ImportError: anomalib is not installed.
    """
    stock = stock_block()
    modules, skipped = _anomalib_model_modules()
    report = PatchReport(skipped=skipped)
    for module in modules:
        if module.__name__ == STOCK_MODULE:
            continue
        for name, value in list(vars(module).items()):
            if value is stock:
                _active.append((module, name, value))
                setattr(module, name, block)
                report.patched.append(f"{module.__name__}.{name}")
    return report


def unpatch() -> int:
    """Undo every :func:`patch` still in force, latest first. Returns the bindings restored."""
    count = 0
    while _active:
        module, name, value = _active.pop()
        setattr(module, name, value)
        count += 1
    return count


@contextlib.contextmanager
def patched(block: type[nn.Module] = AnomalibAllInOneBlock) -> Iterator[PatchReport]:
    """:func:`patch` for the ``with`` block, then restore the bindings it changed.

    Example:
        >>> from anomalib.models import Cflow
        >>> with patched() as report:
        ...     model = Cflow(backbone="resnet18", pre_trained=False)
        >>> print(report.models())
        ['cflow', 'fastflow', 'patchflow', 'uflow']
    """
    depth = len(_active)
    report = patch(block)
    try:
        yield report
    finally:
        while len(_active) > depth:
            module, name, value = _active.pop()
            setattr(module, name, value)


# ---------------------------------------------------------------------------------------------- converting models


def _block_arguments(block: nn.Module) -> dict:
    """The constructor arguments of an AllInOneBlock (anomalib's or msflow_fast's), read off the block."""
    return {
        "dims_in": [tuple(block.dims_in[0])] if hasattr(block, "dims_in") else None,
        "dims_c": [tuple(d) for d in block.dims_c] if getattr(block, "dims_c", None) else [],
        "affine_clamping": float(block.clamp),
        "gin_block": bool(block.GIN),
        "global_affine_type": _affine_type(block),
        "permute_soft": False,  # the permutation (or rotation) matrix is loaded from the weights below
        "learned_householder_permutation": int(block.householder),
        "reverse_permutation": bool(block.reverse_pre_permute),
    }


def _affine_type(block: nn.Module) -> str:
    if hasattr(block, "global_affine_type"):
        return block.global_affine_type
    activation = getattr(block.global_scale_activation, "__name__", "")
    for kind in ("sigmoid", "softplus", "exp"):
        if kind in activation:
            return kind.upper()
    raise ValueError(f"cannot tell the global affine type of {type(block).__name__} (activation {activation!r})")


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """Building a block draws random numbers (permutation, init); the caller's streams are kept."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(state)


def _convert(model: nn.Module, source: tuple[type, ...], target: type, soft: bool) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, source) or type(child) is target:
                continue
            arguments = _block_arguments(child)
            arguments["permute_soft"] = soft and _is_soft(child)
            subnet = child.subnet
            with _rng_kept(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # anomalib warns on soft permutations of > 512 channels
                new = target(subnet_constructor=lambda c_in, c_out, s=subnet: s, **arguments)
            param = child.global_scale
            new.to(device=param.device, dtype=param.dtype)
            new.load_state_dict(child.state_dict(), strict=True)
            new.train(child.training)
            setattr(parent, name, new)
            count += 1
    return count


def _is_soft(block: nn.Module) -> bool:
    if getattr(block, "householder", 0):
        return False
    if hasattr(block, "permute_soft"):
        return bool(block.permute_soft)
    w = block.w_perm.detach().reshape(block.in_channels, block.in_channels)
    return not bool(((w == 0) | (w == 1)).all())


def to_stock(model: nn.Module) -> nn.Module:
    """Replace, in place, every msflow_fast ``AllInOneBlock`` in ``model`` by anomalib's block with
    the same arguments and weights (subnets kept), and return ``model``: a model anyone with anomalib
    can load, export or share without msflow_fast. Random streams are left as they were."""
    return _swap(model, (AllInOneBlock,), stock_block(), soft=False)


def to_fused(model: nn.Module) -> nn.Module:
    """Replace, in place, every anomalib ``AllInOneBlock`` in ``model`` by
    :class:`AnomalibAllInOneBlock` with the same arguments and weights, and return ``model`` (for a
    model built, or loaded, before :func:`patch`)."""
    return _swap(model, (stock_block(),), AnomalibAllInOneBlock, soft=True)


def _swap(model: nn.Module, source: tuple[type, ...], target: type, soft: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    _convert(model, source, target, soft)
    return model


def count_blocks(model: nn.Module) -> dict[str, int]:
    """``{"fused": n, "stock": m}``: the msflow_fast and anomalib AllInOneBlocks in ``model``."""
    stock = stock_block()
    fused = sum(isinstance(m, AllInOneBlock) for m in model.modules())
    return {"fused": fused, "stock": sum(isinstance(m, stock) for m in model.modules())}


__all__ = [
    "AnomalibAllInOneBlock",
    "PatchReport",
    "count_blocks",
    "patch",
    "patched",
    "stock_block",
    "to_fused",
    "to_stock",
    "unpatch",
]
