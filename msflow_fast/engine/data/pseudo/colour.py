"""DRAEM's augmentations of an anomaly source, in torch: 3 distinct of 10, in random order.

Each op takes an image ``[3, H, W]`` in [0, 1] and a CPU generator for its parameters and returns
a new image in [0, 1] on the same device:

==================  ============================================================================
``gamma``           ``x ** g``, ``g ~ U(0.5, 2)`` per channel
``brightness``      ``x * m + a``, ``m ~ U(0.8, 1.2)``, ``a ~ U(-30, 30) / 255``
``sharpness``       PIL-style: blend with the 3x3 smoothed image, factor ``U(0, 2)`` (1 = unchanged)
``hue_saturation``  hue ``+ U(-50, 50) / 255`` of a turn, saturation ``+ U(-50, 50) / 255`` (HSV)
``solarize``        pixels ``>= t`` inverted, ``t ~ U(32, 128) / 255``
``posterize``       8-bit values keep their top ``U{2..5}`` bits
``invert``          ``1 - x``
``autocontrast``    each channel stretched from its min..max to 0..1
``equalize``        each channel's 8-bit histogram equalised (PIL's rule)
``rotate``          rotation by ``U(-45, 45)`` degrees, zeros in the corners
==================  ============================================================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .draws import rand, randint, uniform
from .geometry import rotate as _rotate

__all__ = ["COLOUR_OPS", "colour_jitter", "hsv_to_rgb", "random_colour_ops", "rgb_to_hsv"]


def gamma(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    g = 0.5 + 1.5 * rand(rng, 3, 1, 1, device=x.device)
    return x.clamp(0.0, 1.0).pow(g)


def brightness(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    return (x * uniform(rng, 0.8, 1.2) + uniform(rng, -30.0, 30.0) / 255.0).clamp(0.0, 1.0)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def sharpness(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    kernel = _SMOOTH.to(x.device, x.dtype).expand(3, 1, 3, 3)
    smooth = F.conv2d(F.pad(x[None], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)[0]
    factor = uniform(rng, 0.0, 2.0)
    return (smooth + factor * (x - smooth)).clamp(0.0, 1.0)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` RGB in [0, 1] -> HSV, each channel in [0, 1] (hue in turns)."""
    r, g, b = x[0], x[1], x[2]
    value, argmax = x.max(0)
    low = x.min(0).values
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(argmax == 0, ((g - b) / safe) % 6.0, torch.where(argmax == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = torch.where(chroma > 0, hue / 6.0, torch.zeros_like(hue)) % 1.0
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), torch.zeros_like(value))
    return torch.stack((hue, saturation, value))


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv[0] % 1.0, hsv[1].clamp(0.0, 1.0), hsv[2].clamp(0.0, 1.0)
    k = torch.stack([(n + h * 6.0) % 6.0 for n in (5.0, 3.0, 1.0)])
    return v - v * s * (torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))


def hue_saturation(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    hsv = rgb_to_hsv(x.clamp(0.0, 1.0))
    shift = torch.tensor([uniform(rng, -50.0, 50.0) / 255.0, uniform(rng, -50.0, 50.0) / 255.0, 0.0], device=x.device, dtype=x.dtype)
    hsv = hsv + shift.view(3, 1, 1)
    return hsv_to_rgb(hsv).clamp(0.0, 1.0)


def solarize(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    threshold = uniform(rng, 32.0, 128.0) / 255.0
    return torch.where(x >= threshold, 1.0 - x, x)


def _to_8bit(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0.0, 1.0) * 255.0).round().long()


def posterize(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    bits = randint(rng, 2, 5)
    step = 2 ** (8 - bits)
    return (torch.div(_to_8bit(x), step, rounding_mode="floor") * step).to(x.dtype) / 255.0


def invert(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    return 1.0 - x


def autocontrast(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    low = x.amin(dim=(1, 2), keepdim=True)
    high = x.amax(dim=(1, 2), keepdim=True)
    span = high - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, torch.ones_like(span)), x).clamp(0.0, 1.0)


def equalize(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """PIL's ``ImageOps.equalize`` per channel, without a host sync."""
    values = _to_8bit(x).reshape(3, -1)
    offsets = torch.arange(3, device=x.device)[:, None] * 256
    hist = torch.bincount((values + offsets).reshape(-1), minlength=768).reshape(3, 256)
    levels = torch.arange(256, device=x.device)
    last_level = torch.where(hist > 0, levels, torch.zeros_like(levels)).argmax(1, keepdim=True)
    last = hist.gather(1, last_level)
    step = (values.shape[1] - last) // 255
    before = hist.cumsum(1) - hist  # pixels below each level
    lut = torch.div(before + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1), rounding_mode="floor").clamp(max=255)
    lut = torch.where(step > 0, lut, levels.expand(3, 256))
    return (lut.gather(1, values).reshape(x.shape).to(x.dtype) / 255.0)


def rotate(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    return _rotate(x, uniform(rng, -45.0, 45.0), padding="zeros").clamp(0.0, 1.0)


COLOUR_OPS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "gamma": gamma,
    "brightness": brightness,
    "sharpness": sharpness,
    "hue_saturation": hue_saturation,
    "solarize": solarize,
    "posterize": posterize,
    "invert": invert,
    "autocontrast": autocontrast,
    "equalize": equalize,
    "rotate": rotate,
}
"""The ten ops, by name, in DRAEM's order."""


def random_colour_ops(x: torch.Tensor, rng: torch.Generator, count: int = 3) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Apply ``count`` distinct ops of :data:`COLOUR_OPS`, in a random order; returns the image and their names."""
    names = list(COLOUR_OPS)
    order = torch.randperm(len(names), generator=rng)[:count].tolist()
    for i in order:
        x = COLOUR_OPS[names[i]](x, rng)
    return x, tuple(names[i] for i in order)


def colour_jitter(x: torch.Tensor, rng: torch.Generator, strength: float = 0.1) -> torch.Tensor:
    """CutPaste's jitter: brightness, contrast and saturation factors ``U(1 - s, 1 + s)`` and a hue
    shift ``U(-s, s)`` turns, in that order; ``[3, H, W]`` in [0, 1]."""
    x = (x * uniform(rng, 1.0 - strength, 1.0 + strength)).clamp(0.0, 1.0)
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])
    x = (grey.mean() + uniform(rng, 1.0 - strength, 1.0 + strength) * (x - grey.mean())).clamp(0.0, 1.0)
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    x = (grey + uniform(rng, 1.0 - strength, 1.0 + strength) * (x - grey)).clamp(0.0, 1.0)
    hsv = rgb_to_hsv(x)
    hsv[0] = hsv[0] + uniform(rng, -strength, strength)
    return hsv_to_rgb(hsv).clamp(0.0, 1.0)
