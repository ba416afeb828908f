"""Field checks for the models' frozen config dataclasses, one policy for every model.

Call them from a config's ``__post_init__``: each reads ``config.<name>``, raises a ``TypeError`` or
``ValueError`` that names the field, the rule and the value it got, and stores the normalised value
(``float`` for numbers) back on the frozen instance where it converts one.
"""

from __future__ import annotations

import math

from collections.abc import Iterable
from typing import Any


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_name(config: Any, name: str, what: str = "timm model name") -> None:
    """``config.<name>`` is a non-empty string (a backbone name, say)."""
    value = getattr(config, name)
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty {what}, got {value!r}")


def require_bool(config: Any, *names: str) -> None:
    """Each ``config.<name>`` is a ``bool`` (not 0/1, not a string)."""
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise TypeError(f"{name} must be a bool, got {getattr(config, name)!r}")


def require_int(config: Any, name: str, low: int) -> None:
    """``config.<name>`` is an int ``>= low`` (a bool is refused)."""
    value = getattr(config, name)
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def require_number(config: Any, name: str, *, above: float = 0.0, at_most: float | None = None) -> None:
    """``config.<name>`` is a finite number in ``(above, at_most]`` (no upper bound when ``at_most``
    is None); stored back as a ``float``."""
    value = getattr(config, name)
    if not _is_number(value) or not math.isfinite(value) or not value > above or (at_most is not None and value > at_most):
        rule = f"in ({above:g}, {at_most:g}]" if at_most is not None else f"> {above:g}"
        raise ValueError(f"{name} must be a finite number {rule}, got {value!r}")
    object.__setattr__(config, name, float(value))


def require_choice(config: Any, name: str, choices: Iterable[str]) -> None:
    """``config.<name>`` is one of ``choices``."""
    choices = tuple(choices)
    if getattr(config, name) not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {getattr(config, name)!r}")


__all__ = ["require_bool", "require_choice", "require_int", "require_name", "require_number"]
