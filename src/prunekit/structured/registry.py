"""Registry of structured (Only-Train-Once) optimizers: name → optimizer class and its config.

Tests enumerate :func:`available_structured`, so an optimizer is covered by the contract tests
(``tests/structured/test_contract.py``) the moment it is registered. A recipe's ``structured:``
section is ``{optimizer: <name>, <fields of that optimizer's config>}``
(:func:`config_from_section`); :func:`build_structured` turns a config into the optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from torch import Tensor, nn

from prunekit.config import Config, ConfigError, check_keys, from_dict
from prunekit.registry import Registry
from prunekit.structured.base import GroupSparseOptimizer
from prunekit.structured.groups import Group

_OPTIMIZERS: Registry[type[GroupSparseOptimizer]] = Registry("structured optimizer")

#: the optimizer a ``structured:`` section without an ``optimizer`` key uses
DEFAULT_STRUCTURED = "hesso"

OptimizerClass = TypeVar("OptimizerClass", bound=type[GroupSparseOptimizer])


def register_structured(name: str) -> Callable[[OptimizerClass], OptimizerClass]:
    """Class decorator registering a group-sparsity optimizer under ``name`` (also ``cls.name``).

    The class must set ``config_class`` and implement ``from_config``.
    """

    def prepare(cls: OptimizerClass) -> None:
        config_class = getattr(cls, "config_class", None)
        if not (isinstance(config_class, type) and issubclass(config_class, Config)):
            raise TypeError(
                f"{cls.__name__} needs a config_class derived from prunekit.config.Config to be "
                "registered"
            )
        cls.name = name

    return _OPTIMIZERS.decorator(name, prepare)  # type: ignore[return-value]


def available_structured() -> list[str]:
    """Names of the registered structured optimizers, sorted."""
    return _OPTIMIZERS.names()


def get_structured(name: str) -> type[GroupSparseOptimizer]:
    """The optimizer class registered under ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    return _OPTIMIZERS.get(name)


def config_keys(name: str) -> list[str]:
    """The keys a ``structured:`` section for optimizer ``name`` may hold (``optimizer`` included)."""
    cls = get_structured(name)
    return sorted(["optimizer", *(f.name for f in dataclasses.fields(cls.config_class))])


def config_from_section(section: Mapping[str, Any], where: str = "structured") -> Any:
    """The config of a recipe's ``structured:`` section ``{optimizer: name, **fields}``.

    The fields are checked against that optimizer's config class alone: a key it does not have is
    an error naming the valid ones (``periods`` is a HESSO key, not a DHSPG one). Without an
    ``optimizer`` key the section is for :data:`DEFAULT_STRUCTURED`.
    """
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(section).__name__}")
    name = section.get("optimizer", DEFAULT_STRUCTURED)
    if not isinstance(name, str):
        raise ConfigError(f"{where}.optimizer must be a string, got {name!r}")
    try:
        cls = get_structured(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}.optimizer: {exc}") from None
    label = f"{where} (optimizer {name})"
    check_keys(section, config_keys(name), label)
    fields = {k: v for k, v in section.items() if k != "optimizer"}
    try:
        return from_dict(cls.config_class, fields, where=where)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(where) else f"{label}: {message}") from None


def build_structured(
    config: Any,
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    groups: Sequence[Group],
    *,
    total_steps: int,
    model: nn.Module | None = None,
    example: Any = None,
    **update: Any,
) -> GroupSparseOptimizer:
    """The registered optimizer whose config class is ``type(config)``, built from ``config``.

    Args:
        config: an optimizer's config (e.g. :class:`~prunekit.structured.hesso.HESSOConfig`).
        params: the parameters the optimizer updates (or parameter groups).
        groups: the zero-invariant groups (:func:`~prunekit.structured.groups.find_groups`).
        total_steps: the length of training in optimizer steps (the config's fractions of
            training become steps).
        model, example: the model and an example input, needed by configs that price groups by
            their MACs (HESSO's ``flops_removed``).
        update: the update rule: ``lr``, ``momentum``, ``weight_decay``, ``nesterov``,
            ``variant`` (a recipe's ``optimizer:`` section).
    """
    for cls in _OPTIMIZERS.entries():
        if type(config) is cls.config_class:
            return cls.from_config(
                params,
                groups,
                config,
                total_steps=total_steps,
                model=model,
                example=example,
                **update,
            )
    raise TypeError(
        f"{type(config).__name__} is not the config of a registered structured optimizer "
        f"({', '.join(available_structured())})"
    )
