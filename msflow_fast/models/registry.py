"""Model registry: one name per model; the CLI and the checkpoints find models here.

A model registers itself next to its definition::

    @register("msflow", summary="MSFlow (TNNLS 2024): ...")
    class MSFlow(AnomalyModel): ...

and is found by name everywhere else: :func:`get`, :func:`create`, :func:`available`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from .base import AnomalyModel

_MODELS: dict[str, type[AnomalyModel]] = {}


def register(name: str, *, summary: str, interpretation: bool = False) -> Callable[[type], type]:
    """Class decorator: register an :class:`~msflow_fast.models.base.AnomalyModel` under ``name``.

    Args:
        name: the registry name (lower case, ``[a-z0-9_]``), used by ``--model`` and in checkpoints.
        summary: one line for ``msflow-fast models``.
        interpretation: the model is an interpretation of a paper whose code is not public
            (shown as such by ``msflow-fast models`` and in its docs).

    Raises:
        ValueError: a bad or already registered name.
        TypeError: the class is not an ``AnomalyModel``.
    """
    if not isinstance(name, str) or not name or not all(c.islower() or c.isdigit() or c == "_" for c in name):
        raise ValueError(f"model name must be lower case letters, digits and '_', got {name!r}")

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, AnomalyModel)):
            raise TypeError(f"register({name!r}) needs an AnomalyModel subclass, got {cls!r}")
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"a model is already registered as {name!r}: {_MODELS[name].__qualname__}")
        cls.name, cls.summary, cls.interpretation = name, summary, bool(interpretation)
        _MODELS[name] = cls
        return cls

    return decorate


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (for tests and plugins)."""
    _MODELS.pop(name, None)


def available() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def get(name: str) -> type[AnomalyModel]:
    """The model class registered as ``name``.

    Raises:
        ValueError: no such model; the message lists close names and every registered one.
    """
    if name in _MODELS:
        return _MODELS[name]
    close = difflib.get_close_matches(str(name), list(_MODELS), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} Registered models: {', '.join(available())}")


def create(name: str, config: Any = None, *, backbone: nn.Module | str | None = None, **overrides: Any) -> AnomalyModel:
    """``get(name)(config, backbone=backbone, **overrides)``: a new model by registry name."""
    return get(name)(config, backbone=backbone, **overrides)


def describe() -> list[dict[str, Any]]:
    """One dict per registered model: ``name``, ``summary``, ``interpretation``, ``class``."""
    return [
        {"name": n, "summary": c.summary, "interpretation": c.interpretation, "class": f"{c.__module__}.{c.__qualname__}"}
        for n, c in sorted(_MODELS.items())
    ]


__all__ = ["available", "create", "describe", "get", "register", "unregister"]
