"""prunekit — sparse and slim neural networks for PyTorch.

Add three lines to a training loop and get a sparse model out of one run::

    pruner = prunekit.sparsify(model, optimizer, method="dpf", sparsity=0.95, total_steps=n)
    ...  optimizer.step(); pruner.step()
    pruner.finalize()
    prunekit.sparsity_report(model)["global_sparsity"]

or compress a trained model after the fact, with no retraining::

    report = prunekit.compress(model, calibration_batches, method="sparsegpt", sparsity=0.5)
"""

import importlib
from typing import Any

from prunekit import methods, optim, posttrain
from prunekit.api import sparsify
from prunekit.config import ConfigError
from prunekit.core import MaskMode, NoPrunableLayersError, select_targets, sparsity_report
from prunekit.methods import Pruner
from prunekit.posttrain import CompressionReport, compress
from prunekit.serialization import CheckpointError, load_sparse, save_sparse

__version__ = "0.1.0"  # the one place: pyproject.toml reads it

#: subpackages imported on first use (``prunekit.structured.find_groups(...)``), so that
#: ``import prunekit`` stays light
_LAZY = ("core", "data", "distributed", "export", "models", "schedules", "structured")


def available() -> dict[str, list[str]]:
    """Every registered name, by kind of part::

        {"methods": [...],      # sparse training: prunekit.sparsify(method=...)
         "posttrain": [...],    # post-training: prunekit.compress(method=...)
         "structured": [...],   # group-sparsity optimizers: structured: {optimizer: ...}
         "distributed": [...]}  # gradient compression: compress_gradients(ddp, method)

    Each list is that part's ``available*()`` (sorted); the parts load on first call.
    """
    from prunekit.distributed import available_gradient_methods
    from prunekit.methods import available_methods
    from prunekit.posttrain import available_compressors
    from prunekit.structured.registry import available_structured

    return {
        "methods": available_methods(),
        "posttrain": available_compressors(),
        "structured": available_structured(),
        "distributed": available_gradient_methods(),
    }


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"prunekit.{name}")
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CheckpointError",
    "CompressionReport",
    "ConfigError",
    "MaskMode",
    "NoPrunableLayersError",
    "Pruner",
    "__version__",
    "available",
    "compress",
    "load_sparse",
    "methods",
    "optim",
    "posttrain",
    "save_sparse",
    "select_targets",
    "sparsify",
    "sparsity_report",
]
