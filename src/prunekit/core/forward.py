"""Running a model on inputs without training it: example inputs as positional arguments (graph
capture, MAC counting, the slim check), eval mode for the duration with every submodule's own
training flag restored afterwards, and counting top-1 hits (evaluation, sharded or not)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
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


@torch.no_grad()
def count_correct(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    start: int = 0,
    stop: int | None = None,
    batch_size: int = 1000,
) -> int:
    """Top-1 hits of ``model`` on ``x[start:stop]`` against ``y`` (labels on the CPU), in batches
    moved to the model's device, in eval mode (:func:`eval_mode`)."""
    stop = len(x) if stop is None else stop
    device = next(model.parameters()).device
    correct = 0
    with eval_mode(model):
        for i in range(start, stop, batch_size):
            j = min(stop, i + batch_size)
            correct += int((model(x[i:j].to(device)).argmax(1).cpu() == y[i:j]).sum())
    return correct
