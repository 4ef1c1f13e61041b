"""Deprecated module name: the post-training pipeline is :mod:`prunekit.posttrain.pipeline` (this
name answers for one release).

Importing this module rebinds the attribute ``prunekit.posttrain.compress`` to it, so the module
is callable and forwards to :func:`prunekit.posttrain.pipeline.compress`: both
``prunekit.posttrain.compress(model, ...)`` and ``from prunekit.posttrain.compress import
compress`` keep working.
"""

import sys
import types
import warnings
from typing import Any

from prunekit.posttrain import pipeline
from prunekit.posttrain.pipeline import compress

__all__ = ["compress"]

warnings.warn(
    "prunekit.posttrain.compress (the module) is deprecated; use prunekit.compress or "
    "prunekit.posttrain.pipeline",
    DeprecationWarning,
    stacklevel=2,
)


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return compress(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(pipeline, name)


sys.modules[__name__].__class__ = _CallableModule
