"""Public flow-block ops: affine coupling, global affine + permutation, and the fused block tail.

Each function validates its inputs, picks a backend (see :mod:`msflow_fast.ops._backend`) and
calls that backend's implementation, which matches :mod:`msflow_fast.ops.reference` and supports
autograd. Shapes, units and formulas are documented on the reference functions.

Dtypes: ``x`` and ``a`` share one floating dtype; ``global_scale`` and ``global_offset`` have
``x.dtype`` or, for float16/bfloat16 ``x``, float32. Precision follows the mixed-precision policy
of :mod:`msflow_fast.ops`.
"""

from __future__ import annotations

import torch

from . import _backend
from . import _validate as v


def _check_block_input(x: torch.Tensor, a: torch.Tensor, active: int, clamp: float, clamp_form: str) -> None:
    v.tensor(x, "x", ndim=4)
    v.tensor(a, "a", ndim=4)
    v.same_device_dtype("x", x, a=a)
    b, _, h, w = x.shape
    expected = (b, 2 * active, h, w)
    if tuple(a.shape) != expected:
        raise ValueError(
            f"a (the subnet output) must have shape {expected} = [B, 2 * {active}, H, W] for x of shape "
            f"{tuple(x.shape)}, got {tuple(a.shape)}"
        )
    v.positive_float(clamp, "clamp")
    v.clamp_form(clamp_form)


def _check_global_affine(
    x: torch.Tensor, global_scale: torch.Tensor, global_offset: torch.Tensor, perm: torch.Tensor, affine_type: str
) -> None:
    channels = x.shape[1]
    v.channel_vector(global_scale, "global_scale", channels, x)
    v.channel_vector(global_offset, "global_offset", channels, x)
    v.parameter_dtype(global_scale, "global_scale", x)
    v.parameter_dtype(global_offset, "global_offset", x)
    v.permutation(perm, channels, x)
    v.affine_type(affine_type)


def affine_coupling(
    x: torch.Tensor,
    a: torch.Tensor,
    *,
    clamp: float,
    clamp_form: str = "tanh",
    reverse: bool = False,
    backend: str | None = None,
    check_finite: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-clamped affine coupling ``y = x * exp(s) + t`` (or its inverse) and its log-det.

    Args:
        x: active half ``[B, C, H, W]``.
        a: raw subnet output ``[B, 2C, H, W]`` (scale half, then shift half).
        clamp: soft clamp ``alpha > 0`` (MSFlow: 1.9).
        clamp_form: ``"tanh"`` (FrEIA 0.2, default), ``"tanh_scaled"`` (FrEIA >= 2023-08) or ``"atan"``.
        reverse: compute the inverse; the log-det is then negated.
        backend: ``"reference"``, ``"triton"``, ``"cpp"`` or ``None``/``"auto"``.
        check_finite: raise ``ValueError`` if an input or the log-det is not finite
            (default: ``MSFLOW_FAST_CHECK_FINITE=1``).

    Returns:
        ``(y [B, C, H, W], logdet [B])`` with ``logdet`` in nats; ``y`` in ``x.dtype``, ``logdet``
        in float32 for float16/bfloat16 inputs (computed in float32), else in ``x.dtype``.
    """
    v.tensor(x, "x", ndim=4)
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least 1 channel, got shape {tuple(x.shape)}")
    _check_block_input(x, a, x.shape[1], clamp, clamp_form)
    checking = v.check_finite_enabled(check_finite)
    if checking:
        v.finite(x, "x")
        v.finite(a, "a")
    _, impl = _backend.resolve("affine_coupling", x.device, backend)
    y, logdet = impl(x, a, clamp=float(clamp), clamp_form=clamp_form, reverse=bool(reverse))
    if checking:
        v.finite(logdet, "logdet of affine_coupling")
    return y, logdet


def global_affine_permute(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    global_offset: torch.Tensor,
    perm: torch.Tensor,
    *,
    affine_type: str = "SOFTPLUS",
    reverse: bool = False,
    backend: str | None = None,
    check_finite: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel global affine ``x * g + b`` then the channel gather ``y[:, i] = v[:, perm[i]]``.

    Args:
        x: ``[B, C, H, W]``.
        global_scale: raw scale ``gamma`` with ``C`` elements; ``g = psi(gamma)`` per ``affine_type``.
            In ``x.dtype``, or float32 for float16/bfloat16 ``x`` (used unrounded; recommended).
        global_offset: offset ``b`` with ``C`` elements, dtype as ``global_scale``.
        perm: int64 ``[C]`` permutation (the forward one, also for ``reverse=True``).
        affine_type: ``"SOFTPLUS"`` (default), ``"SIGMOID"`` or ``"EXP"``.
        reverse: compute the inverse (scatter, subtract, divide); the log-det is then negated.
        backend, check_finite: as in :func:`affine_coupling`.

    Returns:
        ``(y [B, C, H, W], logdet [B])`` with ``logdet = H * W * sum_c log g_c`` in nats; ``y`` in
        ``x.dtype``, ``logdet`` in float32 for float16/bfloat16 ``x``, else in ``x.dtype``.

    Raises:
        TypeError: a parameter has neither ``x.dtype`` nor (for float16/bfloat16 ``x``) float32.
    """
    v.tensor(x, "x", ndim=4)
    _check_global_affine(x, global_scale, global_offset, perm, affine_type)
    checking = v.check_finite_enabled(check_finite)
    if checking:
        v.finite(x, "x")
        v.finite(global_scale, "global_scale")
        v.finite(global_offset, "global_offset")
    _, impl = _backend.resolve("global_affine_permute", x.device, backend)
    y, logdet = impl(x, global_scale, global_offset, perm, affine_type=affine_type, reverse=bool(reverse))
    if checking:
        v.finite(logdet, "logdet of global_affine_permute")
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
    backend: str | None = None,
    check_finite: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward tail of an AllInOneBlock in one pass: couple the active half, global affine, permute.

    Args:
        x: block input ``[B, C, H, W]``, ``C >= 2``; passive half ``x[:, :C - C // 2]``.
        a: raw subnet output ``[B, 2 * (C // 2), H, W]``.
        global_scale, global_offset, perm, affine_type: as in :func:`global_affine_permute`.
        clamp, clamp_form, backend, check_finite: as in :func:`affine_coupling`.

    Returns:
        ``(y [B, C, H, W], logdet [B])``: the block output, already permuted, in ``x.dtype``, and
        the coupling plus global-affine log-det in nats (float32 for float16/bfloat16 ``x``).

    Raises:
        TypeError: a parameter has neither ``x.dtype`` nor (for float16/bfloat16 ``x``) float32.
    """
    v.tensor(x, "x", ndim=4)
    channels = x.shape[1]
    if channels < 2:
        raise ValueError(f"x must have at least 2 channels to split into halves, got shape {tuple(x.shape)}")
    _check_block_input(x, a, channels // 2, clamp, clamp_form)
    _check_global_affine(x, global_scale, global_offset, perm, affine_type)
    checking = v.check_finite_enabled(check_finite)
    if checking:
        v.finite(x, "x")
        v.finite(a, "a")
        v.finite(global_scale, "global_scale")
        v.finite(global_offset, "global_offset")
    _, impl = _backend.resolve("coupling_affine_permute", x.device, backend)
    y, logdet = impl(
        x,
        a,
        global_scale,
        global_offset,
        perm,
        clamp=float(clamp),
        clamp_form=clamp_form,
        affine_type=affine_type,
    )
    if checking:
        v.finite(logdet, "logdet of coupling_affine_permute")
    return y, logdet
