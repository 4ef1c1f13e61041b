"""Deprecated location of the data-parallel helpers: they are :mod:`prunekit.core.ddp` now (the
sparse-training methods need them without the gradient-compression feature). Names read from here
still work for one release, with a warning; ``prunekit.distributed`` keeps exporting them."""

import warnings
from typing import Any

from prunekit.core import ddp as _ddp

__all__ = list(_ddp.__all__)


def __getattr__(name: str) -> Any:
    if name in __all__:
        warnings.warn(
            f"prunekit.distributed.sync.{name} is deprecated; import it from prunekit.core.ddp "
            "(or prunekit.distributed)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_ddp, name)
    raise AttributeError(f"module 'prunekit.distributed.sync' has no attribute {name!r}")
