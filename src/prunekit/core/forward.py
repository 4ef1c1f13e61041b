"""Running a model once on example inputs, as graph capture, MAC counting and the slim check do:
the inputs as positional arguments, and eval mode for the duration with every submodule's own
training flag restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn


def example_args(example_inputs: Sequence[Any] | Tensor) -> tuple[Any, ...]:
    """The positional arguments of ``model(*args)``: a tensor is one argument, a list or tuple is
    the arguments in order."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the ``with`` block; restore every submodule's training flag
    on exit, even on an exception (``model.train(flag)`` would set one flag for all of them and
    lose a frozen batch-norm layer's eval mode inside a training model)."""
    modes = {m: m.training for model in models for m in model.modules()}
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
