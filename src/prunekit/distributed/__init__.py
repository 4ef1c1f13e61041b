"""Data-parallel training: compressed gradient exchange (DDP communication hooks) and helpers."""

from prunekit.core.ddp import (
    all_reduce_batchnorm_,
    all_reduce_mean_,
    broadcast_module_,
    broadcast_tensors_,
    differing_names,
    is_distributed,
    replicas_identical,
    unwrap,
)
from prunekit.distributed.codecs import NonFiniteGradientError, pack_bits, unpack_bits
from prunekit.distributed.hooks import (
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
from prunekit.distributed.launch import WorkerError, free_port, run_workers
from prunekit.distributed.registry import (
    GradientMethod,
    available_gradient_methods,
    compress_gradients,
    get_gradient_method,
    register_gradient_method,
)
from prunekit.distributed.state import CommState
from prunekit.distributed.topk import TopKConfig, TopKState, topk_hook

__all__ = [
    "CommState",
    "GradientMethod",
    "NaturalConfig",
    "NaturalState",
    "NonFiniteGradientError",
    "NoneConfig",
    "NoneState",
    "QSGDConfig",
    "QSGDState",
    "TopKConfig",
    "TopKState",
    "WorkerError",
    "all_reduce_batchnorm_",
    "all_reduce_mean_",
    "available_gradient_methods",
    "broadcast_module_",
    "broadcast_tensors_",
    "compress_gradients",
    "differing_names",
    "free_port",
    "get_gradient_method",
    "is_distributed",
    "natural_hook",
    "none_hook",
    "pack_bits",
    "qsgd_hook",
    "register_gradient_method",
    "replicas_identical",
    "run_workers",
    "topk_hook",
    "unpack_bits",
    "unwrap",
]


_DEPRECATED = {
    "CodecEntry": "GradientMethod",
    "available_codecs": "available_gradient_methods",
    "get_codec": "get_gradient_method",
    "register_codec": "register_gradient_method",
}


def __getattr__(name: str) -> object:
    """The names before one release (each warns when called or, for ``CodecEntry``, here)."""
    if name in _DEPRECATED:
        from prunekit.distributed import registry

        if name == "CodecEntry":
            import warnings

            warnings.warn(
                "CodecEntry is deprecated; use GradientMethod", DeprecationWarning, stacklevel=2
            )
        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
