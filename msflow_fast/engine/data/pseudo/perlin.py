"""2-D Perlin gradient noise, fractal (fBm) noise and DRAEM's Perlin anomaly masks, in torch.

Perlin noise of resolution ``(ry, rx)`` over ``H x W`` pixels: a lattice of ``(ry + 1) x (rx + 1)``
random unit gradients; pixel ``(i, j)`` sits at lattice coordinates ``(i * ry / H, j * rx / W)``;
its value is the quintic-faded (``6t^5 - 15t^4 + 10t^3``) bilinear blend of the four corner
gradients dotted with the offsets to those corners, times sqrt(2), so values lie in [-1, 1]
(DRAEM's scaling; the noise is 0 on lattice points). Any size works (no divisibility needed).
"""

from __future__ import annotations

import math

import torch

from .draws import rand, randint, uniform
from .geometry import rotate

__all__ = ["fbm_noise", "perlin_mask", "perlin_noise"]


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _axis(n: int, cells: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Lattice cell index (long ``[n]``) and the fraction inside it (float ``[n]``) along one axis."""
    coords = torch.arange(n, device=device, dtype=torch.float32) * (cells / n)
    cell = coords.floor().clamp_(max=cells - 1)
    return cell.long(), coords - cell


def perlin_noise(size_hw: tuple[int, int], res_hw: tuple[int, int], rng: torch.Generator, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Perlin noise ``[H, W]`` float32 in [-1, 1] with ``res_hw`` lattice cells per axis (see the module docstring)."""
    h, w = int(size_hw[0]), int(size_hw[1])
    ry, rx = max(1, int(res_hw[0])), max(1, int(res_hw[1]))
    device = torch.device(device)
    angles = rand(rng, ry + 1, rx + 1, device=device) * (2.0 * math.pi)
    gy, gx = torch.sin(angles), torch.cos(angles)
    iy, fy = _axis(h, ry, device)
    ix, fx = _axis(w, rx, device)
    fy, fx = fy[:, None], fx[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        # Each pixel's corner gradient: the lattice upsampled by nearest cell (two index_selects, no 2-D gather).
        rows, cols = iy + dy, ix + dx
        cy = gy.index_select(0, rows).index_select(1, cols)
        cx = gx.index_select(0, rows).index_select(1, cols)
        return cy * (fy - dy) + cx * (fx - dx)

    u, v = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), v)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), v)
    return math.sqrt(2.0) * torch.lerp(top, bottom, u)


def fbm_noise(
    size_hw: tuple[int, int], rng: torch.Generator, *, base_res: int = 2, octaves: int = 5, persistence: float = 0.5,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Fractal noise ``[H, W]``: octaves of Perlin noise at ``base_res * 2^k`` cells with amplitude
    ``persistence^k``, divided by the sum of amplitudes (values within [-1, 1])."""
    total = torch.zeros(size_hw, device=device)
    weight = 0.0
    for k in range(octaves):
        res = base_res * 2**k
        if res > max(size_hw):
            break
        amplitude = persistence**k
        total += amplitude * perlin_noise(size_hw, (res, res), rng, device=device)
        weight += amplitude
    return total / max(weight, 1e-12)


def perlin_mask(
    size_hw: tuple[int, int], rng: torch.Generator, *, scale_exponents: tuple[int, int] = (0, 5), threshold: float = 0.5,
    max_rotation: float = 90.0, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """DRAEM's anomaly mask ``[H, W]`` float in {0, 1}: Perlin noise of ``2^a x 2^b`` cells
    (``a, b ~ U{scale_exponents}``), rotated by U(-max_rotation, max_rotation) degrees (zeros
    enter at the corners), thresholded at ``> threshold``."""
    a = randint(rng, *scale_exponents)
    b = randint(rng, *scale_exponents)
    noise = perlin_noise(size_hw, (2**a, 2**b), rng, device=device)
    angle = uniform(rng, -max_rotation, max_rotation)
    noise = rotate(noise[None], angle, padding="zeros")[0]
    return (noise > threshold).float()
