"""The pseudo-anomaly generator's configuration: one frozen dataclass, validated on construction.

Every field has a default taken from the methods it follows (DRAEM, CutPaste, NSA, DeSTSeg);
areas are fractions of the image, lengths are pixels at ``reference_size`` (scaled to the image's
shorter side), angles degrees, intensities fractions of the full range [0, 1].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .priors import ROTATION_RULES, foreground_rule, rotation_rule
from .textures import PROCEDURAL_KINDS, SKIMAGE_TEXTURES, skimage_available

__all__ = ["BRANCHES", "PseudoAnomalyConfig", "TEXTURE_SOURCES"]

BRANCHES = ("texture", "cutpaste", "scar", "poisson")
"""The anomaly branches: DRAEM texture intrusion, CutPaste patch, CutPaste scar, NSA Poisson blend."""
TEXTURE_SOURCES = ("procedural", "skimage")
_DEFAULT_WEIGHTS = (("texture", 0.4), ("cutpaste", 0.2), ("scar", 0.2), ("poisson", 0.2))


def _fail(name: str, expected: str, value: Any) -> None:
    raise ValueError(f"PseudoAnomalyConfig.{name}: expected {expected}, got {value!r}")


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float in the interval (brackets as the flags say)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, f"a finite number in {interval}", value)
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not inside:
        _fail(name, f"a number in {interval}", value)
    return float(value)


def _integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        _fail(name, f"an int >= {low}" + ("" if high is None else f" and <= {high}"), value)
    return int(value)


def _range(name: str, value: Any, low: float, high: float, *, integers: bool = False) -> tuple:
    """A ``(lo, hi)`` pair with ``low <= lo <= hi <= high``."""
    kind = "ints" if integers else "numbers"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        _fail(name, f"a (low, high) pair of {kind} within [{low:g}, {high:g}]", value)
    lo = _integer(name, value[0], int(low), int(high)) if integers else _number(name, value[0], low, high)
    hi = _integer(name, value[1], int(low), int(high)) if integers else _number(name, value[1], low, high)
    if lo > hi:
        _fail(name, f"a (low, high) pair with low <= high", value)
    return (lo, hi)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        _fail(name, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


@dataclass(frozen=True)
class PseudoAnomalyConfig:
    """What the generator draws (see :mod:`msflow_fast.engine.data.pseudo_anomaly`).

    Mixture:
        p_normal: probability of returning the image unchanged (label 0); DRAEM: 0.5.
        branch_weights: ``{branch: weight}`` over :data:`BRANCHES` (missing ones weigh 0; any
            positive sum, normalised).
    Size limits:
        min_area, max_area: a mask covering less or more of the image is redrawn (0.1%, 30%).
        min_contrast: a proposal whose mean change inside its mask (max over channels) is below
            this is redrawn too (an invisible "anomaly" would be label noise).
        max_attempts: draws per sample before the fallback (a texture rectangle of a valid size).
    Texture intrusion (DRAEM):
        perlin_scales: exponents ``(a_min, a_max)`` of the Perlin scales ``2^a x 2^b``; (0, 5).
        perlin_threshold: mask = noise > this (noise in [-1, 1]); 0.5.
        mask_rotation: the noise is rotated by U(-this, this) degrees; 90.
        beta_max: opacity ``beta ~ U[0, beta_max)`` of the image over the texture; 0.8.
        colour_ops: distinct augmentations of the texture (of DRAEM's ten); 3.
        texture_sources: ``"auto"`` (procedural, plus scikit-image's files when installed) or a
            tuple of :data:`TEXTURE_SOURCES`.
    CutPaste and scar (pixels at ``reference_size``):
        cutpaste_area, cutpaste_aspect: patch area fraction (0.02, 0.15); aspect (0.3, 3.3), log-uniform.
        scar_width, scar_length, scar_rotation: (2, 16) px, (10, 25) px, U(-45, 45) degrees.
        jitter: colour jitter strength of the pasted pixels; 0.1.
    Poisson blend (NSA):
        poisson_area, poisson_aspect: destination patch like CutPaste's; the source patch is taken
            from another good image at a scale of ``poisson_scale`` (resized to the destination).
        poisson_gradient: ``"source"`` (normal clone) or ``"mixed"``.
        poisson_threshold: mask = max over channels of ``|blended - image|`` > this; 0.05.
    Priors:
        category: dataset category (MVTec AD names enable its rules).
        foreground: ``"auto"`` (object categories only), ``"on"`` or ``"off"``.
        foreground_threshold: colour distance to the background above which a pixel is foreground.
        rotation: ``"auto"`` (the category's rule), or one of ``"none"``, ``"small"``, ``"right_angles"``.
        reference_size: the image side the pixel lengths refer to; 256.

    Raises:
        ValueError: naming the field, what it expects and the value given.
    """

    p_normal: float = 0.5
    branch_weights: Any = _DEFAULT_WEIGHTS
    min_area: float = 0.001
    max_area: float = 0.30
    min_contrast: float = 0.02
    max_attempts: int = 10
    perlin_scales: tuple[int, int] = (0, 5)
    perlin_threshold: float = 0.5
    mask_rotation: float = 90.0
    beta_max: float = 0.8
    colour_ops: int = 3
    texture_sources: Any = "auto"
    cutpaste_area: tuple[float, float] = (0.02, 0.15)
    cutpaste_aspect: tuple[float, float] = (0.3, 3.3)
    scar_width: tuple[float, float] = (2.0, 16.0)
    scar_length: tuple[float, float] = (10.0, 25.0)
    scar_rotation: float = 45.0
    jitter: float = 0.1
    poisson_area: tuple[float, float] = (0.02, 0.15)
    poisson_aspect: tuple[float, float] = (0.3, 3.3)
    poisson_scale: tuple[float, float] = (0.75, 1.33)
    poisson_gradient: str = "source"
    poisson_threshold: float = 0.05
    category: str | None = None
    foreground: str = "auto"
    foreground_threshold: float = 0.1
    rotation: str = "auto"
    reference_size: int = 256

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        put("p_normal", _number("p_normal", self.p_normal, 0.0, 1.0))
        put("branch_weights", self._weights(self.branch_weights))
        put("min_area", _number("min_area", self.min_area, 0.0, 1.0, high_open=True))
        put("max_area", _number("max_area", self.max_area, 0.0, 1.0, low_open=True))
        if self.min_area >= self.max_area:
            _fail("min_area", f"a fraction below max_area ({self.max_area:g})", self.min_area)
        put("min_contrast", _number("min_contrast", self.min_contrast, 0.0, 1.0, high_open=True))
        put("max_attempts", _integer("max_attempts", self.max_attempts, 1, 1000))
        put("perlin_scales", _range("perlin_scales", self.perlin_scales, 0, 10, integers=True))
        put("perlin_threshold", _number("perlin_threshold", self.perlin_threshold, -1.0, 1.0, high_open=True))
        put("mask_rotation", _number("mask_rotation", self.mask_rotation, 0.0, 180.0))
        put("beta_max", _number("beta_max", self.beta_max, 0.0, 1.0))
        put("colour_ops", _integer("colour_ops", self.colour_ops, 0, 10))
        put("texture_sources", self._sources(self.texture_sources))
        for name in ("cutpaste_area", "poisson_area"):
            put(name, _range(name, getattr(self, name), 0.0, 1.0))
            if getattr(self, name)[0] <= 0.0:
                _fail(name, "a (low, high) pair of area fractions above 0", getattr(self, name))
        for name in ("cutpaste_aspect", "poisson_aspect", "poisson_scale"):
            put(name, _range(name, getattr(self, name), 0.01, 100.0))
        put("scar_width", _range("scar_width", self.scar_width, 0.1, 4096.0))
        put("scar_length", _range("scar_length", self.scar_length, 0.1, 4096.0))
        put("scar_rotation", _number("scar_rotation", self.scar_rotation, 0.0, 180.0))
        put("jitter", _number("jitter", self.jitter, 0.0, 1.0))
        put("poisson_gradient", _choice("poisson_gradient", self.poisson_gradient, ("source", "mixed")))
        put("poisson_threshold", _number("poisson_threshold", self.poisson_threshold, 0.0, 1.0, high_open=True))
        if self.category is not None and (not isinstance(self.category, str) or not self.category):
            _fail("category", "a non-empty str or None", self.category)
        put("foreground", _choice("foreground", self.foreground, ("auto", "on", "off")))
        put("foreground_threshold", _number("foreground_threshold", self.foreground_threshold, 0.0, 1.0, high_open=True))
        put("rotation", _choice("rotation", self.rotation, ("auto",) + ROTATION_RULES))
        put("reference_size", _integer("reference_size", self.reference_size, 1))

    def _weights(self, value: Any) -> tuple[tuple[str, float], ...]:
        pairs = value.items() if isinstance(value, Mapping) else value
        try:
            pairs = [(k, w) for k, w in pairs]
        except (TypeError, ValueError):
            _fail("branch_weights", "a {branch: weight} dict", value)
        weights = dict.fromkeys(BRANCHES, 0.0)
        for key, weight in pairs:
            if key not in BRANCHES:
                raise ValueError(
                    f"PseudoAnomalyConfig.branch_weights: unknown branch {key!r}; the branches are {', '.join(BRANCHES)}"
                )
            weights[key] = _number(f"branch_weights[{key!r}]", weight, 0.0, math.inf, high_open=True)
        if sum(weights.values()) <= 0.0 and self.p_normal < 1.0:
            _fail("branch_weights", "at least one positive weight (or p_normal=1.0 for no anomalies)", value)
        return tuple((k, weights[k]) for k in BRANCHES)

    def _sources(self, value: Any) -> Any:
        if value == "auto":
            return "auto"
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (tuple, list)) or not value or any(v not in TEXTURE_SOURCES for v in value):
            _fail("texture_sources", f"'auto' or a non-empty tuple of {', '.join(repr(s) for s in TEXTURE_SOURCES)}", value)
        if "skimage" in value and not skimage_available():
            raise ValueError(
                "PseudoAnomalyConfig.texture_sources: 'skimage' needs scikit-image installed with its bundled "
                f"textures ({', '.join(SKIMAGE_TEXTURES)}); pip install scikit-image, or use texture_sources=('procedural',)"
            )
        return tuple(dict.fromkeys(value))

    # --------------------------------------------------------------------------------- resolved settings

    @property
    def weights(self) -> dict[str, float]:
        """``{branch: probability}`` given an anomaly (weights normalised to sum 1)."""
        total = sum(w for _, w in self.branch_weights) or 1.0
        return {k: w / total for k, w in self.branch_weights}

    def sources(self) -> tuple[str, ...]:
        """The texture entries drawn from (uniformly): procedural kinds, then bundled files."""
        chosen = ("procedural", "skimage") if self.texture_sources == "auto" and skimage_available() else (
            ("procedural",) if self.texture_sources == "auto" else self.texture_sources
        )
        return (PROCEDURAL_KINDS if "procedural" in chosen else ()) + (SKIMAGE_TEXTURES if "skimage" in chosen else ())

    def rotation_rule(self) -> str:
        """The rotation rule in force: ``rotation``, or the category's for ``"auto"``."""
        return rotation_rule(self.category) if self.rotation == "auto" else self.rotation

    def uses_foreground(self) -> bool:
        """Whether masks are restricted to the foreground."""
        return foreground_rule(self.category) if self.foreground == "auto" else self.foreground == "on"

    def replace(self, **changes: Any) -> "PseudoAnomalyConfig":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-able): the fields, with ``branch_weights`` as a dict."""
        out = dataclasses.asdict(self)
        out["branch_weights"] = dict(self.branch_weights)
        out["texture_sources"] = self.texture_sources if isinstance(self.texture_sources, str) else list(self.texture_sources)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}
