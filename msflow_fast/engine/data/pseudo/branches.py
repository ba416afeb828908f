"""The anomaly branches: each turns a good image into a proposal ``(image, mask)``.

All take ``x`` ``[3, H, W]`` in [0, 1], a CPU generator and a :class:`Context`, and return the
changed image (``[3, H, W]`` in [0, 1]) with its mask (``[H, W]`` float in {0, 1}), or ``None``
when the drawn geometry cannot pass the size limits (checked before any costly rendering). The
generator restricts, checks and redraws (:mod:`msflow_fast.engine.data.pseudo_anomaly`).

- ``texture`` (DRAEM): Perlin mask; texture source with 3 colour ops;
  ``x (1 - m) + (1 - beta) src m + beta x m``, ``beta ~ U[0, beta_max)``.
- ``cutpaste``: a colour-jittered rectangle of the same image (area fraction and log-uniform aspect
  as configured) pasted at another random place; the mask is the pasted rectangle.
- ``scar``: a thin rectangle (width x length pixels at ``reference_size``, scaled to the image),
  rotated by U(-scar_rotation, scar_rotation), pasted the same way.
- ``poisson`` (NSA): a rectangle of another good image (rescaled by ``poisson_scale``) Poisson-
  blended into a random place; the mask is where ``max_c |blended - x|``, box-smoothed, exceeds
  ``poisson_threshold`` (then closed; never on an unchanged pixel).
- ``fallback``: after ``max_attempts`` failed draws, a texture square of a valid size centred on a
  random foreground pixel, pasted opaquely.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .colour import colour_jitter, random_colour_ops
from .config import PseudoAnomalyConfig
from .draws import log_uniform, randint, uniform
from .geometry import paste_rotated_rect, resize
from .perlin import perlin_mask
from .poisson import poisson_blend
from .textures import procedural_texture, texture

__all__ = ["BRANCH_FUNCTIONS", "Context", "fallback"]

Proposal = tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class Context:
    """What a branch needs besides the image: the config, the texture entries, the foreground
    (``[H, W]`` float, or ``None``: everywhere) and a supplier of another good image (or ``None``)."""

    config: PseudoAnomalyConfig
    sources: tuple[str, ...]
    foreground: torch.Tensor | None = None
    other: Callable[[], torch.Tensor | None] | None = None

    def restrict(self, mask: torch.Tensor) -> torch.Tensor:
        return mask if self.foreground is None else mask * self.foreground

    def area(self, mask: torch.Tensor) -> float:
        """The restricted mask's area as a fraction of the image."""
        return float(self.restrict(mask).mean())

    def area_ok(self, mask: torch.Tensor) -> bool:
        return self.config.min_area <= self.area(mask) <= self.config.max_area


def _rect_size(rng: torch.Generator, hw: tuple[int, int], area: tuple[float, float], aspect: tuple[float, float]) -> tuple[float, float]:
    """``(height, width)`` in pixels of a rectangle with a drawn area fraction and aspect (width / height)."""
    h, w = hw
    pixels = uniform(rng, *area) * h * w
    ratio = log_uniform(rng, *aspect)
    width = min(float(w - 1), math.sqrt(pixels * ratio))
    height = min(float(h - 1), pixels / max(width, 1.0))
    return max(1.0, height), max(1.0, width)


def _centre(rng: torch.Generator, hw: tuple[int, int], extent: tuple[float, float]) -> tuple[float, float]:
    """A random centre ``(row, col)`` keeping a box of ``extent`` (height, width) inside the image."""
    (h, w), (eh, ew) = hw, extent
    return (uniform(rng, min(eh / 2.0, h / 2.0), max(h - eh / 2.0, h / 2.0)) - 0.5,
            uniform(rng, min(ew / 2.0, w / 2.0), max(w - ew / 2.0, w / 2.0)) - 0.5)


def texture_intrusion(x: torch.Tensor, rng: torch.Generator, ctx: Context) -> Proposal:
    cfg, size = ctx.config, tuple(x.shape[-2:])
    mask = perlin_mask(size, rng, scale_exponents=cfg.perlin_scales, threshold=cfg.perlin_threshold,
                       max_rotation=cfg.mask_rotation, device=x.device)
    if not ctx.area_ok(mask):
        return None
    source = texture(ctx.sources[randint(rng, 0, len(ctx.sources) - 1)], size, rng, device=x.device)
    source, _ = random_colour_ops(source, rng, cfg.colour_ops)
    beta = uniform(rng, 0.0, cfg.beta_max)
    m = mask[None]
    return x * (1.0 - m) + (1.0 - beta) * source * m + beta * x * m, mask


def _paste(x: torch.Tensor, rng: torch.Generator, ctx: Context, height: float, width: float, degrees: float) -> Proposal:
    size = tuple(x.shape[-2:])
    reach = (abs(height * math.cos(math.radians(degrees))) + abs(width * math.sin(math.radians(degrees))),
             abs(height * math.sin(math.radians(degrees))) + abs(width * math.cos(math.radians(degrees))))
    src, dst = _centre(rng, size, reach), _centre(rng, size, reach)
    jittered = colour_jitter(x, rng, ctx.config.jitter) if ctx.config.jitter > 0 else x
    image, mask = paste_rotated_rect(x, jittered, src_centre=src, dst_centre=dst, height=height, width=width, degrees=degrees)
    return (image, mask) if ctx.area_ok(mask) else None


def cutpaste(x: torch.Tensor, rng: torch.Generator, ctx: Context) -> Proposal:
    height, width = _rect_size(rng, tuple(x.shape[-2:]), ctx.config.cutpaste_area, ctx.config.cutpaste_aspect)
    return _paste(x, rng, ctx, height, width, 0.0)


def scar(x: torch.Tensor, rng: torch.Generator, ctx: Context) -> Proposal:
    cfg = ctx.config
    scale = min(x.shape[-2:]) / cfg.reference_size
    width = uniform(rng, *cfg.scar_width) * scale
    length = uniform(rng, *cfg.scar_length) * scale
    return _paste(x, rng, ctx, length, width, uniform(rng, -cfg.scar_rotation, cfg.scar_rotation))


def poisson(x: torch.Tensor, rng: torch.Generator, ctx: Context) -> Proposal:
    cfg = ctx.config
    h, w = x.shape[-2:]
    other = ctx.other() if ctx.other is not None else None
    other = x if other is None else resize(other.to(x.device, x.dtype), (h, w))
    height, width = _rect_size(rng, (h, w), cfg.poisson_area, cfg.poisson_aspect)
    ph, pw = max(3, min(h, int(round(height)))), max(3, min(w, int(round(width))))
    top, left = randint(rng, 0, h - ph), randint(rng, 0, w - pw)
    region = torch.zeros(h, w, device=x.device)
    region[top : top + ph, left : left + pw] = 1.0
    if ctx.area(region) < cfg.min_area:
        return None
    scale = uniform(rng, *cfg.poisson_scale)
    sh, sw = max(3, min(h, int(round(ph / scale)))), max(3, min(w, int(round(pw / scale))))
    stop, sleft = randint(rng, 0, h - sh), randint(rng, 0, w - sw)
    patch = resize(other[:, stop : stop + sh, sleft : sleft + sw], (ph, pw))
    blended = poisson_blend(x, patch, top, left, gradient=cfg.poisson_gradient)
    return blended, _difference_mask(blended, x, cfg.poisson_threshold)


def _difference_mask(changed: torch.Tensor, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Where ``changed`` differs from ``x``: the largest channel difference, box-smoothed over
    ``k x k`` pixels (``k = max(3, min(H, W) // 64)``, odd) so the mask follows regions rather than
    single pixels, thresholded at ``> threshold``, then closed (``k x k``) to fill pinholes."""
    k = max(3, (min(x.shape[-2:]) // 64) | 1)
    difference = (changed - x).abs().amax(0)[None, None]
    smooth = F.avg_pool2d(difference, k, stride=1, padding=k // 2, count_include_pad=False)
    mask = (smooth > threshold).float()
    mask = F.max_pool2d(mask, k, stride=1, padding=k // 2)
    mask = -F.max_pool2d(-mask, k, stride=1, padding=k // 2)
    return mask[0, 0] * (difference[0, 0] > 0).float()


def fallback(x: torch.Tensor, rng: torch.Generator, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """A valid anomaly whatever the image: an opaque fBm-texture square of a valid area, on the
    foreground when there is enough of it (then the caller keeps the restriction)."""
    cfg = ctx.config
    h, w = x.shape[-2:]
    low = min(2.0 * cfg.min_area, cfg.max_area)
    area = uniform(rng, low, max(low, min(cfg.max_area, 0.1)))
    side = max(2, int(round(math.sqrt(area * h * w))))
    if ctx.foreground is not None and float(ctx.foreground.sum()) > 0:
        pixels = ctx.foreground.flatten().nonzero()[:, 0]
        flat = int(pixels[randint(rng, 0, pixels.numel() - 1)])
        cy, cx = flat // w, flat % w
    else:
        cy, cx = randint(rng, 0, h - 1), randint(rng, 0, w - 1)
    top, left = min(max(0, cy - side // 2), max(0, h - side)), min(max(0, cx - side // 2), max(0, w - side))
    mask = torch.zeros(h, w, device=x.device)
    mask[top : top + side, left : left + side] = 1.0
    source = procedural_texture("fbm", (h, w), rng, device=x.device)
    return x * (1.0 - mask[None]) + source * mask[None], mask


BRANCH_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Generator, Context], Proposal]] = {
    "texture": texture_intrusion,
    "cutpaste": cutpaste,
    "scar": scar,
    "poisson": poisson,
}
