"""Anomaly sources without a download: a seeded procedural bank and the CC0 textures of scikit-image.

Procedural kinds (each ``[3, H, W]`` in [0, 1], made on the device from a few CPU draws):

- ``fbm``: fractal Perlin noise through a random colour map (2 to 4 random colours);
- ``gabor``: sparse Gabor noise (random impulses convolved, by FFT, with one oriented Gabor kernel);
- ``stripes``: oriented stripes of random period and sharpness, warped by Perlin noise;
- ``voronoi``: Voronoi cells of 8 to 64 random sites, one colour per cell, darkened edges;
- ``checkers``: a rotated checkerboard of two random colours.

Files: ``brick.png``, ``grass.png`` and ``gravel.png`` (CC0) ship inside the scikit-image wheel
under ``skimage/data/``; they are read with :mod:`importlib.resources` (never through
``skimage.data``, whose other images download). A random crop (40-100% of the shorter side) is
resized to the image size; the grey files are tinted with a random colour map half the time.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import io
import math

import numpy as np
import torch
from PIL import Image

from .draws import rand, randint, uniform
from .geometry import resize
from .perlin import fbm_noise

__all__ = ["PROCEDURAL_KINDS", "SKIMAGE_TEXTURES", "colour_map", "file_texture", "procedural_texture", "skimage_available", "texture"]

PROCEDURAL_KINDS = ("fbm", "gabor", "stripes", "voronoi", "checkers")
SKIMAGE_TEXTURES = ("brick.png", "grass.png", "gravel.png")


def colour_map(field: torch.Tensor, rng: torch.Generator, colours: int | None = None) -> torch.Tensor:
    """Map a field ``[H, W]`` (any range; min-max scaled to [0, 1]) through a random piecewise-linear
    colour map of ``colours`` random RGB colours (2 to 4 when ``None``); returns ``[3, H, W]`` in [0, 1]."""
    n = colours or randint(rng, 2, 4)
    palette = rand(rng, n, 3, device=field.device)
    low, high = field.amin(), field.amax()
    t = (field - low) / (high - low).clamp(min=1e-6)
    position = t * (n - 1)
    index = position.floor().clamp(max=n - 2).long()
    frac = (position - index)[None]
    return (palette[index].permute(2, 0, 1) * (1.0 - frac) + palette[index + 1].permute(2, 0, 1) * frac).clamp(0.0, 1.0)


def _coords(size_hw: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates ``[H, 1]`` and ``[1, W]`` in units of the shorter side."""
    h, w = size_hw
    side = float(min(h, w))
    return (torch.arange(h, device=device, dtype=torch.float32)[:, None] / side,
            torch.arange(w, device=device, dtype=torch.float32)[None, :] / side)


def _fbm(size_hw, rng, device):
    field = fbm_noise(size_hw, rng, base_res=2 ** randint(rng, 0, 3), octaves=randint(rng, 3, 6),
                      persistence=uniform(rng, 0.4, 0.7), device=device)
    return colour_map(field, rng)


def _gabor(size_hw, rng, device):
    h, w = size_hw
    side = min(h, w)
    impulses = max(16, int(320 * h * w / 256**2))
    weights = rand(rng, impulses, device=device) * 2.0 - 1.0
    flat = (rand(rng, impulses, dtype=torch.float64) * (h * w)).long().clamp(max=h * w - 1).to(device)
    field = torch.zeros(h * w, device=device).index_add_(0, flat, weights).reshape(h, w)
    frequency = uniform(rng, 4.0, 20.0) / side  # cycles per pixel
    omega = uniform(rng, 0.0, math.pi)
    bandwidth = frequency * uniform(rng, 0.3, 0.8)
    ys = torch.fft.fftfreq(h, d=1.0, device=device)[:, None] * h  # signed pixel offsets (circular)
    xs = torch.fft.fftfreq(w, d=1.0, device=device)[None, :] * w
    kernel = torch.exp(-math.pi * bandwidth**2 * (xs**2 + ys**2)) * torch.cos(2.0 * math.pi * frequency * (xs * math.cos(omega) + ys * math.sin(omega)))
    field = torch.fft.irfft2(torch.fft.rfft2(field) * torch.fft.rfft2(kernel), s=(h, w))
    return colour_map(torch.tanh(field / field.std().clamp(min=1e-6)), rng)


def _stripes(size_hw, rng, device):
    y, x = _coords(size_hw, device)
    angle = uniform(rng, 0.0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    warp = uniform(rng, 0.0, 3.0) * fbm_noise(size_hw, rng, base_res=2, octaves=3, device=device)
    wave = torch.sin(2.0 * math.pi * uniform(rng, 4.0, 24.0) * u + warp + uniform(rng, 0.0, 2.0 * math.pi))
    return colour_map(torch.tanh(uniform(rng, 1.0, 8.0) * wave), rng, colours=randint(rng, 2, 3))


def _voronoi(size_hw, rng, device):
    h, w = size_hw
    sites = randint(rng, 8, 64)
    y, x = _coords(size_hw, device)
    points = rand(rng, sites, 2, device=device) * torch.tensor([h / min(h, w), w / min(h, w)], device=device)
    pixels = torch.stack(torch.broadcast_tensors(y, x), dim=-1).reshape(-1, 2)
    distances = torch.cdist(pixels, points)
    nearest = distances.topk(2, dim=1, largest=False)
    colours = rand(rng, sites, 3, device=device)
    image = colours[nearest.indices[:, 0]].T.reshape(3, h, w)
    edge = (nearest.values[:, 1] - nearest.values[:, 0]).reshape(1, h, w)
    darken = uniform(rng, 0.0, 0.8)
    return (image * (1.0 - darken * torch.exp(-edge * min(h, w) / 2.0))).clamp(0.0, 1.0)


def _checkers(size_hw, rng, device):
    y, x = _coords(size_hw, device)
    angle = uniform(rng, 0.0, math.pi / 2.0)
    period = uniform(rng, 4.0, 32.0) / 256.0
    u = (x * math.cos(angle) + y * math.sin(angle)) / period
    v = (-x * math.sin(angle) + y * math.cos(angle)) / period
    parity = ((u.floor() + v.floor()) % 2.0)[None]
    a, b = rand(rng, 3, 1, 1, device=device), rand(rng, 3, 1, 1, device=device)
    return a * parity + b * (1.0 - parity)


_MAKERS = {"fbm": _fbm, "gabor": _gabor, "stripes": _stripes, "voronoi": _voronoi, "checkers": _checkers}


def procedural_texture(kind: str, size_hw: tuple[int, int], rng: torch.Generator, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """One procedural texture ``[3, H, W]`` in [0, 1] of ``kind`` (:data:`PROCEDURAL_KINDS`)."""
    if kind not in _MAKERS:
        raise ValueError(f"texture kind: expected one of {', '.join(PROCEDURAL_KINDS)}, got {kind!r}")
    return _MAKERS[kind]((int(size_hw[0]), int(size_hw[1])), rng, torch.device(device)).float()


def skimage_available() -> bool:
    """Whether scikit-image is installed with its bundled texture files (no import of its data fetchers)."""
    if importlib.util.find_spec("skimage") is None:
        return False
    try:
        folder = importlib.resources.files("skimage").joinpath("data")
        return all(folder.joinpath(name).is_file() for name in SKIMAGE_TEXTURES)
    except (ModuleNotFoundError, OSError):
        return False


@functools.lru_cache(maxsize=None)
def _read_file_texture(name: str) -> torch.Tensor:
    """A bundled texture as uint8 ``[3, H, W]`` on the CPU (read once per process)."""
    if name not in SKIMAGE_TEXTURES:
        raise ValueError(f"texture file: expected one of {', '.join(SKIMAGE_TEXTURES)}, got {name!r}")
    try:
        data = importlib.resources.files("skimage").joinpath("data", name).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError, OSError) as err:
        raise FileNotFoundError(
            f"texture file skimage/data/{name} not found ({err}); install scikit-image (pip install scikit-image) "
            "or use texture_sources=('procedural',)"
        ) from None
    with Image.open(io.BytesIO(data)) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def file_texture(name: str, size_hw: tuple[int, int], rng: torch.Generator, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """A random crop of a bundled texture file, resized to ``size_hw``: ``[3, H, W]`` in [0, 1]."""
    full = _read_file_texture(name)
    _, fh, fw = full.shape
    side = max(8, int(min(fh, fw) * uniform(rng, 0.4, 1.0)))
    aspect = size_hw[1] / size_hw[0]
    ch, cw = (side, min(fw, int(side * aspect))) if aspect >= 1 else (min(fh, int(side / aspect)), side)
    top, left = randint(rng, 0, fh - ch), randint(rng, 0, fw - cw)
    crop = full[:, top : top + ch, left : left + cw].to(device).float() / 255.0
    image = resize(crop, size_hw).clamp(0.0, 1.0)
    if uniform(rng, 0.0, 1.0) < 0.5:
        image = colour_map(image.mean(0), rng)
    return image


def texture(source: str, size_hw: tuple[int, int], rng: torch.Generator, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """A texture from ``source``: a procedural kind (``"fbm"``, ...) or a bundled file (``"brick.png"``, ...)."""
    if source in SKIMAGE_TEXTURES:
        return file_texture(source, size_hw, rng, device=device)
    return procedural_texture(source, size_hw, rng, device=device)
