"""The one base of every config dataclass, its strict construction, and the shared range checks.

Every method, post-training compressor, structured optimizer and gradient compression method has
one config dataclass derived from :class:`Config`: a version, strict :meth:`Config.from_dict` /
:meth:`Config.to_dict` and a JSON round trip. An unknown key is an error that names it and lists
the valid ones; a value of the wrong type is an error that names the field and the expected type;
a value out of range is an error that names the field and the range (the ``check_*`` functions
here, used by every config). Nothing is evaluated (no ``eval``). Every error is a
:class:`ConfigError`, a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Self, TypeVar

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


@dataclasses.dataclass(kw_only=True)
class Config:
    """Base of every config dataclass: a version, strict construction from plain data, JSON.

    Subclasses are ``@dataclass(kw_only=True)`` and check their values in ``__post_init__`` with
    the ``check_*`` functions of this module (calling ``super().__post_init__()``).
    """

    #: the layout of the fields; saved with the state of whatever the config built
    version: ClassVar[int] = 1
    #: the registry name errors use (set when the owning class is registered; else the class name)
    method_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        pass

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Strict construction: unknown keys, wrong types and values out of range raise
        :class:`ConfigError` naming the key."""
        return from_dict(cls, data, cls.method_name or cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (``from_dict(to_dict())`` gives an equal config)."""
        return to_dict(self)

    @classmethod
    def from_json(cls, text: str) -> Self:
        """:meth:`from_dict` of a JSON object."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cls.method_name or cls.__name__}: not JSON ({exc})") from None
        return cls.from_dict(data)

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), sort_keys=True)


# --- the shared range checks ---------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a number (an integer with ``integer``, never
    a bool) in the interval from ``low`` to ``high`` (``low_open``/``high_open`` exclude the
    ends); NaN is never in range. The message names the field and the interval."""
    kind_ok = isinstance(value, int) if integer else isinstance(value, int | float)
    ok = kind_ok and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if ok:
        return
    what = "an integer " if integer else ""
    if high == math.inf:
        raise ConfigError(
            f"{name} must be {what}{'>' if low_open else '>='} {low:g}, got {value!r}"
        )
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    raise ConfigError(f"{name} must be {what}in {left}{low:g}, {high:g}{right}, got {value!r}")


def check_fraction(name: str, value: Any, *, closed: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is in ``[0, 1)`` (``[0, 1]`` with ``closed``)."""
    check_range(name, value, 0.0, 1.0, high_open=not closed)


def check_non_negative(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value >= 0``."""
    check_range(name, value, 0.0)


def check_positive(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value > 0``."""
    check_range(name, value, 0.0, low_open=True)


def check_int(name: str, value: Any, low: int) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an integer (not a bool) ``>= low``."""
    check_range(name, value, low, integer=True)


def check_choice(name: str, value: Any, valid: Iterable[str]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``valid``."""
    choices = list(valid)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_window(start: Any, end: Any) -> None:
    """Raise :class:`ConfigError` unless ``0 <= start < end <= 1`` (fractions of training)."""
    if not (_is_number(start) and _is_number(end) and 0.0 <= start < end <= 1.0):
        raise ConfigError(
            f"start and end are fractions of training with 0 <= start < end <= 1, "
            f"got start={start!r}, end={end!r}"
        )


def fraction_step(fraction: float, total_steps: int) -> int:
    """A point of training given as a fraction of ``total_steps``, in steps."""
    return round(fraction * total_steps)
