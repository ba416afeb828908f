"""Command-line flags generated from a model's config dataclass: one flag per field.

``--input-size 256``, ``--parallel-blocks 2 5 8``, ``--clamp-alpha 1.9``; booleans as
``--name/--no-name``; ``none`` for optional values. Help texts come from the dataclass's
``Attributes:`` docstring section.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable

__all__ = ["PREFIX", "add_config_arguments", "config_from_args", "config_overrides", "parse_bool"]

PREFIX = "cfg__"


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _converter(tp: Any) -> tuple[Callable[[str], Any], dict[str, Any]]:
    """argparse ``type`` and extra keyword arguments for an annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        convert, extra = _converter(inner[0] if len(inner) == 1 else str)
        if extra.get("choices"):
            extra["choices"] = list(extra["choices"]) + [None]
        return _optional(convert), extra
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        base = kinds.pop() if len(kinds) == 1 else str
        return (parse_bool if base is bool else base), {"choices": list(args)}
    if origin in (tuple, list, typing.Sequence) or tp in (tuple, list):
        item = next((a for a in args if a is not Ellipsis), str)
        convert, _ = _converter(item)
        return convert, {"nargs": "+"}
    if tp is bool:
        return parse_bool, {}
    if tp in (int, float, str):
        return tp, {}
    return str, {}


def _field_docs(config_cls: type) -> dict[str, str]:
    """Per-field text from the Google-style ``Attributes:`` section of the dataclass docstring."""
    import inspect
    import re

    doc = inspect.getdoc(config_cls) or ""
    docs: dict[str, str] = {}
    inside, current, indent = False, None, None
    for line in doc.splitlines():
        if line.strip() in ("Attributes:", "Args:"):
            inside, current, indent = True, None, None
            continue
        if not inside:
            continue
        if not line.strip():
            current = None
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent or (width == 0 and line.rstrip().endswith(":")):
            inside = False
            continue
        match = re.match(r"\s*(\w+)(?: \(.*?\))?:\s*(.*)", line)
        if width == indent and match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current is not None:
            docs[current] += " " + line.strip()
    return docs


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, defaults: dict[str, Any] | None = None) -> None:
    """Add one flag per init field of the config dataclass (dest ``cfg__<field>``, default: unset).

    ``defaults`` are the values this command uses for unset flags (shown in the help); other
    fields keep the dataclass defaults.
    """
    defaults = defaults or {}
    what = "this command's defaults" if defaults else "the official defaults"
    group = parser.add_argument_group(f"model config ({config_cls.__name__} fields; unset flags keep {what})")
    hints = typing.get_type_hints(config_cls)
    docs = _field_docs(config_cls)
    taken = {opt for action in parser._actions for opt in action.option_strings}
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        if flag in taken:
            flag = "--model-" + f.name.replace("_", "-")
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "required"
        text = (f.metadata.get("help", "") if f.metadata else "") or docs.get(f.name, "")
        text = text.replace("``", "").replace("%", "%%")
        help_text = f"{text + ' ' if text else ''}(default: {_show(default)})"
        tp = hints.get(f.name, str)
        if tp is bool:
            group.add_argument(flag, dest=PREFIX + f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        convert, extra = _converter(tp)
        metavar = f.name.upper() if "choices" not in extra else None
        group.add_argument(flag, dest=PREFIX + f.name, type=convert, default=argparse.SUPPRESS, metavar=metavar, help=help_text, **extra)


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return str(value)


def config_overrides(args: argparse.Namespace, config_cls: type | None = None) -> dict[str, Any]:
    """The config fields given on the command line."""
    out = {}
    hints = typing.get_type_hints(config_cls) if config_cls is not None else {}
    for key, value in vars(args).items():
        if key.startswith(PREFIX):
            name = key[len(PREFIX) :]
            tp = hints.get(name)
            if isinstance(value, list) and (typing.get_origin(tp) is tuple or tp is tuple or tp is None):
                value = tuple(value)
                fixed = typing.get_args(tp) if tp is not None else ()
                # a fixed-size tuple field given one value (e.g. --input-size 256): pass the scalar
                if len(value) == 1 and len(fixed) > 1 and Ellipsis not in fixed:
                    value = value[0]
            out[name] = value
    return out


def config_from_args(args: argparse.Namespace, config_cls: type, **defaults: Any) -> Any:
    """``config_cls(**defaults, **overrides from args)``; ``ValueError`` from the config names the field."""
    values = dict(defaults)
    values.update(config_overrides(args, config_cls))
    return config_cls(**values)
