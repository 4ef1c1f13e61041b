"""Deprecated module name: the registry of gradient compression methods and
:func:`compress_gradients` are in :mod:`prunekit.distributed.registry` (this name answers for one
release)."""

import warnings

from prunekit.distributed.registry import (
    CodecEntry,
    GradientMethod,
    available_codecs,
    available_gradient_methods,
    compress_gradients,
    get_codec,
    get_gradient_method,
    register_codec,
    register_gradient_method,
)

warnings.warn(
    "prunekit.distributed.compress is deprecated; import from prunekit.distributed (or "
    "prunekit.distributed.registry)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "CodecEntry",
    "GradientMethod",
    "available_codecs",
    "available_gradient_methods",
    "compress_gradients",
    "get_codec",
    "get_gradient_method",
    "register_codec",
    "register_gradient_method",
]
