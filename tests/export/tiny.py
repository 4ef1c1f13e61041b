"""Compressed copies of the tiny Hugging Face decoder LMs (tests/hf_models.py), for the export
tests."""

import functools

from torch import nn

import prunekit
from tests.hf_models import gpt2, llama, tokens


@functools.cache
def _compressed(build: str, method: str, items: tuple) -> tuple[nn.Module, object]:
    model = {"llama": llama, "gpt2": gpt2}[build]()
    report = prunekit.compress(model, tokens(), method, **dict(items))
    return model, report


def compressed(build: str, method: str, **config) -> tuple[nn.Module, object]:
    """``build()`` compressed with ``prunekit.compress(method, **config)``, computed once per
    session (the tests never change the model: saving must not)."""
    return _compressed(build, method, tuple(sorted(config.items())))
