"""Triton kernels and launchers of the norm ops: the fused channel LayerNorm + ReLU (the coupling
subnet's middle) and the per-sample LayerNorm over [C, H, W] (FastFlow's features; see its section).

``out[b, :, n] = relu(LayerNorm_C(x[b, :, n] + addend[b or 0, :, n]) * weight + bias)`` for
NCHW-contiguous ``x [B, C, N]`` (``N = H * W``). One program owns ``BLOCK_N`` consecutive pixels
of one image and walks the channels in ``BLOCK_C`` chunks (two-pass mean and variance, then the
write), so loads are coalesced along the pixels and any C fits. Accumulation is float32 for
half/bfloat16/float32 inputs and float64 for float64. The backward writes per-program partial
sums of the parameter gradients, reduced by the launcher (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET, acc_dtype, tl_acc


def _blocks(C: int, N: int) -> tuple[int, int]:
    # The interpreter pays per program instance, a GPU per register: big tiles there, moderate here.
    block_n = min(triton.next_power_of_2(max(N, 1)), 1024 if _INTERPRET else 64)
    block_c = min(triton.next_power_of_2(max(C, 1)), max(1, (8192 if _INTERPRET else 2048) // block_n))
    return block_c, block_n


@triton.jit
def _load_rows(x_ptr, add_ptr, base, add_base, cc, offs_n, C, N, mask_n, HAS_ADD: tl.constexpr, ACC: tl.constexpr):
    # v[c, n] = x[c, n] + addend[c, n] for the channels cc of one pixel tile (0 outside C x N)
    mask = (cc[:, None] < C) & mask_n[None, :]
    off = cc[:, None].to(tl.int64) * N + offs_n[None, :]
    v = tl.load(x_ptr + base + off, mask=mask, other=0.0).to(ACC)
    if HAS_ADD:
        v += tl.load(add_ptr + add_base + off, mask=mask, other=0.0).to(ACC)
    return v, mask, off


@triton.jit
def _pixel_tile(C, N, tiles, add_batch_stride, BLOCK_N: tl.constexpr):
    # This program's pixels: image b, pixels offs_n of it; offsets of image b in x, addend and the stats
    b = tl.program_id(0) // tiles
    offs_n = (tl.program_id(0) % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    b64 = b.to(tl.int64)
    return offs_n, offs_n < N, b64 * C * N, b64 * add_batch_stride, b64 * N + offs_n


@triton.jit
def _channel_layer_norm_relu_fwd_kernel(
    x_ptr, add_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr,
    C, N, tiles, add_batch_stride,
    EPS: tl.constexpr, HAS_ADD: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # EPS is a constexpr so that float64 kernels see it unrounded (a runtime float is passed as float32).
    offs_n, mask_n, base, add_base, stat = _pixel_tile(C, N, tiles, add_batch_stride, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        v, mask, off = _load_rows(x_ptr, add_ptr, base, add_base, c0 + offs_c, offs_n, C, N, mask_n, HAS_ADD, ACC)
        acc += v
    mean = tl.sum(acc, axis=0) / C
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):  # two-pass variance: no cancellation
        v, mask, off = _load_rows(x_ptr, add_ptr, base, add_base, c0 + offs_c, offs_n, C, N, mask_n, HAS_ADD, ACC)
        d = tl.where(mask, v - mean[None, :], 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / C + EPS)
    tl.store(mean_ptr + stat, mean, mask=mask_n)
    tl.store(rstd_ptr + stat, rstd, mask=mask_n)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        v, mask, off = _load_rows(x_ptr, add_ptr, base, add_base, cc, offs_n, C, N, mask_n, HAS_ADD, ACC)
        w = tl.load(w_ptr + cc, mask=cc < C, other=0.0).to(ACC)
        bias = tl.load(b_ptr + cc, mask=cc < C, other=0.0).to(ACC)
        y = (v - mean[None, :]) * rstd[None, :] * w[:, None] + bias[:, None]
        y = tl.where(y > 0.0, y, 0.0)
        tl.store(out_ptr + base + off, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_grad(
    grad_ptr, x_ptr, add_ptr, w_ptr, b_ptr, base, add_base, cc, offs_n, C, N, mask_n, mean, rstd,
    HAS_ADD: tl.constexpr, ACC: tl.constexpr,
):
    # For the channels cc of the tile: xhat = (v - mean) * rstd, g = grad * (y > 0) (0 outside), weight
    v, mask, off = _load_rows(x_ptr, add_ptr, base, add_base, cc, offs_n, C, N, mask_n, HAS_ADD, ACC)
    dy = tl.load(grad_ptr + base + off, mask=mask, other=0.0).to(ACC)
    w = tl.load(w_ptr + cc, mask=cc < C, other=0.0).to(ACC)
    bias = tl.load(b_ptr + cc, mask=cc < C, other=0.0).to(ACC)
    xhat = (v - mean[None, :]) * rstd[None, :]
    g = tl.where(mask & (xhat * w[:, None] + bias[:, None] > 0.0), dy, 0.0)
    return xhat, g, w, mask, off


@triton.jit
def _channel_layer_norm_relu_bwd_kernel(
    grad_ptr, x_ptr, add_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr,
    C, N, tiles, add_batch_stride,
    HAS_ADD: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # g = grad * (y > 0), xhat = (v - mean) * rstd, gx = g * w:
    # dx = rstd * (gx - mean_C(gx) - xhat * mean_C(gx * xhat)); partial dw = sum_n g * xhat, db = sum_n g
    offs_n, mask_n, base, add_base, stat = _pixel_tile(C, N, tiles, add_batch_stride, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    mean = tl.load(mean_ptr + stat, mask=mask_n, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + stat, mask=mask_n, other=0.0).to(ACC)
    s1 = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    s2 = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    partial = tl.program_id(0).to(tl.int64) * C
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        xhat, g, w, mask, off = _gated_grad(
            grad_ptr, x_ptr, add_ptr, w_ptr, b_ptr, base, add_base, cc, offs_n, C, N, mask_n, mean, rstd, HAS_ADD, ACC
        )
        gx = g * w[:, None]
        s1 += gx
        s2 += gx * xhat
        tl.store(dw_partial_ptr + partial + cc, tl.sum(g * xhat, axis=1), mask=cc < C)
        tl.store(db_partial_ptr + partial + cc, tl.sum(g, axis=1), mask=cc < C)
    m1 = tl.sum(s1, axis=0) / C
    m2 = tl.sum(s2, axis=0) / C
    for c0 in range(0, C, BLOCK_C):
        xhat, g, w, mask, off = _gated_grad(
            grad_ptr, x_ptr, add_ptr, w_ptr, b_ptr, base, add_base, c0 + offs_c, offs_n, C, N, mask_n, mean, rstd,
            HAS_ADD, ACC,
        )
        gx = g * w[:, None]
        dx = rstd[None, :] * (gx - m1[None, :] - xhat * m2[None, :])
        tl.store(dx_ptr + base + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_args(x: torch.Tensor, addend: torch.Tensor | None) -> tuple[int, int, int, int, int, int, int, torch.Tensor]:
    B, C, H, W = x.shape
    N = H * W
    block_c, block_n = _blocks(C, N)
    tiles = triton.cdiv(N, block_n)
    add_batch_stride = C * N if addend is not None and addend.shape[0] == B else 0
    return B, C, N, block_c, block_n, tiles, add_batch_stride, (addend if addend is not None else x)


def channel_layer_norm_relu_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, addend: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous ``x [B, C, H, W]``, ``addend [1 or B, C, H, W]`` or None -> ``(out, mean [B, N], rstd [B, N])``."""
    B, C, N, block_c, block_n, tiles, add_batch_stride, add = _launch_args(x, addend)
    acc = acc_dtype(x.dtype)
    out = torch.empty_like(x)
    mean = torch.empty((B, N), dtype=acc, device=x.device)
    rstd = torch.empty((B, N), dtype=acc, device=x.device)
    if x.numel() == 0:
        return out, mean, rstd
    _channel_layer_norm_relu_fwd_kernel[(B * tiles,)](
        x_ptr=x, add_ptr=add, w_ptr=weight, b_ptr=bias, out_ptr=out, mean_ptr=mean, rstd_ptr=rstd,
        C=C, N=N, tiles=tiles, add_batch_stride=add_batch_stride,
        EPS=float(eps), HAS_ADD=addend is not None, ACC=tl_acc(x.dtype), BLOCK_C=block_c, BLOCK_N=block_n,
    )
    return out, mean, rstd


def channel_layer_norm_relu_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    addend: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight [C], grad_bias [C])``; the parameter gradients in the acc dtype."""
    B, C, N, block_c, block_n, tiles, add_batch_stride, add = _launch_args(x, addend)
    acc = acc_dtype(x.dtype)
    grad_x = torch.empty_like(x)
    dw_partial = torch.empty((B * tiles, C), dtype=acc, device=x.device)
    db_partial = torch.empty((B * tiles, C), dtype=acc, device=x.device)
    if x.numel() == 0:
        return grad_x, dw_partial.sum(0), db_partial.sum(0)
    _channel_layer_norm_relu_bwd_kernel[(B * tiles,)](
        grad_ptr=grad, x_ptr=x, add_ptr=add, w_ptr=weight, b_ptr=bias, mean_ptr=mean, rstd_ptr=rstd,
        dx_ptr=grad_x, dw_partial_ptr=dw_partial, db_partial_ptr=db_partial,
        C=C, N=N, tiles=tiles, add_batch_stride=add_batch_stride,
        HAS_ADD=addend is not None, ACC=tl_acc(x.dtype), BLOCK_C=block_c, BLOCK_N=block_n,
    )
    return grad_x, dw_partial.sum(0), db_partial.sum(0)


# ------------------------------------------------------------------------------- per-sample norm
#
# ``out[b, n] = (x[b, n] - mean_b) * rstd_b * weight[n] + bias[n]`` over the N = numel / B values of
# each sample of a contiguous ``x [B, N]``. The statistics are a split reduction: one program per
# (chunk of _SAMPLE_CHUNK values, sample) computes the chunk's two-pass mean and M2, one program per
# sample merges its chunks (mean = sum n_i m_i / N, M2 = sum M2_i + n_i (m_i - mean)^2); the
# backward's per-sample sums of gx = grad * weight and gx * xhat are split the same way. Its last
# kernel walks the batch per column tile, so grad_weight and grad_bias are sums over b in order.
# Deterministic (fixed splits, no atomics).

_SAMPLE_BLOCK = 4096 if _INTERPRET else 1024  # values per program step
_SAMPLE_CHUNK = 4096  # values per partial statistic
_SAMPLE_SPLIT_BLOCK = 1024  # partial statistics merged per step


@triton.jit
def _sample_layer_norm_fwd_stats_kernel(x_ptr, partial_ptr, N, chunk, splits, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # partial[b, s] = (mean, M2) of x[b, s * chunk : (s + 1) * chunk], two-pass
    s = tl.program_id(0)
    b = tl.program_id(1)
    lo = s * chunk
    hi = tl.minimum(lo + chunk, N)
    base = x_ptr + b.to(tl.int64) * N
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        acc += tl.load(base + idx, mask=idx < hi, other=0.0).to(ACC)
    mean = tl.sum(acc, axis=0) / (hi - lo)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        d = tl.where(idx < hi, tl.load(base + idx, mask=idx < hi, other=0.0).to(ACC) - mean, 0.0)
        acc += d * d
    out = partial_ptr + (b.to(tl.int64) * splits + s) * 2
    tl.store(out, mean)
    tl.store(out + 1, tl.sum(acc, axis=0))


@triton.jit
def _sample_layer_norm_fwd_reduce_kernel(
    partial_ptr, mean_ptr, rstd_ptr, N, chunk, splits, EPS: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr
):
    # mean = sum_i n_i m_i / N, M2 = sum_i (M2_i + n_i (m_i - mean)^2), rstd = 1 / sqrt(M2 / N + eps)
    b = tl.program_id(0)
    base = partial_ptr + b.to(tl.int64) * splits * 2
    offs = tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_S], dtype=ACC)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + offs
        mask = s < splits
        count = tl.minimum(N - s * chunk, chunk).to(ACC)
        acc += tl.where(mask, count * tl.load(base + 2 * s, mask=mask, other=0.0), 0.0)
    mean = tl.sum(acc, axis=0) / N
    acc = tl.zeros([BLOCK_S], dtype=ACC)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + offs
        mask = s < splits
        count = tl.minimum(N - s * chunk, chunk).to(ACC)
        d = tl.load(base + 2 * s, mask=mask, other=0.0) - mean
        acc += tl.where(mask, tl.load(base + 2 * s + 1, mask=mask, other=0.0) + count * d * d, 0.0)
    tl.store(mean_ptr + b, mean)
    tl.store(rstd_ptr + b, 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + EPS))


@triton.jit
def _sample_layer_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, out_ptr, N, AFFINE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    # out[b, n] = (x[b, n] - mean[b]) * rstd[b] * weight[n] + bias[n]
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(1)
    mask = offs < N
    base = b.to(tl.int64) * N
    y = (tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC) - tl.load(mean_ptr + b)) * tl.load(rstd_ptr + b)
    if AFFINE:
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC) + tl.load(b_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sample_layer_norm_bwd_stats_kernel(
    grad_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, partial_ptr, N, chunk, splits,
    AFFINE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # partial[b, s] = (sum gx, sum gx * xhat) over chunk s of sample b; xhat = (x - mean) * rstd, gx = grad * weight
    s = tl.program_id(0)
    b = tl.program_id(1)
    lo = s * chunk
    hi = tl.minimum(lo + chunk, N)
    base = b.to(tl.int64) * N
    mean = tl.load(mean_ptr + b)
    rstd = tl.load(rstd_ptr + b)
    offs = tl.arange(0, BLOCK)
    s1 = tl.zeros([BLOCK], dtype=ACC)
    s2 = tl.zeros([BLOCK], dtype=ACC)
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        mask = idx < hi
        xhat = (tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(ACC) - mean) * rstd
        gx = tl.load(grad_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        if AFFINE:
            gx = gx * tl.load(w_ptr + idx, mask=mask, other=0.0).to(ACC)
        s1 += gx
        s2 += gx * xhat
    out = partial_ptr + (b.to(tl.int64) * splits + s) * 2
    tl.store(out, tl.sum(s1, axis=0))
    tl.store(out + 1, tl.sum(s2, axis=0))


@triton.jit
def _sample_layer_norm_bwd_reduce_kernel(partial_ptr, means_ptr, N, splits, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    # means[b] = (sum_s partial[b, s, 0] / N, sum_s partial[b, s, 1] / N)
    b = tl.program_id(0)
    base = partial_ptr + b.to(tl.int64) * splits * 2
    offs = tl.arange(0, BLOCK_S)
    s1 = tl.zeros([BLOCK_S], dtype=ACC)
    s2 = tl.zeros([BLOCK_S], dtype=ACC)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + offs
        s1 += tl.load(base + 2 * s, mask=s < splits, other=0.0)
        s2 += tl.load(base + 2 * s + 1, mask=s < splits, other=0.0)
    tl.store(means_ptr + 2 * b, tl.sum(s1, axis=0) / N)
    tl.store(means_ptr + 2 * b + 1, tl.sum(s2, axis=0) / N)


@triton.jit
def _sample_layer_norm_bwd_kernel(
    grad_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, means_ptr, dx_ptr, dw_ptr, db_ptr, B, N,
    AFFINE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # dx = rstd * (gx - mean_N gx - xhat * mean_N(gx * xhat)); dw[n] = sum_b grad * xhat, db[n] = sum_b grad
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC) if AFFINE else 1.0
    dw = tl.zeros([BLOCK], dtype=ACC)
    db = tl.zeros([BLOCK], dtype=ACC)
    row = tl.program_id(0).to(tl.int64) * 0
    for b in range(0, B):
        mean = tl.load(mean_ptr + b)
        rstd = tl.load(rstd_ptr + b)
        m1 = tl.load(means_ptr + 2 * b)
        m2 = tl.load(means_ptr + 2 * b + 1)
        xhat = (tl.load(x_ptr + row + offs, mask=mask, other=0.0).to(ACC) - mean) * rstd
        g = tl.load(grad_ptr + row + offs, mask=mask, other=0.0).to(ACC)
        dx = rstd * (g * w - m1 - xhat * m2)
        tl.store(dx_ptr + row + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += g * xhat
        db += g
        row += N
    if AFFINE:
        tl.store(dw_ptr + offs, dw, mask=mask)
        tl.store(db_ptr + offs, db, mask=mask)


def _sample_splits(N: int) -> tuple[int, int, int]:
    """(splits, chunk, split block) of the per-sample reductions."""
    splits = triton.cdiv(N, _SAMPLE_CHUNK)
    return splits, _SAMPLE_CHUNK, min(triton.next_power_of_2(splits), _SAMPLE_SPLIT_BLOCK)


def sample_layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous ``x [B, N]``, ``weight``/``bias [N]`` or None -> ``(out [B, N], mean [B], rstd [B])``."""
    B, N = x.shape
    acc = acc_dtype(x.dtype)
    out = torch.empty_like(x)
    mean = torch.empty((B,), dtype=acc, device=x.device)
    rstd = torch.empty((B,), dtype=acc, device=x.device)
    splits, chunk, block_s = _sample_splits(N)
    partial = torch.empty((B, splits, 2), dtype=acc, device=x.device)
    _sample_layer_norm_fwd_stats_kernel[(splits, B)](
        x_ptr=x, partial_ptr=partial, N=N, chunk=chunk, splits=splits, ACC=tl_acc(x.dtype), BLOCK=_SAMPLE_BLOCK
    )
    _sample_layer_norm_fwd_reduce_kernel[(B,)](
        partial_ptr=partial, mean_ptr=mean, rstd_ptr=rstd, N=N, chunk=chunk, splits=splits,
        EPS=float(eps), ACC=tl_acc(x.dtype), BLOCK_S=block_s,
    )
    affine = weight is not None
    _sample_layer_norm_fwd_kernel[(triton.cdiv(N, _SAMPLE_BLOCK), B)](
        x_ptr=x, w_ptr=weight if affine else x, b_ptr=bias if affine else x, mean_ptr=mean, rstd_ptr=rstd, out_ptr=out,
        N=N, AFFINE=affine, ACC=tl_acc(x.dtype), BLOCK=_SAMPLE_BLOCK,
    )
    return out, mean, rstd


def sample_layer_norm_bwd(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_x [B, N], grad_weight [N], grad_bias [N])`` (parameter gradients in the acc dtype, None without affine)."""
    B, N = x.shape
    acc = acc_dtype(x.dtype)
    affine = weight is not None
    grad_x = torch.empty_like(x)
    grad_weight = torch.empty((N,), dtype=acc, device=x.device) if affine else None
    grad_bias = torch.empty((N,), dtype=acc, device=x.device) if affine else None
    splits, chunk, block_s = _sample_splits(N)
    partial = torch.empty((B, splits, 2), dtype=acc, device=x.device)
    means = torch.empty((B, 2), dtype=acc, device=x.device)
    w = weight if affine else x
    _sample_layer_norm_bwd_stats_kernel[(splits, B)](
        grad_ptr=grad, x_ptr=x, w_ptr=w, mean_ptr=mean, rstd_ptr=rstd, partial_ptr=partial, N=N, chunk=chunk,
        splits=splits, AFFINE=affine, ACC=tl_acc(x.dtype), BLOCK=_SAMPLE_BLOCK,
    )
    _sample_layer_norm_bwd_reduce_kernel[(B,)](
        partial_ptr=partial, means_ptr=means, N=N, splits=splits, ACC=tl_acc(x.dtype), BLOCK_S=block_s
    )
    _sample_layer_norm_bwd_kernel[(triton.cdiv(N, _SAMPLE_BLOCK),)](
        grad_ptr=grad, x_ptr=x, w_ptr=w, mean_ptr=mean, rstd_ptr=rstd, means_ptr=means, dx_ptr=grad_x,
        dw_ptr=grad_weight if affine else means, db_ptr=grad_bias if affine else means, B=B, N=N,
        AFFINE=affine, ACC=tl_acc(x.dtype), BLOCK=_SAMPLE_BLOCK,
    )
    return grad_x, grad_weight, grad_bias
