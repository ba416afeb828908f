"""Seamless (Poisson) blending on a rectangle, solved exactly with the discrete sine transform.

Blending ``source`` into ``target`` over a rectangle ``R`` finds ``f`` with

    Δf = div v   inside R (the interior pixels),   f = target   on the border of R,

where Δ is the 5-point Laplacian and ``v`` the guidance field: the source's gradients
(``"source"``, OpenCV's normal clone) or, per pixel edge, whichever of the source's and the
target's gradients is larger (``"mixed"``). The Dirichlet problem on a rectangle diagonalises in
the DST-I basis (eigenvalues ``2cos(πk/(n+1)) - 2 + 2cos(πl/(m+1)) - 2``), so one forward and one
inverse 2-D DST (FFTs of length ``2(n+1)``) solve it; no iteration, any device.
"""

from __future__ import annotations

import math

import torch

__all__ = ["dst1", "poisson_blend", "solve_dirichlet_poisson"]


def dst1(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """DST-I along ``dim``: ``X_k = sum_j x_j sin(π j k / (n + 1))`` (j, k = 1..n); its own inverse times ``2 / (n + 1)``."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    zero = torch.zeros(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    extended = torch.cat((zero, x, zero, -x.flip(-1)), dim=-1)
    out = -torch.fft.fft(extended, dim=-1).imag[..., 1 : n + 1] / 2.0
    return out.movedim(-1, dim)


def solve_dirichlet_poisson(rhs: torch.Tensor) -> torch.Tensor:
    """``f`` ``[..., n, m]`` with ``Δf = rhs`` on an ``n x m`` grid whose outside neighbours are 0.

    ``Δf[i, j] = f[i+1, j] + f[i-1, j] + f[i, j+1] + f[i, j-1] - 4 f[i, j]``. Non-zero boundary
    values go into ``rhs`` (subtract them from their interior neighbours' entries).
    """
    n, m = rhs.shape[-2], rhs.shape[-1]
    work = rhs.double() if rhs.dtype == torch.float64 else rhs.float()
    k = torch.arange(1, n + 1, device=rhs.device, dtype=work.dtype)
    l = torch.arange(1, m + 1, device=rhs.device, dtype=work.dtype)
    eigen = (2.0 * torch.cos(math.pi * k / (n + 1)) - 2.0)[:, None] + (2.0 * torch.cos(math.pi * l / (m + 1)) - 2.0)[None, :]
    spectrum = dst1(dst1(work, -1), -2) / eigen
    solution = dst1(dst1(spectrum, -1), -2) * (4.0 / ((n + 1) * (m + 1)))
    return solution.to(rhs.dtype)


def _guidance_divergence(source: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """``div v`` at the interior of ``[C, h, w]`` patches (``[C, h-2, w-2]``); mixed when ``target`` is given."""
    gx, gy = source[..., :, 1:] - source[..., :, :-1], source[..., 1:, :] - source[..., :-1, :]
    if target is not None:
        tx, ty = target[..., :, 1:] - target[..., :, :-1], target[..., 1:, :] - target[..., :-1, :]
        gx = torch.where(tx.abs() > gx.abs(), tx, gx)
        gy = torch.where(ty.abs() > gy.abs(), ty, gy)
    # Interior pixel (i, j): v_x(i, j) - v_x(i, j-1) + v_y(i, j) - v_y(i-1, j), edges indexed by their left/top pixel.
    return (gx[..., 1:-1, 1:] - gx[..., 1:-1, :-1]) + (gy[..., 1:, 1:-1] - gy[..., :-1, 1:-1])


def poisson_blend(
    target: torch.Tensor, source_patch: torch.Tensor, top: int, left: int, *, gradient: str = "source", clamp: bool = True,
) -> torch.Tensor:
    """Blend ``source_patch`` ``[C, h, w]`` into ``target`` ``[C, H, W]`` with its top-left corner at
    ``(top, left)``; the patch's border rows and columns keep the target's values (``h, w >= 3``).

    Args:
        gradient: ``"source"`` (the patch's gradients) or ``"mixed"`` (the larger of patch and target).
        clamp: clip the result to [0, 1] (images); ``False`` returns the exact solution.

    Returns:
        A new ``[C, H, W]`` tensor, equal to ``target`` outside the patch's interior.
    """
    if gradient not in ("source", "mixed"):
        raise ValueError(f"gradient: expected 'source' or 'mixed', got {gradient!r}")
    c, h, w = source_patch.shape
    if h < 3 or w < 3:
        raise ValueError(f"source_patch: expected at least 3x3 pixels, got {h}x{w}")
    if top < 0 or left < 0 or top + h > target.shape[-2] or left + w > target.shape[-1]:
        raise ValueError(f"patch {h}x{w} at ({top}, {left}) does not fit in a {target.shape[-2]}x{target.shape[-1]} image")
    region = target[:, top : top + h, left : left + w]
    boundary = region.clone()
    boundary[:, 1:-1, 1:-1] = 0.0
    known = boundary[:, 2:, 1:-1] + boundary[:, :-2, 1:-1] + boundary[:, 1:-1, 2:] + boundary[:, 1:-1, :-2]
    rhs = _guidance_divergence(source_patch.to(region.dtype), region if gradient == "mixed" else None) - known
    interior = solve_dirichlet_poisson(rhs)
    out = target.clone()
    out[:, top + 1 : top + h - 1, left + 1 : left + w - 1] = interior.clamp(0.0, 1.0) if clamp else interior
    return out
