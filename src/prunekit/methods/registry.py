"""Registry of method names → :class:`~prunekit.methods.base.Pruner` classes.

Tests enumerate :func:`available` so that a method is covered by the contract tests the moment it is
registered. Users register their own methods with :func:`register_method`.
"""

from __future__ import annotations

from collections.abc import Callable

from prunekit.methods.base import Pruner

_METHODS: dict[str, type[Pruner]] = {}


def register_method(name: str) -> Callable[[type[Pruner]], type[Pruner]]:
    """Class decorator registering a pruner under ``name`` (which also becomes ``cls.name``)."""

    def decorator(cls: type[Pruner]) -> type[Pruner]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__name__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def available() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> type[Pruner]:
    """The pruner class registered under ``name``; unknown names list the known ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available())}") from None
