"""Seeded random draws: a CPU ``torch.Generator`` per (seed, keys), bit-identical on every run.

Every random number of the generator is drawn here, on the CPU, and is small (scalars, lattice
gradients, point sets); tensors built from them move to the image's device. So the same seed and
index give the same draws on any device, and no per-pixel random tensor is ever needed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

__all__ = ["derive_seed", "generator", "log_uniform", "rand", "randint", "uniform", "weighted_choice"]


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from any keys (ints or strings), e.g. ``(seed, epoch, index)``: a blake2b hash."""
    digest = hashlib.blake2b(digest_size=8)
    for key in keys:
        digest.update(repr(key).encode() + b"\0")
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def generator(*keys: int | str) -> torch.Generator:
    """A CPU generator seeded from ``keys`` (see :func:`derive_seed`)."""
    rng = torch.Generator()
    rng.manual_seed(derive_seed(*keys))
    return rng


def uniform(rng: torch.Generator, low: float, high: float) -> float:
    """One draw of U[low, high)."""
    return low + (high - low) * float(torch.rand((), generator=rng, dtype=torch.float64))


def log_uniform(rng: torch.Generator, low: float, high: float) -> float:
    """One draw whose logarithm is uniform on [log low, log high) (aspect ratios)."""
    return math.exp(uniform(rng, math.log(low), math.log(high)))


def randint(rng: torch.Generator, low: int, high: int) -> int:
    """One integer of U{low, ..., high} (``high`` included)."""
    return int(torch.randint(int(low), int(high) + 1, (), generator=rng))


def rand(rng: torch.Generator, *shape: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) values of ``shape``, drawn on the CPU, returned on ``device``."""
    values = torch.rand(*shape, generator=rng, dtype=dtype)
    return values if device is None else values.to(device)


def weighted_choice(rng: torch.Generator, weights: Sequence[float]) -> int:
    """An index drawn with probability proportional to ``weights`` (non-negative, positive sum)."""
    cumulative, total = [], 0.0
    for w in weights:
        total += float(w)
        cumulative.append(total)
    u = uniform(rng, 0.0, total)
    for i, c in enumerate(cumulative):
        if u < c and weights[i] > 0:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)
