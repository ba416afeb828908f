"""Triton kernels and launchers of the likelihood and anomaly-map ops.

Launchers take contiguous tensors, allocate their outputs and own the grids; accumulation is
float32 for half/bfloat16/float32 inputs and float64 for float64 inputs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET, acc_dtype, tl_acc

MAX_SCALES = 4
"""Scales handled by one launch of the fused aggregation kernel (more are chained)."""

# The interpreter pays per program instance, a GPU per register: big blocks there, moderate here.
_BLOCK_N = 4096 if _INTERPRET else 1024
_BLOCK_MAP = 4096 if _INTERPRET else 512
_NLL_SPLIT_ELEMENTS = 1 << 22 if _INTERPRET else 1 << 16
_RADIX_BITS = 8


# --------------------------------------------------------------------------------------------- NLL


@triton.jit
def _gaussian_nll_fwd_kernel(z_ptr, partial_ptr, N, chunk, SPLIT, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    # partial[b, s] = sum_{n in chunk s} z[b, n]^2
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=ACC)
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, N)
    base = z_ptr + pid_b.to(tl.int64) * N
    for start in range(lo, hi, BLOCK_N):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < hi, other=0.0).to(ACC)
        acc += x * x
    tl.store(partial_ptr + pid_b * SPLIT + pid_s, tl.sum(acc, axis=0))


@triton.jit
def _gaussian_nll_fwd_reduce_kernel(partial_ptr, logdet_ptr, out_ptr, SPLIT, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    # nll[b] = 0.5 * sum_s partial[b, s] - logdet[b]
    pid_b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_S)
    p = tl.load(partial_ptr + pid_b * SPLIT + offs, mask=offs < SPLIT, other=0.0)
    logdet = tl.load(logdet_ptr + pid_b).to(ACC)
    tl.store(out_ptr + pid_b, 0.5 * tl.sum(p, axis=0) - logdet)


@triton.jit
def _gaussian_nll_bwd_kernel(grad_ptr, z_ptr, dz_ptr, N, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    # dz[b, n] = grad[b] * z[b, n]
    pid_b = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = idx < N
    base = pid_b.to(tl.int64) * N
    g = tl.load(grad_ptr + pid_b).to(ACC)
    z = tl.load(z_ptr + base + idx, mask=mask, other=0.0).to(ACC)
    tl.store(dz_ptr + base + idx, (g * z).to(dz_ptr.dtype.element_ty), mask=mask)


def gaussian_nll_fwd(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum z[b]^2 - logdet[b]`` of contiguous ``z [B, N]``, ``logdet [B]`` -> ``[B]`` (acc dtype)."""
    B, N = z.shape
    acc = acc_dtype(z.dtype)
    if N == 0:
        return -logdet.to(acc)
    split = max(1, triton.cdiv(N, _NLL_SPLIT_ELEMENTS))
    chunk = triton.cdiv(triton.cdiv(N, split), _BLOCK_N) * _BLOCK_N
    split = max(1, triton.cdiv(N, chunk))
    partial = torch.empty((B, split), dtype=acc, device=z.device)
    out = torch.empty((B,), dtype=acc, device=z.device)
    if B == 0:
        return out
    _gaussian_nll_fwd_kernel[(B, split)](
        z_ptr=z, partial_ptr=partial, N=N, chunk=chunk, SPLIT=split, ACC=tl_acc(z.dtype), BLOCK_N=_BLOCK_N
    )
    _gaussian_nll_fwd_reduce_kernel[(B,)](
        partial_ptr=partial,
        logdet_ptr=logdet,
        out_ptr=out,
        SPLIT=split,
        ACC=tl_acc(z.dtype),
        BLOCK_S=triton.next_power_of_2(split),
    )
    return out


def gaussian_nll_bwd(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``grad[b] * z[b, n]`` for contiguous ``z [B, N]`` and ``grad [B]`` -> ``[B, N]`` in ``z.dtype``."""
    B, N = z.shape
    dz = torch.empty_like(z)
    if z.numel() == 0:
        return dz
    _gaussian_nll_bwd_kernel[(B, triton.cdiv(N, _BLOCK_N))](
        grad_ptr=grad, z_ptr=z, dz_ptr=dz, N=N, ACC=tl_acc(z.dtype), BLOCK_N=_BLOCK_N
    )
    return dz


# ------------------------------------------------------------------------------- log-likelihood map


@triton.jit
def _log_likelihood_map_fwd_kernel(
    z_ptr, out_ptr, C, N, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr
):
    # out[b, n] = -0.5 * (sum_c z[b, c, n]^2) / C
    pid_b = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    base = z_ptr + pid_b.to(tl.int64) * C * N
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        mask = (cc[:, None] < C) & mask_n[None, :]
        x = tl.load(base + cc[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask, other=0.0).to(ACC)
        acc += x * x
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + pid_b.to(tl.int64) * N + offs_n, -0.5 * (total / C), mask=mask_n)


@triton.jit
def _log_likelihood_map_bwd_kernel(
    grad_ptr, z_ptr, dz_ptr, C, N, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr
):
    # dz[b, c, n] = -grad[b, n] * z[b, c, n] / C
    pid_b = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    g = tl.load(grad_ptr + pid_b.to(tl.int64) * N + offs_n, mask=mask_n, other=0.0).to(ACC)
    scale = -g / C
    base = pid_b.to(tl.int64) * C * N
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        mask = (cc[:, None] < C) & mask_n[None, :]
        off = base + cc[:, None].to(tl.int64) * N + offs_n[None, :]
        x = tl.load(z_ptr + off, mask=mask, other=0.0).to(ACC)
        tl.store(dz_ptr + off, (scale[None, :] * x).to(dz_ptr.dtype.element_ty), mask=mask)


def _map_blocks(C: int, N: int) -> tuple[int, int]:
    block_n = min(triton.next_power_of_2(max(N, 1)), 256 if not _INTERPRET else 2048)
    block_c = min(triton.next_power_of_2(max(C, 1)), max(1, (8192 if _INTERPRET else 2048) // block_n))
    return block_c, block_n


def log_likelihood_map_fwd(z: torch.Tensor) -> torch.Tensor:
    """``-0.5 * mean_c z^2`` of contiguous ``z [B, C, H, W]`` -> ``[B, H, W]`` (acc dtype)."""
    B, C, H, W = z.shape
    N = H * W
    out = torch.empty((B, H, W), dtype=acc_dtype(z.dtype), device=z.device)
    if out.numel() == 0:
        return out
    block_c, block_n = _map_blocks(C, N)
    _log_likelihood_map_fwd_kernel[(B, triton.cdiv(N, block_n))](
        z_ptr=z, out_ptr=out, C=C, N=N, ACC=tl_acc(z.dtype), BLOCK_C=block_c, BLOCK_N=block_n
    )
    return out


def log_likelihood_map_bwd(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``-grad * z / C`` for contiguous ``grad [B, H, W]`` and ``z [B, C, H, W]`` -> ``z``'s shape and dtype."""
    B, C, H, W = z.shape
    N = H * W
    dz = torch.empty_like(z)
    if z.numel() == 0:
        return dz
    block_c, block_n = _map_blocks(C, N)
    _log_likelihood_map_bwd_kernel[(B, triton.cdiv(N, block_n))](
        grad_ptr=grad, z_ptr=z, dz_ptr=dz, C=C, N=N, ACC=tl_acc(z.dtype), BLOCK_C=block_c, BLOCK_N=block_n
    )
    return dz


# ------------------------------------------------------------------------------------ aggregation


@triton.jit
def _scale_probability_fwd_kernel(
    logp_ptr, logp_acc_ptr, prob_ptr, n, WITH_PROB: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    # prob[b] = exp(logp[b] - max logp[b]) on one small per-scale map; logp_acc = logp in ACC
    pid_b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    base = pid_b.to(tl.int64) * n
    m = 0.0
    if WITH_PROB:
        mx = tl.full([BLOCK], float("-inf"), dtype=ACC)
        for start in range(0, n, BLOCK):
            idx = start + offs
            x = tl.load(logp_ptr + base + idx, mask=idx < n, other=float("-inf")).to(ACC)
            mx = tl.maximum(mx, x)
        m = tl.max(mx, axis=0)
    for start in range(0, n, BLOCK):
        idx = start + offs
        x = tl.load(logp_ptr + base + idx, mask=idx < n, other=0.0).to(ACC)
        tl.store(logp_acc_ptr + base + idx, x, mask=idx < n)
        if WITH_PROB:
            tl.store(prob_ptr + base + idx, tl.exp(x - m), mask=idx < n)


@triton.jit
def _bilinear_taps(o, in_size, out_size, ACC: tl.constexpr):
    # align_corners=True source index i0, neighbour i1 and weight on i1 for output indices o
    of = o.to(ACC)
    in_span = of * 0 + (in_size - 1)
    out_span = of * 0 + (out_size - 1)
    src = tl.where(out_span > 0, in_span / tl.maximum(out_span, 1.0), 0.0) * of
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(ACC), 0.0), 1.0)
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, lam


@triton.jit
def _bilinear_pair(logp_ptr, prob_ptr, pid_b, h, w, oy, ox, H, W, mask, WITH_PROB: tl.constexpr, ACC: tl.constexpr):
    # bilinear values of one scale's log map and probability map at output pixels (oy, ox)
    y0, y1, ly = _bilinear_taps(oy, h, H, ACC)
    x0, x1, lx = _bilinear_taps(ox, w, W, ACC)
    base = pid_b.to(tl.int64) * h * w
    i00 = base + y0 * w + x0
    i01 = base + y0 * w + x1
    i10 = base + y1 * w + x0
    i11 = base + y1 * w + x1
    hy0 = 1.0 - ly
    wx0 = 1.0 - lx
    a = tl.load(logp_ptr + i00, mask=mask, other=0.0)
    b = tl.load(logp_ptr + i01, mask=mask, other=0.0)
    c = tl.load(logp_ptr + i10, mask=mask, other=0.0)
    d = tl.load(logp_ptr + i11, mask=mask, other=0.0)
    logv = hy0 * (wx0 * a + lx * b) + ly * (wx0 * c + lx * d)
    probv = logv
    if WITH_PROB:
        a = tl.load(prob_ptr + i00, mask=mask, other=0.0)
        b = tl.load(prob_ptr + i01, mask=mask, other=0.0)
        c = tl.load(prob_ptr + i10, mask=mask, other=0.0)
        d = tl.load(prob_ptr + i11, mask=mask, other=0.0)
        probv = hy0 * (wx0 * a + lx * b) + ly * (wx0 * c + lx * d)
    return logv, probv


@triton.jit
def _aggregate_anomaly_maps_fwd_kernel(
    sum_log_ptr,
    sum_prob_ptr,
    block_max_ptr,
    logp0_ptr, prob0_ptr, h0, w0,
    logp1_ptr, prob1_ptr, h1, w1,
    logp2_ptr, prob2_ptr, h2, w2,
    logp3_ptr, prob3_ptr, h3, w3,
    H, W, NUM_BLOCKS,
    NUM_SCALES: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    WITH_PROB: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # L = sum_k Up(L_k), S = sum_k Up(P_k) at each output pixel, plus per-block maxima of L and S
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    N = H * W
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    oy = offs // W
    ox = offs % W
    out_off = pid_b.to(tl.int64) * N + offs
    if ACCUMULATE:
        sum_log = tl.load(sum_log_ptr + out_off, mask=mask, other=0.0)
        sum_prob = sum_log
        if WITH_PROB:
            sum_prob = tl.load(sum_prob_ptr + out_off, mask=mask, other=0.0)
    else:
        sum_log = tl.zeros([BLOCK], dtype=ACC)
        sum_prob = tl.zeros([BLOCK], dtype=ACC)
    lv, pv = _bilinear_pair(logp0_ptr, prob0_ptr, pid_b, h0, w0, oy, ox, H, W, mask, WITH_PROB, ACC)
    sum_log += lv
    sum_prob += pv
    if NUM_SCALES > 1:
        lv, pv = _bilinear_pair(logp1_ptr, prob1_ptr, pid_b, h1, w1, oy, ox, H, W, mask, WITH_PROB, ACC)
        sum_log += lv
        sum_prob += pv
    if NUM_SCALES > 2:
        lv, pv = _bilinear_pair(logp2_ptr, prob2_ptr, pid_b, h2, w2, oy, ox, H, W, mask, WITH_PROB, ACC)
        sum_log += lv
        sum_prob += pv
    if NUM_SCALES > 3:
        lv, pv = _bilinear_pair(logp3_ptr, prob3_ptr, pid_b, h3, w3, oy, ox, H, W, mask, WITH_PROB, ACC)
        sum_log += lv
        sum_prob += pv
    tl.store(sum_log_ptr + out_off, sum_log, mask=mask)
    max_off = (pid_b * NUM_BLOCKS + pid_n) * 2
    tl.store(block_max_ptr + max_off, tl.max(tl.where(mask, sum_log, float("-inf")), axis=0))
    if WITH_PROB:
        tl.store(sum_prob_ptr + out_off, sum_prob, mask=mask)
        tl.store(block_max_ptr + max_off + 1, tl.max(tl.where(mask, sum_prob, float("-inf")), axis=0))


@triton.jit
def _anomaly_maps_finish_fwd_kernel(
    sum_log_ptr,
    sum_prob_ptr,
    block_max_ptr,
    map_add_ptr,
    map_mul_ptr,
    N,
    NUM_BLOCKS,
    WITH_PROB: tl.constexpr,
    LOG_SPACE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # add = max S - S; mul = 1 - exp(L - max L) (max P = exp(0) = 1), or gap = max L - L if LOG_SPACE
    pid_b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < NUM_BLOCKS
    pmax = block_max_ptr + pid_b * NUM_BLOCKS * 2 + offs_p * 2
    max_log = tl.max(tl.load(pmax, mask=mask_p, other=float("-inf")), axis=0)
    out_off = pid_b.to(tl.int64) * N + offs
    sum_log = tl.load(sum_log_ptr + out_off, mask=mask, other=0.0)
    if LOG_SPACE:
        tl.store(map_mul_ptr + out_off, (max_log - sum_log).to(map_mul_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(map_mul_ptr + out_off, (1.0 - tl.exp(sum_log - max_log)).to(map_mul_ptr.dtype.element_ty), mask=mask)
    if WITH_PROB:
        max_prob = tl.max(tl.load(pmax + 1, mask=mask_p, other=float("-inf")), axis=0)
        sum_prob = tl.load(sum_prob_ptr + out_off, mask=mask, other=0.0)
        tl.store(map_add_ptr + out_off, (max_prob - sum_prob).to(map_add_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _top_k_mean_fwd_kernel(
    values_ptr,
    out_ptr,
    N,
    k,
    ACC: tl.constexpr,
    BITS: tl.constexpr,
    RADIX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # out[b] = mean of the k largest values[b, :] (negatives read as 0): radix select of the k-th value v,
    # then (sum of values > v + (k - count of values > v) * v) / k; NaN if the row holds a NaN (as topk)
    INT: tl.constexpr = tl.int64 if BITS == 64 else tl.int32
    NUM_BINS: tl.constexpr = 1 << RADIX
    pid_b = tl.program_id(0)
    base = values_ptr + pid_b.to(tl.int64) * N
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, NUM_BINS)
    prefix = tl.zeros([1], dtype=INT)
    known = tl.zeros([1], dtype=INT)
    remaining = tl.zeros([1], dtype=tl.int32) + k
    for p in tl.static_range(BITS // RADIX):
        shift = BITS - RADIX * (p + 1)
        hist = tl.zeros([NUM_BINS], dtype=tl.int32)
        for start in range(0, N, BLOCK):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < N, other=0.0).to(ACC)
            x = tl.where(x > 0, x, 0.0)
            bits = x.to(INT, bitcast=True)
            valid = (idx < N) & ((bits & known) == prefix)
            digit = ((bits >> shift) & (NUM_BINS - 1)).to(tl.int32)
            hist += tl.histogram(digit, NUM_BINS, mask=valid)
        at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
        chosen = tl.max(tl.where(at_least >= remaining, bins, 0), axis=0)
        remaining -= tl.sum(tl.where(bins > chosen, hist, 0), axis=0)
        prefix = prefix | (chosen.to(INT) << shift)
        known = known | (tl.full([1], NUM_BINS - 1, dtype=INT) << shift)
    kth = prefix.to(ACC, bitcast=True)
    total = tl.zeros([BLOCK], dtype=ACC)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    nans = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        idx = start + offs
        raw = tl.load(base + idx, mask=idx < N, other=0.0).to(ACC)
        x = tl.where(raw > 0, raw, 0.0)
        above = (idx < N) & (x > kth)
        total += tl.where(above, x, 0.0)
        count += above.to(tl.int32)
        nans += (raw != raw).to(tl.int32)
    ties = k - tl.sum(count, axis=0)
    mean = (tl.sum(total, axis=0) + ties.to(ACC) * kth) / k
    mean = tl.where(tl.sum(nans, axis=0) > 0, float("nan"), mean)
    tl.store(out_ptr + pid_b + tl.arange(0, 1), mean.to(out_ptr.dtype.element_ty))


def top_k_mean_fwd(values: torch.Tensor, k: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean of the ``k`` largest of each row of non-negative contiguous ``values [B, N]`` -> ``[B]``."""
    B, N = values.shape
    out = torch.empty((B,), dtype=out_dtype or values.dtype, device=values.device)
    bits = 64 if values.dtype == torch.float64 else 32
    block = min(triton.next_power_of_2(max(N, 1)), 4096 if _INTERPRET else 2048)
    _top_k_mean_fwd_kernel[(B,)](
        values_ptr=values, out_ptr=out, N=N, k=k, ACC=tl_acc(values.dtype), BITS=bits, RADIX=_RADIX_BITS, BLOCK=block
    )
    return out


def _upsampled_sums(
    maps: list[torch.Tensor], output_size: tuple[int, int], with_prob: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """Fused pass: ``L = sum_k Up(L_k)`` (and ``S = sum_k Up(P_k)``) in acc dtype plus per-block maxima."""
    B = maps[0].shape[0]
    H, W = output_size
    N = H * W
    acc = acc_dtype(maps[0].dtype)
    acc_tl = tl_acc(maps[0].dtype)
    scales = []
    for m in maps:
        m = m.contiguous()
        h, w = m.shape[1], m.shape[2]
        logp_acc = torch.empty((B, h, w), dtype=acc, device=m.device)
        prob = torch.empty((B, h, w), dtype=acc, device=m.device) if with_prob else logp_acc
        _scale_probability_fwd_kernel[(B,)](
            logp_ptr=m,
            logp_acc_ptr=logp_acc,
            prob_ptr=prob,
            n=h * w,
            WITH_PROB=with_prob,
            ACC=acc_tl,
            BLOCK=min(triton.next_power_of_2(h * w), 4096 if _INTERPRET else 1024),
        )
        scales.append((logp_acc, prob, h, w))
    # float64 halves the block: up to 4 scales of bilinear taps in two registers a value spilled at 512
    block = _BLOCK_MAP // 2 if acc == torch.float64 and not _INTERPRET else _BLOCK_MAP
    num_blocks = triton.cdiv(N, block)
    sum_log = torch.empty((B, H, W), dtype=acc, device=maps[0].device)
    sum_prob = torch.empty((B, H, W), dtype=acc, device=maps[0].device) if with_prob else sum_log
    block_max = torch.empty((B, num_blocks, 2), dtype=acc, device=maps[0].device)
    for first in range(0, len(scales), MAX_SCALES):
        group = scales[first : first + MAX_SCALES]
        padded = group + [group[0]] * (MAX_SCALES - len(group))
        pointer_args = {}
        for i, (logp_acc, prob, h, w) in enumerate(padded):
            pointer_args.update({f"logp{i}_ptr": logp_acc, f"prob{i}_ptr": prob, f"h{i}": h, f"w{i}": w})
        _aggregate_anomaly_maps_fwd_kernel[(B, num_blocks)](
            sum_log_ptr=sum_log,
            sum_prob_ptr=sum_prob,
            block_max_ptr=block_max,
            **pointer_args,
            H=H,
            W=W,
            NUM_BLOCKS=num_blocks,
            NUM_SCALES=len(group),
            ACCUMULATE=first > 0,
            WITH_PROB=with_prob,
            ACC=acc_tl,
            BLOCK=block,
        )
    return sum_log, (sum_prob if with_prob else None), block_max, num_blocks


def _finish(sum_log, sum_prob, block_max, num_blocks: int, map_add: torch.Tensor, map_mul: torch.Tensor, log_space: bool) -> None:
    """Launch :func:`_anomaly_maps_finish_fwd_kernel`: the maps (or, with ``log_space``, ``max L - L``) from the fused sums."""
    B, H, W = sum_log.shape
    N = H * W
    _anomaly_maps_finish_fwd_kernel[(B, triton.cdiv(N, _BLOCK_MAP))](
        sum_log_ptr=sum_log,
        sum_prob_ptr=sum_log if sum_prob is None else sum_prob,
        block_max_ptr=block_max,
        map_add_ptr=map_add,
        map_mul_ptr=map_mul,
        N=N,
        NUM_BLOCKS=num_blocks,
        WITH_PROB=sum_prob is not None,
        LOG_SPACE=log_space,
        BLOCK=_BLOCK_MAP,
        BLOCK_P=triton.next_power_of_2(num_blocks),
    )


def _log_space_top_k(sum_log: torch.Tensor, block_max: torch.Tensor, num_blocks: int, top_k: float, dtype: torch.dtype) -> torch.Tensor:
    """Top-k mean of ``max L - L`` per image (nats) from the fused sums of :func:`_upsampled_sums` -> ``[B]``."""
    B, H, W = sum_log.shape
    gap = torch.empty((B, H, W), dtype=sum_log.dtype, device=sum_log.device)
    _finish(sum_log, None, block_max, num_blocks, gap, gap, log_space=True)
    return top_k_mean_fwd(gap.view(B, H * W), max(1, int(H * W * top_k)), out_dtype=dtype)


def aggregate_anomaly_maps_fwd(
    maps: list[torch.Tensor], output_size: tuple[int, int], top_k: float, log_space_score: bool = False
) -> tuple[torch.Tensor, ...]:
    """Fused "add"/"mul" anomaly maps ``[B, H, W]`` and the top-k mean score ``[B]`` (dtype of the maps),
    plus the log-space score ``[B]`` (nats) from the same upsampled sums with ``log_space_score``."""
    B = maps[0].shape[0]
    H, W = output_size
    N = H * W
    dtype = maps[0].dtype
    sum_log, sum_prob, block_max, num_blocks = _upsampled_sums(maps, output_size, with_prob=True)
    map_add = torch.empty((B, H, W), dtype=dtype, device=maps[0].device)
    map_mul = torch.empty((B, H, W), dtype=dtype, device=maps[0].device)
    _finish(sum_log, sum_prob, block_max, num_blocks, map_add, map_mul, log_space=False)
    score = top_k_mean_fwd(map_mul.view(B, N), max(1, int(N * top_k)))
    if not log_space_score:
        return map_add, map_mul, score
    return map_add, map_mul, score, _log_space_top_k(sum_log, block_max, num_blocks, top_k, dtype)


def log_space_score_fwd(maps: list[torch.Tensor], output_size: tuple[int, int], top_k: float) -> torch.Tensor:
    """Top-k mean of ``max L - L`` per image (nats) -> ``[B]`` (dtype of the maps)."""
    sum_log, _, block_max, num_blocks = _upsampled_sums(maps, output_size, with_prob=False)
    return _log_space_top_k(sum_log, block_max, num_blocks, top_k, maps[0].dtype)


# ----------------------------------------------------------------------------------- FastFlow map
#
# ``anomaly_map = -mean_k Up(exp(L_k + log_offset))`` (bilinear, align_corners=False), ``score`` its
# maximum per image, and the log-space score: the maximum of ``-(lse + log_offset - log K)`` with
# ``lse`` the logsumexp over scales and bilinear taps of ``log w + L_k``. The scales' maps are
# converted once into one ``[B, T]`` buffer (T = sum of h_k w_k) with their exp beside it, so one
# launch walks any number of scales; their taps come in small tables made on the host in float64
# (as reference.bilinear_taps makes them: a weight is zero exactly where the reference's is). Per
# output pixel the map needs 4 exp-grid taps per scale, the log-space value a max over the taps of
# nonzero weight, then a sum of w exp(L - max). Per-block maxima and NaN counts are reduced per
# image by one program.


@triton.jit
def _fastflow_exp_fwd_kernel(
    logp_ptr, logp_acc_ptr, prob_ptr, nan_ptr, n, T, offset,
    LOG_OFFSET: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # logp_acc[b, offset + i] = L[b, i], prob[b, offset + i] = exp(L[b, i] + log_offset); nan[b] = NaNs in L[b]
    pid_b = tl.program_id(0)
    src = logp_ptr + pid_b.to(tl.int64) * n
    dst = pid_b.to(tl.int64) * T + offset
    offs = tl.arange(0, BLOCK)
    nans = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        idx = start + offs
        mask = idx < n
        v = tl.load(src + idx, mask=mask, other=0.0).to(ACC)
        tl.store(logp_acc_ptr + dst + idx, v, mask=mask)
        tl.store(prob_ptr + dst + idx, tl.exp(v + LOG_OFFSET), mask=mask)
        nans += (v != v).to(tl.int32)
    tl.store(nan_ptr + pid_b, tl.sum(nans, axis=0))


@triton.jit
def _fastflow_tap(tap_idx_ptr, tap_w_ptr, table, o):
    # entry o of one tap table: (source offset, weight)
    return tl.load(tap_idx_ptr + table + o), tl.load(tap_w_ptr + table + o)


@triton.jit
def _fastflow_anomaly_map_fwd_kernel(
    logp_ptr, prob_ptr, tap_idx_ptr, tap_w_ptr, map_ptr, block_max_ptr, K, T, H, W, NUM_BLOCKS,
    NATS_SHIFT: tl.constexpr, LOG_SPACE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # map = -mean_k Up(P_k); nats = -(logsumexp_{k, taps}(log w + L_k) + log_offset - log K);
    # block_max[b, block] = (max map, max nats, NaN count). Taps of scale k: rows [k, 0|1, H] (source
    # offset in the image's [T] values, weight), then columns [k, 0|1, W] of tap_idx / tap_w.
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    N = H * W
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    oy = tl.where(mask, offs // W, 0)
    ox = tl.where(mask, offs % W, 0)
    row = pid_b.to(tl.int64) * T
    cols = 2 * K * H
    total = tl.zeros([BLOCK], dtype=ACC)
    top = tl.full([BLOCK], float("-inf"), dtype=ACC)
    for k in range(0, K):
        r0, hy0 = _fastflow_tap(tap_idx_ptr, tap_w_ptr, 2 * k * H, oy)
        r1, hy1 = _fastflow_tap(tap_idx_ptr, tap_w_ptr, (2 * k + 1) * H, oy)
        c0, wx0 = _fastflow_tap(tap_idx_ptr, tap_w_ptr, cols + 2 * k * W, ox)
        c1, wx1 = _fastflow_tap(tap_idx_ptr, tap_w_ptr, cols + (2 * k + 1) * W, ox)
        i00, i01, i10, i11 = row + r0 + c0, row + r0 + c1, row + r1 + c0, row + r1 + c1
        total += hy0 * (wx0 * tl.load(prob_ptr + i00, mask=mask, other=0.0) + wx1 * tl.load(prob_ptr + i01, mask=mask, other=0.0))
        total += hy1 * (wx0 * tl.load(prob_ptr + i10, mask=mask, other=0.0) + wx1 * tl.load(prob_ptr + i11, mask=mask, other=0.0))
        if LOG_SPACE:
            top = tl.maximum(top, tl.where(hy0 * wx0 > 0, tl.load(logp_ptr + i00, mask=mask, other=0.0), float("-inf")))
            top = tl.maximum(top, tl.where(hy0 * wx1 > 0, tl.load(logp_ptr + i01, mask=mask, other=0.0), float("-inf")))
            top = tl.maximum(top, tl.where(hy1 * wx0 > 0, tl.load(logp_ptr + i10, mask=mask, other=0.0), float("-inf")))
            top = tl.maximum(top, tl.where(hy1 * wx1 > 0, tl.load(logp_ptr + i11, mask=mask, other=0.0), float("-inf")))
    value = -total / K
    tl.store(map_ptr + pid_b.to(tl.int64) * N + offs, value.to(map_ptr.dtype.element_ty), mask=mask)
    nans = tl.sum((mask & (value != value)).to(tl.int32), axis=0)
    out = block_max_ptr + (pid_b.to(tl.int64) * NUM_BLOCKS + pid_n) * 3
    tl.store(out, tl.max(tl.where(mask, value, float("-inf")), axis=0))
    if LOG_SPACE:
        finite = (top == top) & (tl.abs(top) < float("inf"))
        shift = tl.where(finite, top, 0.0)
        s = tl.zeros([BLOCK], dtype=ACC)
        for k in range(0, K):
            r0, hy0 = _fastflow_tap(tap_idx_ptr, tap_w_ptr, 2 * k * H, oy)
            r1, hy1 = _fastflow_tap(tap_idx_ptr, tap_w_ptr, (2 * k + 1) * H, oy)
            c0, wx0 = _fastflow_tap(tap_idx_ptr, tap_w_ptr, cols + 2 * k * W, ox)
            c1, wx1 = _fastflow_tap(tap_idx_ptr, tap_w_ptr, cols + (2 * k + 1) * W, ox)
            q = hy0 * wx0
            arg = tl.where(q > 0, tl.load(logp_ptr + row + r0 + c0, mask=mask, other=0.0) - shift, float("-inf"))
            s += q * tl.exp(arg)
            q = hy0 * wx1
            arg = tl.where(q > 0, tl.load(logp_ptr + row + r0 + c1, mask=mask, other=0.0) - shift, float("-inf"))
            s += q * tl.exp(arg)
            q = hy1 * wx0
            arg = tl.where(q > 0, tl.load(logp_ptr + row + r1 + c0, mask=mask, other=0.0) - shift, float("-inf"))
            s += q * tl.exp(arg)
            q = hy1 * wx1
            arg = tl.where(q > 0, tl.load(logp_ptr + row + r1 + c1, mask=mask, other=0.0) - shift, float("-inf"))
            s += q * tl.exp(arg)
        nats = -(tl.where(finite, top + tl.log(s), top) + NATS_SHIFT)
        nans += tl.sum((mask & (nats != nats)).to(tl.int32), axis=0)
        tl.store(out + 1, tl.max(tl.where(mask, nats, float("-inf")), axis=0))
    tl.store(out + 2, nans.to(ACC))


@triton.jit
def _fastflow_scores_fwd_kernel(
    block_max_ptr, nan_ptr, score_ptr, score_log_ptr, B, K, NUM_BLOCKS,
    LOG_SPACE: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # score[b] = max map, score_log[b] = max nats; NaN where the image's maps or map hold a NaN
    pid_b = tl.program_id(0)
    base = block_max_ptr + pid_b.to(tl.int64) * NUM_BLOCKS * 3
    offs = tl.arange(0, BLOCK_P)
    map_max = tl.full([BLOCK_P], float("-inf"), dtype=ACC)
    nats_max = tl.full([BLOCK_P], float("-inf"), dtype=ACC)
    nans = tl.zeros([BLOCK_P], dtype=ACC)
    for p0 in range(0, NUM_BLOCKS, BLOCK_P):
        p = p0 + offs
        mask = p < NUM_BLOCKS
        map_max = tl.maximum(map_max, tl.load(base + 3 * p, mask=mask, other=float("-inf")))
        if LOG_SPACE:
            nats_max = tl.maximum(nats_max, tl.load(base + 3 * p + 1, mask=mask, other=float("-inf")))
        nans += tl.load(base + 3 * p + 2, mask=mask, other=0.0)
    ks = tl.arange(0, BLOCK_K)
    input_nans = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        input_nans += tl.load(nan_ptr + k * B + pid_b, mask=k < K, other=0)
    poisoned = (tl.sum(nans, axis=0) > 0) | (tl.sum(input_nans, axis=0) > 0)
    score = tl.where(poisoned, float("nan"), tl.max(map_max, axis=0))
    tl.store(score_ptr + pid_b, score.to(score_ptr.dtype.element_ty))
    if LOG_SPACE:
        score_log = tl.where(poisoned, float("nan"), tl.max(nats_max, axis=0))
        tl.store(score_log_ptr + pid_b, score_log.to(score_log_ptr.dtype.element_ty))


def _half_pixel_taps(out_size: int, in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """align_corners=False taps of one axis on the CPU in float64, with reference.bilinear_taps's
    arithmetic (so a weight is exactly zero where the reference's is; the identity when in == out):
    ``(i0 [out], i1 [out], lambda1 [out])``."""
    if in_size == out_size:
        i0 = torch.arange(out_size, dtype=torch.int64)
        return i0, i0, torch.zeros(out_size, dtype=torch.float64)
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp_(min=0.0)
    i0 = src.floor().long().clamp_(max=in_size - 1)
    return i0, (i0 + 1).clamp_(max=in_size - 1), src - i0.double()


def _fastflow_tap_tables(
    sizes: list[tuple[int, int]], output_size: tuple[int, int], acc: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tap tables of every scale, one int32 and one ``acc`` tensor: rows ``[K, 2, H]`` (the source row's
    offset in an image's [T] values, its weight), then columns ``[K, 2, W]``."""
    H, W = output_size
    rows_idx, rows_w, cols_idx, cols_w = [], [], [], []
    offset = 0
    for h, w in sizes:
        y0, y1, ly = _half_pixel_taps(H, h)
        x0, x1, lx = _half_pixel_taps(W, w)
        rows_idx += [offset + y0 * w, offset + y1 * w]
        rows_w += [1.0 - ly, ly]
        cols_idx += [x0, x1]
        cols_w += [1.0 - lx, lx]
        offset += h * w
    idx = torch.cat(rows_idx + cols_idx).to(torch.int32)
    weights = torch.cat(rows_w + cols_w).to(acc)
    return idx.to(device), weights.to(device)


def fastflow_anomaly_map_fwd(
    maps: list[torch.Tensor], output_size: tuple[int, int], *, log_space_score: bool = False, log_offset: float = 0.0
) -> tuple[torch.Tensor, ...]:
    """FastFlow's ``(anomaly_map [B, H, W], score [B])`` (dtype of the maps), plus ``score_log_space [B]``
    (nats) with ``log_space_score``; one pass over the output pixels for all of them."""
    B = maps[0].shape[0]
    H, W = output_size
    N = H * W
    K = len(maps)
    dtype, device = maps[0].dtype, maps[0].device
    acc, acc_tl = acc_dtype(dtype), tl_acc(dtype)
    T = sum(m.shape[1] * m.shape[2] for m in maps)
    logp = torch.empty((B, T), dtype=acc, device=device)
    prob = torch.empty((B, T), dtype=acc, device=device)
    input_nans = torch.empty((K, B), dtype=torch.int32, device=device)
    offset = 0
    for k, m in enumerate(maps):
        h, w = m.shape[1], m.shape[2]
        _fastflow_exp_fwd_kernel[(B,)](
            logp_ptr=m.contiguous(), logp_acc_ptr=logp, prob_ptr=prob, nan_ptr=input_nans[k], n=h * w, T=T, offset=offset,
            LOG_OFFSET=float(log_offset), ACC=acc_tl, BLOCK=min(triton.next_power_of_2(h * w), 4096 if _INTERPRET else 1024),
        )
        offset += h * w
    tap_idx, tap_w = _fastflow_tap_tables([(m.shape[1], m.shape[2]) for m in maps], (H, W), acc, device)
    block = _BLOCK_MAP // 2 if acc == torch.float64 and not _INTERPRET else _BLOCK_MAP
    num_blocks = triton.cdiv(N, block)
    anomaly_map = torch.empty((B, H, W), dtype=dtype, device=device)
    block_max = torch.empty((B, num_blocks, 3), dtype=acc, device=device)
    _fastflow_anomaly_map_fwd_kernel[(num_blocks, B)](
        logp_ptr=logp, prob_ptr=prob, tap_idx_ptr=tap_idx, tap_w_ptr=tap_w, map_ptr=anomaly_map, block_max_ptr=block_max,
        K=K, T=T, H=H, W=W, NUM_BLOCKS=num_blocks, NATS_SHIFT=float(log_offset) - math.log(K),
        LOG_SPACE=bool(log_space_score), ACC=acc_tl, BLOCK=block,
    )
    score = torch.empty((B,), dtype=dtype, device=device)
    score_log = torch.empty((B,), dtype=dtype, device=device) if log_space_score else score
    _fastflow_scores_fwd_kernel[(B,)](
        block_max_ptr=block_max, nan_ptr=input_nans, score_ptr=score, score_log_ptr=score_log, B=B, K=K,
        NUM_BLOCKS=num_blocks, LOG_SPACE=bool(log_space_score), ACC=acc_tl,
        BLOCK_P=min(triton.next_power_of_2(num_blocks), 1024), BLOCK_K=min(triton.next_power_of_2(K), 64),
    )
    return (anomaly_map, score, score_log) if log_space_score else (anomaly_map, score)


__all__ = [
    "MAX_SCALES",
    "aggregate_anomaly_maps_fwd",
    "fastflow_anomaly_map_fwd",
    "gaussian_nll_bwd",
    "gaussian_nll_fwd",
    "log_likelihood_map_bwd",
    "log_likelihood_map_fwd",
    "log_space_score_fwd",
    "top_k_mean_fwd",
]
