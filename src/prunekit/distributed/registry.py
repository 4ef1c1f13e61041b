"""The registry of gradient compression methods, and compressed gradient exchange for DDP in one
call.

A gradient compression method is a name mapped to its state class (which names its config
dataclass, ``state_class.config_class``) and its DDP communication hook::

    state = compress_gradients(ddp_model, "qsgd", levels=16, bucket_size=512)
    ...train...
    state.bytes_sent, state.bytes_dense, state.compression, state.mode

Built in: ``none`` (DDP's fp32 all-reduce, counted), ``qsgd``, ``natural``, ``topk``. Register
another with :func:`register_gradient_method`; tests enumerate
:func:`available_gradient_methods`. (A *codec*, :class:`~prunekit.distributed.exchange.Codec`, is
the encoder/decoder pair of values a method sends; :mod:`~prunekit.distributed.codecs` holds their
maths.)

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

from prunekit.config import Config, ConfigError
from prunekit.distributed.hooks import (
    NaturalState,
    NoneState,
    QSGDState,
    natural_hook,
    none_hook,
    qsgd_hook,
)
from prunekit.distributed.state import CommState
from prunekit.distributed.topk import TopKState, topk_hook
from prunekit.registry import Registry

__all__ = [
    "GradientMethod",
    "available_gradient_methods",
    "compress_gradients",
    "get_gradient_method",
    "register_gradient_method",
]

Hook = Callable[..., Any]


@dataclass(frozen=True)
class GradientMethod:
    """A registered gradient compression method: its config dataclass, state class and hook."""

    name: str
    config_class: type[Config]
    state_class: type[CommState]
    hook: Hook


_METHODS: Registry[GradientMethod] = Registry("gradient compression method")


def register_gradient_method(name: str, state_class: type[CommState]) -> Callable[[Hook], Hook]:
    """Decorator on a DDP communication hook registering it as gradient compression method
    ``name``, with ``state_class`` (whose ``config_class`` is the method's config)::

        @register_gradient_method("mine", MyState)
        def my_hook(state: MyState, bucket: dist.GradBucket) -> Future[Tensor]: ...

    Registering the same hook again is a no-op; another one under a taken name is a
    :class:`ConfigError`.
    """

    def register(hook: Hook) -> Hook:
        _add(GradientMethod(name, state_class.config_class, state_class, hook))
        return hook

    return register


def _add(entry: GradientMethod) -> None:
    _METHODS.add(entry.name, entry)
    if not entry.state_class.method:
        entry.state_class.method = entry.name
    if not entry.config_class.method_name:
        entry.config_class.method_name = entry.name


def available_gradient_methods() -> list[str]:
    """Names of the registered gradient compression methods, sorted."""
    return _METHODS.names()


def get_gradient_method(name: str) -> GradientMethod:
    """The gradient compression method registered under ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    return _METHODS.get(name)


register_gradient_method("none", NoneState)(none_hook)
register_gradient_method("qsgd", QSGDState)(qsgd_hook)
register_gradient_method("natural", NaturalState)(natural_hook)
register_gradient_method("topk", TopKState)(topk_hook)


# --- the names before one release: deprecated ----------------------------------------------------


def register_codec(
    name: str, config_class: type[Config], state_class: type[CommState], hook: Hook | None = None
) -> Any:
    """Deprecated: :func:`register_gradient_method` (``config_class`` is the state's)."""
    warnings.warn(
        "register_codec is deprecated; use @register_gradient_method(name, state_class) on the "
        "hook (the config class is state_class.config_class)",
        DeprecationWarning,
        stacklevel=2,
    )

    def register(fn: Hook) -> Hook:
        _add(GradientMethod(name, config_class, state_class, fn))
        return fn

    if hook is None:
        return register
    register(hook)
    return _METHODS.get(name)


def available_codecs() -> list[str]:
    """Deprecated: :func:`available_gradient_methods`."""
    warnings.warn(
        "available_codecs is deprecated; use available_gradient_methods",
        DeprecationWarning,
        stacklevel=2,
    )
    return available_gradient_methods()


def get_codec(name: str) -> GradientMethod:
    """Deprecated: :func:`get_gradient_method`."""
    warnings.warn(
        "get_codec is deprecated; use get_gradient_method", DeprecationWarning, stacklevel=2
    )
    return get_gradient_method(name)


#: deprecated name of :class:`GradientMethod`
CodecEntry = GradientMethod


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
        method: a name of :func:`available_gradient_methods`.
        process_group: group to average over (``None``: the model's default group).
        **config: the method's config fields (unknown keys raise :class:`ConfigError`).

    Raises:
        ConfigError: an unknown method or config; ``ddp_model`` is not a
            ``DistributedDataParallel``, or already has a communication hook (DDP takes one).
    """
    entry = get_gradient_method(method)
    cfg = entry.config_class.from_dict(config)
    _check_model(ddp_model, method)
    state = entry.state_class.from_config(cfg, process_group=process_group)
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
