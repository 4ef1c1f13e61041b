"""Strict construction of config dataclasses from plain data (recipes, JSON, keyword arguments).

An unknown key is an error that names it and lists the valid ones; a value of the wrong type is an
error that names the field and the expected type. Nothing is evaluated (no ``eval``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """Invalid configuration: unknown key, wrong type or out-of-range value."""


def check_keys(data: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """Raise :class:`ConfigError` naming the first unknown key of ``data`` and the valid ones."""
    allowed = sorted(valid)
    for key in data:
        if key not in allowed:
            raise ConfigError(f"unknown key {key!r} in {where}; valid keys: {', '.join(allowed)}")


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        args = typing.get_args(annotation)
        return not args or all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def from_dict(cls: type[T], data: Mapping[str, Any], where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data`` strictly (unknown keys and wrong types are errors)."""
    where = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    check_keys(data, fields, where)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if not _type_ok(value, hints[key]):
            raise ConfigError(
                f"{where}.{key} must be {_type_name(hints[key])}, got {value!r} ({type(value).__name__})"
            )
        if hints[key] is float and isinstance(value, int):
            value = float(value)
        values[key] = list(value) if isinstance(value, tuple) else value
    try:
        return cls(**values)
    except TypeError as exc:  # missing required fields
        raise ConfigError(f"{where}: {exc}") from None


def short_repr(value: Any, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters, for a value quoted in a one-line error."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(config)
