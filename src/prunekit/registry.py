"""One registry helper: the same verbs for every kind of thing prunekit looks up by name.

Each part keeps one :class:`Registry` (sparse-training methods, post-training methods, structured
optimizers, gradient compression methods) and exposes it with the same verbs, timm-style:
``register_*`` (a decorator), ``available_*`` (sorted names) and ``get_*`` (the entry, or a
:class:`~prunekit.config.ConfigError` naming the unknown name and listing the known ones).
:func:`prunekit.available` lists every kind at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from prunekit.config import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names → entries of one kind (``kind`` names it in messages, e.g. ``"method"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; registering the same entry again is a no-op.

        Raises:
            ConfigError: ``name`` is not a non-empty string, or is taken by another entry.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        self._check_free(name, entry)
        self._entries[name] = entry
        return entry

    def decorator(self, name: str, prepare: Callable[[T], None] | None = None) -> Callable[[T], T]:
        """A decorator registering what it decorates under ``name`` (after ``prepare(entry)``,
        e.g. setting ``cls.name``)."""

        def register(entry: T) -> T:
            self._check_free(name, entry)
            if prepare is not None:
                prepare(entry)
            return self.add(name, entry)

        return register

    def _check_free(self, name: str, entry: T) -> None:
        """Refuse ``name`` if another entry holds it (before a decorator prepares ``entry``)."""
        old = self._entries.get(name)
        if old is not None and old is not entry and old != entry:
            raise ConfigError(f"{self.kind} {name!r} is already registered ({_label(old)})")

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def entries(self) -> list[T]:
        """The registered entries, in the order of their names (for dispatch on a property of
        the entry, e.g. its config class)."""
        return [self._entries[n] for n in self.names()]

    def get(self, name: str) -> T:
        """The entry registered under ``name``.

        Raises:
            ConfigError: unknown name (the message lists the registered ones).
        """
        entry = self._entries.get(name) if isinstance(name, str) else None
        if entry is None:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def _label(entry: object) -> str:
    return getattr(entry, "__name__", None) or type(entry).__name__
