"""Parameter counts and FLOPs of any model of the zoo, measured: :func:`measure` -> :class:`ComplexityReport`.

The model is known only through the protocol of :mod:`.base`: :meth:`~.base.AnomalyModel.predict`
(the whole model), :meth:`~.base.AnomalyModel.frozen_features` (its frozen part, the backbone, or
``None``) and :meth:`~.base.AnomalyModel.loss` (fed cached frozen features where the model has
them, as the engine trains). The rest of the model (flows and head) is ``predict`` less the
frozen part.

How FLOPs are counted: with :class:`torch.utils.flop_counter.FlopCounterMode` on a random image
batch. A FLOP count is ``2 x`` the multiply-accumulates of the convolutions, matrix products and
attention products the model runs, as torch counts them (a bias addition is not counted);
elementwise ops, normalisations, pooling, interpolation, reductions, gathers, index selects and
permutations count zero, and so do this package's fused custom ops (``torch.ops.msflow_fast.*``:
couplings, norms and heads, memory-bound and elementwise). Two corrections keep the count honest:

- the model's fast paths (:data:`msflow_fast.nn.FAST_PATHS`) are switched off while counting and
  restored afterwards: one of them runs 3x3 convolutions by Winograd in a custom op the counter
  cannot see (they would count zero) and another computes a batch-constant share of a
  convolution once per batch and caches it (counting less than the model's maths). Switched
  off, every convolution runs as ``aten.convolution``, so the count is the model's maths and does
  not depend on the device, the dtype or the batch.
- scaled-dot-product attention on the CPU (``aten._scaled_dot_product_flash_attention_for_cpu``
  and its backward, in ViT backbones), which torch's counter leaves at zero, is counted with the
  formulas torch uses for the GPU kernels.

Custom (non-``aten``) ops that run while counting are listed in
:attr:`ComplexityReport.uncounted_ops`, so a new op wrapping a matrix product cannot hide.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .._sizes import image_size_hw
from ..nn import enable_fast_paths
from .base import AnomalyModel

_ATEN_NAMESPACES = ("aten", "prim", "prims")


# ---------------------------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class ComplexityReport:
    """Parameters and FLOPs of one model at one input size (see the module docstring for what counts).

    Attributes:
        model: the model's registry name (its class name if unregistered).
        input_size: ``(H, W)`` of the images counted, in pixels.
        batch: images per counted batch (the FLOPs below are per image: batch totals / ``batch``).
        parameters: number of parameters (scalars), shared ones once.
        trainable_parameters: those with ``requires_grad`` (flows, head, trainable norms).
        frozen_parameters: those without (the frozen backbone).
        predict_flops: FLOPs of :meth:`~.base.AnomalyModel.predict` per image: the whole model.
        frozen_flops: FLOPs of :meth:`~.base.AnomalyModel.frozen_features` per image (the frozen
            backbone), ``None`` for a model without a frozen part.
        train_step_flops: FLOPs per image of one training step: forward and backward (gradients of
            every trainable parameter) of :meth:`~.base.AnomalyModel.loss` on cached frozen
            features, or on images for a model without a frozen part; ``None`` when not measured.
        uncounted_ops: the custom (non-``aten``) ops that ran while counting, ``"namespace::name"``;
            each counted zero FLOPs.
    """

    model: str
    input_size: tuple[int, int]
    batch: int
    parameters: int
    trainable_parameters: int
    frozen_parameters: int
    predict_flops: float
    frozen_flops: float | None
    train_step_flops: float | None
    uncounted_ops: tuple[str, ...] = ()

    @property
    def rest_flops(self) -> float:
        """FLOPs per image of everything but the frozen part (flows and head): ``predict_flops - frozen_flops``."""
        return self.predict_flops - (self.frozen_flops or 0.0)

    def to_dict(self) -> dict[str, Any]:
        """The fields and :attr:`rest_flops` as a JSON-safe ``dict`` (lists for tuples)."""
        out = dataclasses.asdict(self)
        out["input_size"] = list(self.input_size)
        out["uncounted_ops"] = list(self.uncounted_ops)
        out["rest_flops"] = self.rest_flops
        return out


# ---------------------------------------------------------------------------------------------- counting


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``softmax(q k^T) v``: ``2 b h s_q s_k d_q`` for the scores plus ``2 b h s_q s_k d_v`` for the output."""
    b, heads, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * heads * s_q * s_k * (d_q + d_v)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The scores recomputed (``d_q``), the gradients of the scores and of ``v`` (``d_v`` each) and of ``q`` and ``k`` (``d_q`` each)."""
    b, heads, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * heads * s_q * s_k * (3 * d_q + 2 * d_v)


_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}
"""Ops torch's counter leaves at zero that are matrix products (formulas as torch's for the GPU kernels)."""


def _takes_tensors(values: Any) -> bool:
    return any(isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v)) for v in values)


class _CustomOpRecorder(TorchDispatchMode):
    """Records the names of the non-``aten`` ops on tensors that run inside it, then runs them unchanged
    (ops without tensor arguments, such as a build query, are not computation and are left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in _ATEN_NAMESPACES and _takes_tensors((*args, *kwargs.values())):
            self.names.add(func.name().split(".")[0])
        return func(*args, **kwargs)


@dataclass(frozen=True)
class FlopCount:
    """What :func:`count_flops` returns.

    Attributes:
        result: the function's return value.
        flops: FLOPs of the call (``2 x`` multiply-accumulates, see the module docstring).
        uncounted_ops: custom (non-``aten``) ops that ran, ``"namespace::name"``, each counted zero.
    """

    result: Any
    flops: int
    uncounted_ops: tuple[str, ...]


def count_flops(function: Callable[..., Any], *args: Any, **kwargs: Any) -> FlopCount:
    """FLOPs of ``function(*args, **kwargs)``, forward and any backward run inside it.

    :class:`~torch.utils.flop_counter.FlopCounterMode` with the CPU attention formulas added; the
    fast paths of a model are not switched here (see :func:`without_fast_paths`).
    """
    recorder = _CustomOpRecorder()
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        with recorder:  # inside the counter: it sees every op first and hands it on
            result = function(*args, **kwargs)
    return FlopCount(result, int(counter.get_total_flops()), tuple(sorted(recorder.names)))


_NOT_SET = object()


@contextlib.contextmanager
def without_fast_paths(model: nn.Module) -> Iterator[nn.Module]:
    """Switch off every fast path of ``model`` (:func:`msflow_fast.nn.enable_fast_paths` ``False``) for
    the ``with`` block, then give each module back the exact ``fast_paths`` setting it had.

    Modules outside ``enable_fast_paths``' reach that carry a ``fast_paths`` switch are switched off
    too. The inference caches of the fast paths are emptied (they refill on the next call).
    """
    saved = [(m, m.__dict__.get("fast_paths", _NOT_SET)) for m in model.modules() if hasattr(m, "fast_paths")]
    try:
        enable_fast_paths(model, False)
        for module, _ in saved:
            if getattr(module, "fast_paths", False):
                module.fast_paths = False
        yield model
    finally:
        for module, value in saved:
            if value is _NOT_SET:
                module.__dict__.pop("fast_paths", None)
            else:
                module.fast_paths = value


@contextlib.contextmanager
def _modes_and_buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restores every module's train/eval mode and every buffer's values (e.g. batch-norm statistics) on exit."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, value in buffers:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)


# ---------------------------------------------------------------------------------------------- measure


def measure(
    model: AnomalyModel, input_size: int | tuple[int, int] | None = None, *, batch: int = 1, train_step: bool = True
) -> ComplexityReport:
    """Parameters and FLOPs per image of ``model`` (see :class:`ComplexityReport` and the module docstring).

    Counts run on a random batch ``[batch, 3, H, W]`` (a fixed seed, in the model's dtype on its
    device: the CLI measures float32 models on the CPU; with the fast paths off the counts are the
    same on every device and dtype): :meth:`~.base.AnomalyModel.predict` and
    :meth:`~.base.AnomalyModel.frozen_features` in eval mode under ``torch.no_grad()``, then, with
    ``train_step``, one training step in train mode: ``loss`` on the frozen features (with zero
    ``"label"``; on images with zero ``"mask"`` and ``"label"`` for a model without a frozen part)
    and the gradients of the trainable parameters by ``torch.autograd.grad``.

    The model is left as it was: train/eval modes, fast-path flags, buffers, ``.grad`` of the
    parameters and the global random state.

    Args:
        model: an :class:`~.base.AnomalyModel`.
        input_size: ``(H, W)`` or a side ``S`` in pixels; default ``model.input_size`` (its config's).
        batch: images per counted batch (>= 1); the results are per image.
        train_step: also count the training step (forward and backward, about 3x the flows' forward).

    Raises:
        TypeError: ``model`` is not an ``AnomalyModel``, or a bad ``input_size`` / ``batch`` type.
        ValueError: a size the model cannot take (its own message), or ``batch`` < 1.
    """
    if not isinstance(model, AnomalyModel):
        raise TypeError(f"measure needs an AnomalyModel (a model of msflow_fast.models), got {type(model).__name__}")
    if isinstance(batch, bool) or not isinstance(batch, int):
        raise TypeError(f"batch must be an int >= 1, got {batch!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    height, width = image_size_hw(input_size if input_size is not None else model.input_size, "input_size")
    model.check_image_size(height, width)

    parameters = list(model.parameters())
    trainable = [p for p in parameters if p.requires_grad]
    trainable_count = sum(p.numel() for p in trainable)
    total_count = sum(p.numel() for p in parameters)
    device, dtype = model.device, model.dtype
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator).to(device=device, dtype=dtype)

    uncounted: set[str] = set()
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), without_fast_paths(model), _modes_and_buffers_kept(model):
        model.eval()
        with torch.no_grad():
            whole = count_flops(model.predict, images)
            frozen = count_flops(model.frozen_features, images)
        uncounted.update(whole.uncounted_ops, frozen.uncounted_ops)
        features = frozen.result
        step_flops = None
        if train_step:
            model.train()
            labels = torch.zeros(batch, dtype=torch.long, device=device)
            if features is not None:
                step_batch = {"features": list(features), "label": labels}
            else:
                step_batch = {"image": images, "mask": torch.zeros(batch, height, width, device=device), "label": labels}
            step = count_flops(_training_step, model, step_batch, trainable)
            uncounted.update(step.uncounted_ops)
            step_flops = step.flops / batch

    return ComplexityReport(
        model=model.name or type(model).__name__,
        input_size=(height, width),
        batch=batch,
        parameters=total_count,
        trainable_parameters=trainable_count,
        frozen_parameters=total_count - trainable_count,
        predict_flops=whole.flops / batch,
        frozen_flops=None if features is None else frozen.flops / batch,
        train_step_flops=step_flops,
        uncounted_ops=tuple(sorted(uncounted)),
    )


def _training_step(model: AnomalyModel, batch: dict[str, Any], trainable: list[nn.Parameter]) -> None:
    """``loss(batch)`` and its gradients with respect to ``trainable`` (returned, not stored in ``.grad``)."""
    with torch.enable_grad():
        loss = model.loss(batch)
        if trainable and loss.requires_grad:
            torch.autograd.grad(loss, trainable, allow_unused=True)


__all__ = ["ComplexityReport", "FlopCount", "count_flops", "measure", "without_fast_paths"]
