"""C++/CUDA backend of the flow-block ops (``msflow_fast._C``, sources ``csrc/coupling.cpp`` and
``csrc/cuda/coupling.cu``).

Registers fake (meta) kernels for every ``msflow_fast::*`` coupling op and autograd for the
forward and inverse ops (their backward calls the matching ``*_bwd`` op, which recomputes
``s``, ``t`` and ``exp(+-s)`` from the saved inputs instead of storing them). The functions
below carry the names, signatures and return values of :mod:`msflow_fast.ops.reference`.

Ops (``msflow_fast::<name>``), all on NCHW-contiguous tensors:

* ``affine_coupling_fwd|inv(x, a, clamp, clamp_form) -> (y, logdet)``
* ``affine_coupling_bwd(grad_y, grad_logdet, x, a, clamp, clamp_form, reverse) -> (grad_x, grad_a)``
* ``global_affine_permute_fwd|inv(x, global_scale[C], global_offset[C], perm[C], affine_type) -> (y, logdet)``
* ``global_affine_permute_bwd(grad_y, grad_logdet, x, global_scale, global_offset, perm, affine_type,
  reverse) -> (grad_x, grad_scale, grad_offset)``
* ``coupling_affine_permute_fwd(x, a, global_scale, global_offset, perm, clamp, clamp_form, affine_type)
  -> (y, logdet)``
* ``coupling_affine_permute_bwd(grad_y, grad_logdet, x, a, global_scale, perm, clamp, clamp_form,
  affine_type) -> (grad_x, grad_a, grad_scale, grad_offset)``

Dtypes: ``x``, ``a``, ``grad_y`` and the element outputs share one dtype: float32 and float64 on
CPU and CUDA, and float16/bfloat16 on both too (computed in float32, outputs rounded to the input
dtype). Everything per sample or per channel is in the accumulation dtype ``acc`` (float32 for
float16/bfloat16/float32 ``x``, float64 for float64 ``x``): ``global_scale``, ``global_offset``,
the log-dets, ``grad_logdet`` and the parameter gradients. The functions below convert the
parameters to ``acc`` (a no-op for float32/float64 ``x``; float32 parameters of half inputs are
used unrounded) and autograd casts their gradients back to the parameters' own dtype. Log-dets
are accumulated in float64 on CPU and in ``acc`` on CUDA. On CPU the
permutation is checked to be a permutation of ``0..C-1``; on CUDA its values are trusted (the
public functions in :mod:`msflow_fast.ops` document this). Importing this module raises
``ImportError`` when the extension is not available.
"""

from __future__ import annotations

import torch

from ._extension import extension_ops
from .reference import compute_dtype

_ops = extension_ops("affine_coupling_fwd", "the coupling ops (csrc/coupling.cpp)")


def _like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


def _logdet_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0],), dtype=compute_dtype(x.dtype))


# ---------------------------------------------------------------------------------------------
# fake (meta) kernels


@torch.library.register_fake("msflow_fast::affine_coupling_fwd")
def _affine_coupling_fwd_fake(x: torch.Tensor, a: torch.Tensor, clamp: float, clamp_form: str):
    return _like(x), _logdet_like(x)


@torch.library.register_fake("msflow_fast::affine_coupling_inv")
def _affine_coupling_inv_fake(x: torch.Tensor, a: torch.Tensor, clamp: float, clamp_form: str):
    return _like(x), _logdet_like(x)


@torch.library.register_fake("msflow_fast::affine_coupling_bwd")
def _affine_coupling_bwd_fake(grad_y, grad_logdet, x, a, clamp, clamp_form, reverse):
    return _like(x), _like(a)


@torch.library.register_fake("msflow_fast::global_affine_permute_fwd")
def _global_affine_permute_fwd_fake(x, global_scale, global_offset, perm, affine_type):
    return _like(x), _logdet_like(x)


@torch.library.register_fake("msflow_fast::global_affine_permute_inv")
def _global_affine_permute_inv_fake(x, global_scale, global_offset, perm, affine_type):
    return _like(x), _logdet_like(x)


@torch.library.register_fake("msflow_fast::global_affine_permute_bwd")
def _global_affine_permute_bwd_fake(grad_y, grad_logdet, x, global_scale, global_offset, perm, affine_type, reverse):
    return _like(x), _like(global_scale), _like(global_offset)


@torch.library.register_fake("msflow_fast::coupling_affine_permute_fwd")
def _coupling_affine_permute_fwd_fake(x, a, global_scale, global_offset, perm, clamp, clamp_form, affine_type):
    return _like(x), _logdet_like(x)


@torch.library.register_fake("msflow_fast::coupling_affine_permute_bwd")
def _coupling_affine_permute_bwd_fake(grad_y, grad_logdet, x, a, global_scale, perm, clamp, clamp_form, affine_type):
    return _like(x), _like(a), _like(global_scale), _like(global_scale)


# ---------------------------------------------------------------------------------------------
# autograd


def _contiguous_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype).contiguous()``, skipping ``to`` when ``t`` has that dtype (the call costs about a
    microsecond even when it returns ``t``)."""
    return (t if t.dtype == dtype else t.to(dtype)).contiguous()


def _grads(x: torch.Tensor, grad_y: torch.Tensor | None, grad_logdet: torch.Tensor | None):
    """Contiguous output gradients (``grad_logdet`` in the accumulation dtype); ``None`` becomes zeros."""
    acc = compute_dtype(x.dtype)
    grad_y = torch.zeros_like(x) if grad_y is None else _contiguous_as(grad_y, x.dtype)
    grad_logdet = x.new_zeros((x.shape[0],), dtype=acc) if grad_logdet is None else _contiguous_as(grad_logdet, acc)
    return grad_y, grad_logdet


def _affine_coupling_setup(ctx, inputs, output) -> None:
    x, a, clamp, clamp_form = inputs
    ctx.save_for_backward(x, a)
    ctx.clamp = clamp
    ctx.clamp_form = clamp_form


def _affine_coupling_backward(reverse: bool):
    def backward(ctx, grad_y, grad_logdet):
        x, a = ctx.saved_tensors
        grad_y, grad_logdet = _grads(x, grad_y, grad_logdet)
        grad_x, grad_a = _ops.affine_coupling_bwd(grad_y, grad_logdet, x, a, ctx.clamp, ctx.clamp_form, reverse)
        return grad_x, grad_a, None, None

    return backward


torch.library.register_autograd(
    "msflow_fast::affine_coupling_fwd", _affine_coupling_backward(False), setup_context=_affine_coupling_setup
)
torch.library.register_autograd(
    "msflow_fast::affine_coupling_inv", _affine_coupling_backward(True), setup_context=_affine_coupling_setup
)


def _global_affine_permute_setup(ctx, inputs, output) -> None:
    x, global_scale, global_offset, perm, affine_type = inputs
    ctx.save_for_backward(x, global_scale, global_offset, perm)
    ctx.affine_type = affine_type


def _global_affine_permute_backward(reverse: bool):
    def backward(ctx, grad_y, grad_logdet):
        x, global_scale, global_offset, perm = ctx.saved_tensors
        grad_y, grad_logdet = _grads(x, grad_y, grad_logdet)
        grad_x, grad_scale, grad_offset = _ops.global_affine_permute_bwd(
            grad_y, grad_logdet, x, global_scale, global_offset, perm, ctx.affine_type, reverse
        )
        return grad_x, grad_scale, grad_offset, None, None

    return backward


torch.library.register_autograd(
    "msflow_fast::global_affine_permute_fwd",
    _global_affine_permute_backward(False),
    setup_context=_global_affine_permute_setup,
)
torch.library.register_autograd(
    "msflow_fast::global_affine_permute_inv",
    _global_affine_permute_backward(True),
    setup_context=_global_affine_permute_setup,
)


def _coupling_affine_permute_setup(ctx, inputs, output) -> None:
    x, a, global_scale, global_offset, perm, clamp, clamp_form, affine_type = inputs
    ctx.save_for_backward(x, a, global_scale, perm)
    ctx.clamp = clamp
    ctx.clamp_form = clamp_form
    ctx.affine_type = affine_type


def _coupling_affine_permute_backward(ctx, grad_y, grad_logdet):
    x, a, global_scale, perm = ctx.saved_tensors
    grad_y, grad_logdet = _grads(x, grad_y, grad_logdet)
    grad_x, grad_a, grad_scale, grad_offset = _ops.coupling_affine_permute_bwd(
        grad_y, grad_logdet, x, a, global_scale, perm, ctx.clamp, ctx.clamp_form, ctx.affine_type
    )
    return grad_x, grad_a, grad_scale, grad_offset, None, None, None, None


torch.library.register_autograd(
    "msflow_fast::coupling_affine_permute_fwd",
    _coupling_affine_permute_backward,
    setup_context=_coupling_affine_permute_setup,
)


# ---------------------------------------------------------------------------------------------
# functions with the reference signatures


def affine_coupling(
    x: torch.Tensor,
    a: torch.Tensor,
    *,
    clamp: float,
    clamp_form: str = "tanh",
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """C++/CUDA :func:`msflow_fast.ops.reference.affine_coupling`: ``(y [B, C, H, W], logdet [B])``."""
    op = _ops.affine_coupling_inv if reverse else _ops.affine_coupling_fwd
    y, logdet = op(x.contiguous(), a.contiguous(), float(clamp), clamp_form)
    return y, logdet


def _channel_param(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # [1, C, 1, 1] (or any shape with C elements) -> [C] in the accumulation dtype (never rounded to a
    # half x.dtype); autograd maps the gradient back to the parameter's shape and dtype.
    return _contiguous_as(param.reshape(x.shape[1]), compute_dtype(x.dtype))


def global_affine_permute(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    global_offset: torch.Tensor,
    perm: torch.Tensor,
    *,
    affine_type: str = "SOFTPLUS",
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """C++/CUDA :func:`msflow_fast.ops.reference.global_affine_permute`: ``(y [B, C, H, W], logdet [B])``."""
    op = _ops.global_affine_permute_inv if reverse else _ops.global_affine_permute_fwd
    y, logdet = op(
        x.contiguous(),
        _channel_param(global_scale, x),
        _channel_param(global_offset, x),
        perm.contiguous(),
        affine_type,
    )
    return y, logdet


def coupling_affine_permute(
    x: torch.Tensor,
    a: torch.Tensor,
    global_scale: torch.Tensor,
    global_offset: torch.Tensor,
    perm: torch.Tensor,
    *,
    clamp: float,
    clamp_form: str = "tanh",
    affine_type: str = "SOFTPLUS",
) -> tuple[torch.Tensor, torch.Tensor]:
    """C++/CUDA :func:`msflow_fast.ops.reference.coupling_affine_permute`: ``(y [B, C, H, W], logdet [B])``."""
    y, logdet = _ops.coupling_affine_permute_fwd(
        x.contiguous(),
        a.contiguous(),
        _channel_param(global_scale, x),
        _channel_param(global_offset, x),
        perm.contiguous(),
        float(clamp),
        clamp_form,
        affine_type,
    )
    return y, logdet


__all__ = ["affine_coupling", "coupling_affine_permute", "global_affine_permute"]
