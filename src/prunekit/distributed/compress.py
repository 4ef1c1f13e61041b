"""Compressed gradient exchange for DDP in one call, and the registry of codecs behind it.

A codec is a name mapped to ``(config dataclass, state class, hook function)``::

    state = compress_gradients(ddp_model, "qsgd", levels=16, bucket_size=512)
    ...train...
    state.bytes_sent, state.bytes_dense, state.compression, state.mode

Built in: ``none`` (DDP's fp32 all-reduce, counted), ``qsgd``, ``natural``, ``topk``. Register
another with :func:`register_codec`; tests enumerate :func:`available_codecs`.

A NaN/±Inf gradient on any rank reaches every rank as NaN and is counted in
``state.skipped_steps`` / ``state.last_step_skipped``; skip ``optimizer.step()`` on such a step
(every rank sees the same). The contract is in :mod:`prunekit.distributed.hooks`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.nn.parallel import DistributedDataParallel

from prunekit.config import ConfigError, from_dict
from prunekit.distributed.hooks import (
    CommState,
    NaturalConfig,
    NaturalState,
    NoneConfig,
    NoneState,
    QSGDConfig,
    QSGDState,
    natural_hook,
    none_hook,
    qsgd_hook,
)
from prunekit.distributed.topk import TopKConfig, TopKState, topk_hook
from prunekit.registry import Registry

__all__ = [
    "CodecEntry",
    "available_codecs",
    "compress_gradients",
    "get_codec",
    "register_codec",
]


@dataclass(frozen=True)
class CodecEntry:
    """A registered compression method."""

    name: str
    config_class: type
    state_class: type[CommState]
    hook: Callable[..., Any]


_CODECS: Registry[CodecEntry] = Registry("gradient compression method")


def register_codec(
    name: str,
    config_class: type,
    state_class: type[CommState],
    hook: Callable[..., Any] | None = None,
) -> Any:
    """Register a gradient compression method: ``name`` → (config, state, hook).

    Used as a decorator on the hook::

        @register_codec("mine", MyConfig, MyState)
        def my_hook(state: MyState, bucket: dist.GradBucket) -> Future[Tensor]: ...

    Registering the same triple again is a no-op. The call form with the hook as a fourth
    argument still registers it but is deprecated (it returns the :class:`CodecEntry`).
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        _CODECS.add(name, CodecEntry(name, config_class, state_class, fn))
        return fn

    if hook is None:
        return register
    warnings.warn(
        "register_codec(name, config, state, hook) is deprecated; use it as a decorator: "
        "@register_codec(name, config, state) on the hook",
        DeprecationWarning,
        stacklevel=2,
    )
    register(hook)
    return _CODECS.get(name)


def available_codecs() -> list[str]:
    """Names of the registered gradient codecs, sorted."""
    return _CODECS.names()


def get_codec(name: str) -> CodecEntry:
    """The codec registered under ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    return _CODECS.get(name)


for _name, _config, _state, _hook in (
    ("none", NoneConfig, NoneState, none_hook),
    ("qsgd", QSGDConfig, QSGDState, qsgd_hook),
    ("natural", NaturalConfig, NaturalState, natural_hook),
    ("topk", TopKConfig, TopKState, topk_hook),
):
    register_codec(_name, _config, _state)(_hook)


def compress_gradients(
    ddp_model: DistributedDataParallel,
    method: str = "qsgd",
    *,
    process_group: Any = None,
    **config: Any,
) -> CommState:
    """Register ``method``'s communication hook on ``ddp_model``; return its state.

    Args:
        ddp_model: a ``DistributedDataParallel`` model without a hook yet.
        method: a name of :func:`available_codecs`.
        process_group: group to average over (``None``: the model's default group).
        **config: the method's config fields (unknown keys raise :class:`ConfigError`).

    Raises:
        ConfigError: an unknown method or config; ``ddp_model`` is not a
            ``DistributedDataParallel``, or already has a communication hook (DDP takes one).
    """
    entry = get_codec(method)
    cfg: Any = from_dict(entry.config_class, config, method)
    _check_model(ddp_model, method)
    state = entry.state_class.from_config(cfg, process_group=process_group)
    if isinstance(state, TopKState):
        state.bind(ddp_model.module)
    try:
        ddp_model.register_comm_hook(state, entry.hook)
    except RuntimeError as exc:  # a hook torch registered for itself (a built-in one)
        if "only be called once" not in str(exc):
            raise
        raise ConfigError(_twice(method)) from None
    return state


def _check_model(ddp_model: Any, method: str) -> None:
    """``ddp_model`` is a DDP model that has no communication hook yet (one-line errors)."""
    if not isinstance(ddp_model, DistributedDataParallel):
        raise ConfigError(
            f"compress_gradients needs a torch.nn.parallel.DistributedDataParallel model, got "
            f"{type(ddp_model).__name__}: wrap it first, "
            f"compress_gradients(DistributedDataParallel(model), {method!r}, ...)"
        )
    if getattr(ddp_model, "_comm_hooks", None):
        raise ConfigError(_twice(method))


def _twice(method: str) -> str:
    return (
        f"this DistributedDataParallel model already has a communication hook; DDP takes one, so "
        f"call compress_gradients once per model (for {method!r}, wrap the module in a new "
        "DistributedDataParallel)"
    )
