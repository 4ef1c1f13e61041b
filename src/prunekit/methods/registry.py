"""Registry of sparse-training method names → :class:`~prunekit.methods.base.Pruner` classes.

Tests enumerate :func:`available_methods` so that a method is covered by the contract tests the moment it is
registered. Users register their own methods with :func:`register_method`. The verbs are those of
every prunekit registry (:class:`prunekit.registry.Registry`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from prunekit.methods.base import Pruner
from prunekit.registry import Registry

_METHODS: Registry[type[Pruner]] = Registry("method")


def register_method(name: str) -> Callable[[type[Pruner]], type[Pruner]]:
    """Class decorator registering a pruner under ``name`` (which also becomes ``cls.name``)."""

    def prepare(cls: type[Pruner]) -> None:
        cls.name = name

    return _METHODS.decorator(name, prepare)


def available_methods() -> list[str]:
    """Names of the registered sparse-training methods, sorted."""
    return _METHODS.names()


def available() -> list[str]:
    """Deprecated: :func:`available_methods` (the verb every prunekit registry has)."""
    warnings.warn(
        "prunekit.methods.available is deprecated; use available_methods",
        DeprecationWarning,
        stacklevel=2,
    )
    return available_methods()


def get_method(name: str) -> type[Pruner]:
    """The pruner class registered under ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    return _METHODS.get(name)
