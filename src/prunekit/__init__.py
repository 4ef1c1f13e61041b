"""prunekit — sparse and slim neural networks for PyTorch.

Add three lines to a training loop and get a sparse model out of one run::

    pruner = prunekit.sparsify(model, optimizer, method="dpf", sparsity=0.95, total_steps=n)
    ...  optimizer.step(); pruner.step()
    pruner.finalize()
    prunekit.sparsity_report(model)["global_sparsity"]
"""

from prunekit import methods
from prunekit.api import sparsify
from prunekit.config import ConfigError
from prunekit.core import MaskMode, NoPrunableLayersError, select_targets, sparsity_report
from prunekit.methods import Pruner, available
from prunekit.training.checkpoint import load_sparse, save_sparse

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "MaskMode",
    "NoPrunableLayersError",
    "Pruner",
    "__version__",
    "available",
    "load_sparse",
    "methods",
    "save_sparse",
    "select_targets",
    "sparsify",
    "sparsity_report",
]
