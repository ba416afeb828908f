"""The one normaliser of image sizes: an int (square) or an ``(H, W)`` pair -> ``(H, W)``."""

from __future__ import annotations

from typing import Any


def image_size_hw(size: Any, name: str = "input_size") -> tuple[int, int]:
    """``(H, W)`` in pixels from an int ``S`` (square), a 1-sequence ``(S,)`` or a pair ``(H, W)``.

    Raises:
        TypeError: not an int or a sequence of ints (``name`` is named in the message).
        ValueError: a value below 1, or more than two values.
    """
    if isinstance(size, bool):
        raise TypeError(f"{name} must be a positive int or an (H, W) pair of ints, got {size!r}")
    if isinstance(size, int):
        values: tuple = (size, size)
    elif isinstance(size, (tuple, list)) or type(size).__name__ == "Size":
        values = tuple(size)
        if len(values) == 1:
            values = (values[0], values[0])
    else:
        raise TypeError(f"{name} must be a positive int or an (H, W) pair of ints, got {type(size).__name__} {size!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be a positive int or an (H, W) pair of ints, got {size!r}")
    if len(values) != 2:
        raise ValueError(f"{name} must be one side or an (H, W) pair, got {len(values)} values: {size!r}")
    if min(values) < 1:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return int(values[0]), int(values[1])


__all__ = ["image_size_hw"]
