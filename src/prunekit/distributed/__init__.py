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
from prunekit.distributed.compress import (
    CodecEntry,
    available_codecs,
    compress_gradients,
    get_codec,
    register_codec,
)
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
from prunekit.distributed.launch import WorkerError, free_port, run_workers
from prunekit.distributed.topk import TopKConfig, TopKState, topk_hook

__all__ = [
    "CodecEntry",
    "CommState",
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
    "available_codecs",
    "broadcast_module_",
    "broadcast_tensors_",
    "compress_gradients",
    "differing_names",
    "free_port",
    "get_codec",
    "is_distributed",
    "natural_hook",
    "none_hook",
    "pack_bits",
    "qsgd_hook",
    "register_codec",
    "replicas_identical",
    "run_workers",
    "topk_hook",
    "unpack_bits",
    "unwrap",
]
