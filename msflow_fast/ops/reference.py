"""Reference maths of every msflow_fast op, in plain PyTorch.

This module is at once the specification, the test oracle, the CPU fallback and the
"eager" line of the benchmarks. It imports nothing from the package. Every fused
backend (Triton, C++/CUDA) must reproduce these functions; autograd here is plain
PyTorch autograd.

Conventions
-----------
* Tensors are ``[B, C, H, W]``; ``N = H * W``.
* Log-determinants are natural-log Jacobian determinants (nats) per sample, ``[B]``.
* ``reverse=True`` computes the inverse map and returns the *negated* log-det, so that
  ``logdet(forward) + logdet(reverse) == 0`` on a round trip.
* Precision: the mixed-precision policy of :mod:`msflow_fast.ops` (half inputs computed in
  float32 by :func:`compute_dtype`, element outputs rounded to ``x.dtype`` once, log-dets float32,
  per-channel parameters used as given).

Soft clamps (``clamp_form``), applied to the scale half ``a_s`` of a subnet output
``a = [a_s, a_t]`` with clamp ``alpha``:

=================  =============================================  ==============
``clamp_form``     scale ``s``                                      shift ``t``
=================  =============================================  ==============
``"tanh"``         ``alpha * tanh(0.1 * a_s)`` (FrEIA 0.2, MSFlow)   ``0.1 * a_t``
``"tanh_scaled"``  ``alpha * tanh(0.1 * a_s / alpha)`` (FrEIA HEAD)  ``0.1 * a_t``
``"atan"``         ``alpha * 0.636 * atan(a_s / alpha)`` (fusion)    ``a_t``
=================  =============================================  ==============

Global affine scale ``g = psi(gamma)`` (``affine_type``):
``"SOFTPLUS"``: ``0.1 * softplus(gamma, beta=0.5) = 0.2 * log(1 + exp(gamma / 2))``;
``"SIGMOID"``: ``10 * sigmoid(gamma - 2)``; ``"EXP"``: ``exp(gamma)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLAMP_FORMS = ("tanh", "tanh_scaled", "atan")
AFFINE_TYPES = ("SOFTPLUS", "SIGMOID", "EXP")
ATAN_FACTOR = 0.636
"""The fusion layer's approximation of 2/pi in ``alpha * 0.636 * atan(s / alpha)``."""
PRE_FACTOR = 0.1
"""FrEIA's AllInOneBlock multiplies the whole subnet output by 0.1 before use."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic and log-det dtype of the flow-block ops: float32 for float16/bfloat16, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def soft_clamp(a_s: torch.Tensor, clamp: float, clamp_form: str = "tanh") -> torch.Tensor:
    """Soft-clamped log-scale ``s`` from the raw scale half ``a_s`` (any shape).

    ``|s| < clamp`` for ``"tanh"`` and ``"tanh_scaled"``; ``|s| < 0.999 * clamp`` for
    ``"atan"``. See the module docstring for the formulas.
    """
    if clamp_form == "tanh":
        return clamp * torch.tanh(PRE_FACTOR * a_s)
    if clamp_form == "tanh_scaled":
        return clamp * torch.tanh(PRE_FACTOR * a_s / clamp)
    if clamp_form == "atan":
        return clamp * ATAN_FACTOR * torch.atan(a_s / clamp)
    raise ValueError(f"clamp_form must be one of {CLAMP_FORMS}, got {clamp_form!r}")


def coupling_shift(a_t: torch.Tensor, clamp_form: str = "tanh") -> torch.Tensor:
    """Shift ``t`` from the raw shift half ``a_t``: ``0.1 * a_t``, or ``a_t`` for ``"atan"``."""
    return a_t if clamp_form == "atan" else PRE_FACTOR * a_t


def affine_coupling(
    x: torch.Tensor,
    a: torch.Tensor,
    *,
    clamp: float,
    clamp_form: str = "tanh",
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-clamped affine coupling of the active half.

    Forward: ``y = x * exp(s) + t``, log-det ``sum_{c,h,w} s``.
    Reverse: ``y = (x - t) * exp(-s)``, log-det ``-sum_{c,h,w} s``.

    Args:
        x: active half ``[B, C, H, W]`` (``C >= 1``).
        a: raw subnet output ``[B, 2C, H, W]``: scale half ``a[:, :C]``, shift half ``a[:, C:]``.
        clamp: soft clamp ``alpha > 0``.
        clamp_form: ``"tanh"`` (FrEIA 0.2), ``"tanh_scaled"`` (FrEIA HEAD) or ``"atan"`` (fusion).
        reverse: compute the inverse map.

    Returns:
        ``(y [B, C, H, W], logdet [B])``; the log-det is in nats. ``y`` has ``x.dtype``; half
        inputs are computed in float32 and their log-det is float32 (see :func:`compute_dtype`).
    """
    c = x.shape[1]
    acc = compute_dtype(x.dtype)
    xc, ac = x.to(acc), a.to(acc)
    s = soft_clamp(ac[:, :c], clamp, clamp_form)
    t = coupling_shift(ac[:, c:], clamp_form)
    logdet = s.sum(dim=(1, 2, 3))
    if reverse:
        return ((xc - t) * torch.exp(-s)).to(x.dtype), -logdet
    return (xc * torch.exp(s) + t).to(x.dtype), logdet


def global_scale_activation(global_scale: torch.Tensor, affine_type: str = "SOFTPLUS") -> torch.Tensor:
    """Positive per-channel scale ``g = psi(gamma)`` from the raw parameter (any shape)."""
    if affine_type == "SOFTPLUS":
        return 0.1 * F.softplus(global_scale, beta=0.5)
    if affine_type == "SIGMOID":
        return 10.0 * torch.sigmoid(global_scale - 2.0)
    if affine_type == "EXP":
        return torch.exp(global_scale)
    raise ValueError(f"affine_type must be one of {AFFINE_TYPES}, got {affine_type!r}")


def global_scale_init(global_affine_init: float, affine_type: str = "SOFTPLUS") -> float:
    """Raw parameter ``gamma_0`` such that ``psi(gamma_0) == global_affine_init`` (FrEIA 0.2 init)."""
    if global_affine_init <= 0:
        raise ValueError(f"global_affine_init must be > 0, got {global_affine_init}")
    if affine_type == "SOFTPLUS":
        return 2.0 * math.log(math.exp(0.5 * 10.0 * global_affine_init) - 1.0)
    if affine_type == "SIGMOID":
        return 2.0 - math.log(10.0 / global_affine_init - 1.0)
    if affine_type == "EXP":
        return math.log(global_affine_init)
    raise ValueError(f"affine_type must be one of {AFFINE_TYPES}, got {affine_type!r}")


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of an index permutation ``[C]`` (int64): ``inv[perm[i]] = i``."""
    return torch.argsort(perm)


def global_affine_permute(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    global_offset: torch.Tensor,
    perm: torch.Tensor,
    *,
    affine_type: str = "SOFTPLUS",
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel global affine followed by a channel permutation (a gather, never a 1x1 conv).

    Forward: ``v = x * g + b``; ``y[:, i] = v[:, perm[i]]``; log-det ``H * W * sum_c log g_c``.
    Reverse: ``v[:, perm[i]] = x[:, i]``; ``y = (v - b) / g``; log-det negated.

    Args:
        x: ``[B, C, H, W]``.
        global_scale: raw scale parameter ``gamma`` with ``C`` elements (e.g. ``[1, C, 1, 1]``),
            used in the compute dtype (float32 for half ``x``: pass it in float32, not rounded).
        global_offset: offset ``b`` with ``C`` elements, likewise.
        perm: int64 ``[C]``, a permutation of ``0..C-1``.
        affine_type: ``"SOFTPLUS"``, ``"SIGMOID"`` or ``"EXP"``.
        reverse: compute the inverse map.

    Returns:
        ``(y [B, C, H, W], logdet [B])`` in nats; ``y`` in ``x.dtype``, the log-det in the compute
        dtype (float32 for half ``x``).
    """
    b_, c, h, w = x.shape
    acc = compute_dtype(x.dtype)
    g = global_scale_activation(global_scale.reshape(c).to(acc), affine_type)
    offset = global_offset.reshape(c).to(acc)
    logdet = (h * w) * torch.log(g).sum()
    logdet = logdet.expand(b_).clone()
    xc = x.to(acc)
    if reverse:
        v = xc[:, invert_permutation(perm)]
        return ((v - offset.view(1, c, 1, 1)) / g.view(1, c, 1, 1)).to(x.dtype), -logdet
    v = xc * g.view(1, c, 1, 1) + offset.view(1, c, 1, 1)
    return v[:, perm].to(x.dtype), logdet


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
    """The forward tail of FrEIA's AllInOneBlock after its subnet, as one op.

    Splits ``x`` into the passive first ``C - C // 2`` channels and the active last
    ``C // 2`` channels, couples the active half with ``a`` (see :func:`affine_coupling`),
    applies the global affine and the permutation (see :func:`global_affine_permute`).
    The inverse is :func:`global_affine_permute` (reverse) followed by the subnet on the
    passive half and :func:`affine_coupling` (reverse): the subnet sits in between.

    Args:
        x: block input ``[B, C, H, W]`` with ``C >= 2``.
        a: raw subnet output ``[B, 2 * (C // 2), H, W]`` computed from the passive half.
        global_scale, global_offset, perm: as in :func:`global_affine_permute`.
        clamp, clamp_form: as in :func:`affine_coupling`.
        affine_type: as in :func:`global_affine_permute`.

    Returns:
        ``(y [B, C, H, W], logdet [B])``: coupling plus global-affine log-det, in nats. For half
        ``x`` the coupled half is rounded to ``x.dtype`` before the global affine (this
        composition), and the log-det is float32.
    """
    c = x.shape[1]
    x1, x2 = x[:, : c - c // 2], x[:, c - c // 2 :]
    y2, logdet_coupling = affine_coupling(x2, a, clamp=clamp, clamp_form=clamp_form)
    y, logdet_affine = global_affine_permute(
        torch.cat([x1, y2], dim=1), global_scale, global_offset, perm, affine_type=affine_type
    )
    return y, logdet_coupling + logdet_affine


def gaussian_nll(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood under a standard normal, MSFlow's scale.

    ``nll[b] = 0.5 * sum_{c,h,w} z[b]^2 - logdet[b]`` (no ``log(2 pi)`` constant and no
    division by the number of dims, as the official loss). Accumulates in float32 or wider.

    Args:
        z: latent ``[B, ...]``.
        logdet: ``[B]`` log-det in nats to subtract.

    Returns:
        ``[B]`` in nats, dtype ``float32`` for half inputs, else ``z.dtype``.
    """
    acc = torch.promote_types(z.dtype, torch.float32)
    sq = z.to(acc).square().flatten(1).sum(dim=1)
    return 0.5 * sq - logdet.to(acc)


def log_likelihood_map(z: torch.Tensor) -> torch.Tensor:
    """Per-pixel log-likelihood ``-0.5 * mean_c z^2`` of a latent ``[B, C, H, W]`` -> ``[B, H, W]``.

    Accumulates in float32 or wider (float32 for half inputs).
    """
    acc = torch.promote_types(z.dtype, torch.float32)
    return -0.5 * z.to(acc).square().mean(dim=1)


def upsample_bilinear(maps: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling with ``align_corners=True`` of ``[B, h, w]`` maps to ``[B, H, W]``."""
    return F.interpolate(maps.unsqueeze(1), size=tuple(output_size), mode="bilinear", align_corners=True).squeeze(1)


def top_k_count(num_pixels: int, top_k: float) -> int:
    """Number of pixels averaged for the image score: ``max(1, int(num_pixels * top_k))``."""
    return max(1, int(num_pixels * top_k))


def top_k_mean(maps: torch.Tensor, top_k: float) -> torch.Tensor:
    """Mean of the largest ``top_k_count(H * W, top_k)`` values per image of ``[B, H, W]`` -> ``[B]``."""
    flat = maps.flatten(1)
    k = top_k_count(flat.shape[1], top_k)
    return torch.topk(flat, k, dim=1).values.mean(dim=1)


def summed_log_likelihood(log_likelihood_maps: list[torch.Tensor] | tuple[torch.Tensor, ...], output_size: tuple[int, int]) -> torch.Tensor:
    """``L = sum_k Up(L_k)`` ``[B, H, W]``: the per-scale log-likelihood maps upsampled and summed (nats)."""
    summed = None
    for logp in log_likelihood_maps:
        up = upsample_bilinear(logp, output_size)
        summed = up if summed is None else summed + up
    return summed


def log_space_gap(summed_log: torch.Tensor) -> torch.Tensor:
    """``max L - L`` per image of ``L [B, H, W]`` (nats, ``>= 0``)."""
    return summed_log.flatten(1).max(dim=1).values.view(-1, 1, 1) - summed_log


def aggregate_anomaly_maps(
    log_likelihood_maps: list[torch.Tensor] | tuple[torch.Tensor, ...],
    output_size: tuple[int, int],
    *,
    top_k: float = 0.03,
    log_space_score: bool = False,
) -> tuple[torch.Tensor, ...]:
    """MSFlow's multi-scale post-processing (official definitions, per image).

    With ``Up`` = bilinear upsampling, ``align_corners=True``, to ``output_size``:

    * "add": ``P_k = Up(exp(L_k - max L_k))``; ``S = sum_k P_k``; ``anomaly_map_add = max S - S``.
    * "mul": ``L = sum_k Up(L_k)``; ``P = exp(L - max L)``; ``anomaly_map_mul = max P - P = 1 - P``.
    * ``score`` = mean of the ``top_k_count(H * W, top_k)`` largest values of ``anomaly_map_mul``.
    * with ``log_space_score``, also :func:`log_space_score` of the same ``L`` (one upsampling for both).

    All maxima are per image. ``1 - exp(-d)`` rounds to exactly 1.0 at a log-likelihood gap
    ``d = max L - L`` of about 17.3 nats in float32 (37.4 in float64), so the official score of an
    image whose top-k pixels all lie that far below its most likely pixel is exactly 1.0 (a tie).

    Args:
        log_likelihood_maps: per-scale maps ``[B, h_k, w_k]`` (e.g. from :func:`log_likelihood_map`).
        output_size: ``(H, W)`` of the anomaly maps.
        top_k: fraction of pixels in the score, ``0 < top_k <= 1``.
        log_space_score: also return the log-space score.

    Returns:
        ``(anomaly_map_add [B, H, W], anomaly_map_mul [B, H, W], score [B])``, plus
        ``score_log_space [B]`` (nats) with ``log_space_score=True``.
    """
    summed_prob = None
    for logp in log_likelihood_maps:
        prob = torch.exp(logp - logp.flatten(1).max(dim=1).values.view(-1, 1, 1))
        up_prob = upsample_bilinear(prob, output_size)
        summed_prob = up_prob if summed_prob is None else summed_prob + up_prob
    summed_log = summed_log_likelihood(log_likelihood_maps, output_size)
    max_prob = summed_prob.flatten(1).max(dim=1).values.view(-1, 1, 1)
    anomaly_map_add = max_prob - summed_prob
    prob_mul = torch.exp(summed_log - summed_log.flatten(1).max(dim=1).values.view(-1, 1, 1))
    anomaly_map_mul = prob_mul.flatten(1).max(dim=1).values.view(-1, 1, 1) - prob_mul
    score = top_k_mean(anomaly_map_mul, top_k)
    if not log_space_score:
        return anomaly_map_add, anomaly_map_mul, score
    return anomaly_map_add, anomaly_map_mul, score, top_k_mean(log_space_gap(summed_log), top_k)


def log_space_score(
    log_likelihood_maps: list[torch.Tensor] | tuple[torch.Tensor, ...],
    output_size: tuple[int, int],
    *,
    top_k: float = 0.03,
) -> torch.Tensor:
    """Image score in nats: the mean of the top-k of ``max L - L`` per image, never saturating.

    ``L = sum_k Up(L_k)`` as in the "mul" map. Within an image, ``max L - L`` orders pixels as
    ``1 - exp(L - max L)`` does, so both scores average the same top-k pixels; but the mean of
    the gaps is not a monotone function of the mean of ``1 - exp(-gap)``, so across images the
    two scores do not always rank alike. Unlike the official score, this one does not tie at
    1.0 for images with large gaps (see :func:`aggregate_anomaly_maps`).

    Returns:
        ``[B]`` in nats, ``>= 0``.
    """
    return top_k_mean(log_space_gap(summed_log_likelihood(log_likelihood_maps, output_size)), top_k)


def bilinear_taps(out_size: int, in_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source taps of bilinear upsampling with ``align_corners=False`` along one axis (PyTorch's rule).

    For output index ``o``: ``src = max(0, (o + 0.5) * in_size / out_size - 0.5)``, ``i0 = floor(src)``,
    ``i1 = min(i0 + 1, in_size - 1)``, weight ``1 - (src - i0)`` on ``i0`` and ``src - i0`` on ``i1``.

    Returns:
        ``(i0 [out], i1 [out], lambda1 [out] float64)``.
    """
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale - 0.5).clamp_(min=0.0)
    i0 = src.floor().long().clamp_(max=in_size - 1)
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    return i0, i1, src - i0.double()


def log_upsample_bilinear(log_values: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """``log(Up(exp(L)))`` of ``L [B, h, w]``, exactly: a logsumexp over each output pixel's taps of
    ``log w + L`` (bilinear, ``align_corners=False``); never underflows. Returns ``[B, H, W]``."""
    H, W = output_size
    y0, y1, ly = bilinear_taps(H, log_values.shape[1], log_values.device)
    x0, x1, lx = bilinear_taps(W, log_values.shape[2], log_values.device)
    dtype = log_values.dtype
    terms = []
    for rows, wy in ((y0, 1.0 - ly), (y1, ly)):
        for cols, wx in ((x0, 1.0 - lx), (x1, lx)):
            weight = (wy.view(-1, 1) * wx.view(1, -1)).to(dtype)
            terms.append(torch.log(weight) + log_values[:, rows][:, :, cols])
    return torch.logsumexp(torch.stack(terms), dim=0)


def fastflow_anomaly_map(
    log_likelihood_maps: list[torch.Tensor] | tuple[torch.Tensor, ...],
    output_size: tuple[int, int],
    *,
    log_space_score: bool = False,
    log_offset: float = 0.0,
) -> tuple[torch.Tensor, ...]:
    """FastFlow's post-processing: the stage mean of ``-Up(exp(L_k + log_offset))`` and its maximum.

    With ``Up`` = bilinear upsampling, ``align_corners=False``, to ``output_size``:

    * ``anomaly_map = mean_k(-Up(exp(L_k + log_offset)))`` ``[B, H, W]``, in ``[-e^offset, 0]``;
    * ``score = max`` of the map per image ``[B]``;
    * with ``log_space_score``: ``max`` per image of ``-log(-anomaly_map)``, computed exactly as
      ``-(logsumexp over stages and taps of (log w + L_k) + log_offset - log K)`` (nats). Since
      ``-log(-v)`` is increasing, it ranks images as ``score`` does, but never underflows (in
      float32 ``exp(L)`` is 0 below ``L`` of about -104, and every such image then scores 0).

    ``log_offset`` is 0 for FastFlow; DADF's map is ``-exp(1 + L)`` (offset 1).

    Returns:
        ``(anomaly_map [B, H, W], score [B])``, plus ``score_log_space [B]`` with ``log_space_score=True``.
    """
    ups = [upsample_bilinear_align_false(-torch.exp(m + log_offset), output_size) for m in log_likelihood_maps]
    anomaly_map = torch.stack(ups, dim=-1).mean(dim=-1)
    # A NaN anywhere in an image's maps makes its scores NaN, also where downsampling reads around it.
    broken = torch.stack([m.flatten(1).isnan().any(dim=1) for m in log_likelihood_maps]).any(dim=0)
    nan = torch.tensor(float("nan"), dtype=anomaly_map.dtype, device=anomaly_map.device)
    score = torch.where(broken, nan, anomaly_map.flatten(1).amax(dim=1))
    if not log_space_score:
        return anomaly_map, score
    logs = torch.stack([log_upsample_bilinear(m, output_size) for m in log_likelihood_maps])
    nats = -(torch.logsumexp(logs, dim=0) + log_offset - math.log(len(log_likelihood_maps)))
    return anomaly_map, score, torch.where(broken, nan, nats.flatten(1).amax(dim=1))


def upsample_bilinear_align_false(maps: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling with ``align_corners=False`` of ``[B, h, w]`` maps to ``[B, H, W]``."""
    return F.interpolate(maps.unsqueeze(1), size=tuple(output_size), mode="bilinear", align_corners=False).squeeze(1)


def sample_layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over every non-batch dimension of each sample: FastFlow's ``nn.LayerNorm([C, H, W])``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with one mean and one (biased) variance
    per sample over its ``C * H * W`` values and a per-element affine.

    Args:
        x: ``[B, C, H, W]`` (or ``[B, ...]``).
        weight, bias: ``x.shape[1:]`` (x's dtype, or float32 for half x), or ``None`` (no affine).
        eps: added to the variance.

    Returns:
        x's shape and dtype; half/bfloat16 inputs are computed in float32.
    """
    acc = compute_dtype(x.dtype)
    w = weight.to(acc) if weight is not None else None
    b = bias.to(acc) if bias is not None else None
    return F.layer_norm(x.to(acc), tuple(x.shape[1:]), w, b, eps).to(x.dtype)


def channel_layer_norm_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    addend: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``relu(LayerNorm_C(x + addend))``: LayerNorm over the channels of every pixel, then ReLU.

    The middle of MSFlow's coupling subnet (``Conv3x3 -> LayerNorm(channels) -> ReLU -> Conv3x3``);
    ``addend`` carries a batch-constant share of the first conv (the positional condition).

    Args:
        x: ``[B, C, H, W]``.
        weight, bias: LayerNorm affine ``[C]``, x's dtype (or float32 for half/bfloat16 x).
        addend: optional ``[1, C, H, W]`` (broadcast over the batch) or ``[B, C, H, W]``, x's dtype.
        eps: added to the per-pixel variance (biased, over C).

    Returns:
        ``[B, C, H, W]`` in x's dtype; half/bfloat16 inputs are computed in float32.
    """
    acc = compute_dtype(x.dtype)
    h = x.to(acc) if addend is None else x.to(acc) + addend.to(acc)
    normed = F.layer_norm(h.permute(0, 2, 3, 1), (h.shape[1],), weight.to(acc), bias.to(acc), eps)
    return F.relu(normed.permute(0, 3, 1, 2)).to(x.dtype)


def conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, weight_winograd: torch.Tensor | None = None
) -> torch.Tensor:
    """3x3 convolution, stride 1, zero padding 1: ``F.conv2d(x, weight, bias, padding=1)``.

    The subnets' convolutions. ``weight_winograd`` (:func:`winograd_weight` of ``weight``) lets a
    backend compute it by Winograd F(4x4, 3x3); the maths is the same, this function ignores it.

    Args:
        x: ``[B, C_in, H, W]``.
        weight: ``[C_out, C_in, 3, 3]``.
        bias: optional ``[C_out]``.

    Returns:
        ``[B, C_out, H, W]``.
    """
    return F.conv2d(x, weight, bias, padding=1)


WINOGRAD_G = (
    (1 / 4, 0.0, 0.0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0.0, 0.0, 1.0),
)
"""Kernel transform ``G`` (6x3) of Winograd F(4x4, 3x3), interpolation points 0, +-1, +-2, inf."""


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """Kernel transform of Winograd F(4x4, 3x3): ``[C_out, C_in, 3, 3] -> [36, C_out, C_in]``.

    Entry ``[6 i + j, o, c]`` is ``(G w[o, c] G^T)[i, j]`` with :data:`WINOGRAD_G`; computed in
    float64 and rounded once to ``weight.dtype``. The input and output transforms
    (``B^T d B`` on 6x6 input tiles, ``A^T m A`` to 4x4 output tiles) are in csrc/conv.cpp.
    """
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must have shape [C_out, C_in, 3, 3], got {tuple(weight.shape)}")
    g = torch.tensor(WINOGRAD_G, dtype=torch.float64, device=weight.device)
    u = g @ weight.detach().to(torch.float64) @ g.t()  # [C_out, C_in, 6, 6]
    return u.permute(2, 3, 0, 1).reshape(36, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


__all__ = [
    "AFFINE_TYPES",
    "ATAN_FACTOR",
    "CLAMP_FORMS",
    "PRE_FACTOR",
    "WINOGRAD_G",
    "affine_coupling",
    "aggregate_anomaly_maps",
    "bilinear_taps",
    "channel_layer_norm_relu",
    "compute_dtype",
    "conv3x3",
    "coupling_affine_permute",
    "coupling_shift",
    "fastflow_anomaly_map",
    "gaussian_nll",
    "global_affine_permute",
    "global_scale_activation",
    "global_scale_init",
    "invert_permutation",
    "log_likelihood_map",
    "log_upsample_bilinear",
    "log_space_gap",
    "log_space_score",
    "summed_log_likelihood",
    "sample_layer_norm",
    "soft_clamp",
    "top_k_count",
    "top_k_mean",
    "upsample_bilinear",
    "upsample_bilinear_align_false",
    "winograd_weight",
]
