"""Checks of the model that :func:`prunekit.compress` runs before any work, and of the
activations each target layer receives during the walk.

Each failure is one line naming what is wrong (a parameter, a module, a layer) and what to do:
a :class:`~prunekit.config.ConfigError` for a model that cannot be compressed as given, a
:class:`NonFiniteInput` (a :class:`~prunekit.posttrain.hessian.HessianError`) for a layer whose
calibration inputs hold NaN or inf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.config import ConfigError
from prunekit.core.targets import Target
from prunekit.posttrain.hessian import HessianError

__all__ = ["NonFiniteInput", "check_finite_input", "check_model", "check_target_weights"]

#: module namespaces of PyTorch's converted (integer) quantized layers, eager and dynamic
_QUANTIZED_NAMESPACES = (
    "torch.ao.nn.quantized",
    "torch.ao.nn.intrinsic.quantized",
    "torch.nn.quantized",
    "torch.nn.intrinsic.quantized",
)


class NonFiniteInput(HessianError):
    """A target layer received NaN or inf from the calibration forward.

    Attributes:
        layer: the target's parameter name.
        count: non-finite values in the input.
        item: index of the calibration item being run (``None`` when unknown).
    """

    def __init__(self, layer: str, count: int, item: int | None = None, hint: str = "") -> None:
        where = "its input" if item is None else f"its input on calibration item {item}"
        super().__init__(
            f"{layer}: {where} holds {count} non-finite value{'s' if count != 1 else ''} "
            f"(NaN or inf); {hint or 'drop or clean the calibration batches that cause it'}"
        )
        self.layer = layer
        self.count = count
        self.item = item


def check_finite_input(layer: str, x: Tensor) -> None:
    """Raise :class:`NonFiniteInput` when ``x`` (the input of target ``layer``) has NaN or inf."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise NonFiniteInput(layer, int((~torch.isfinite(x)).sum()))


def check_model(model: Any) -> None:
    """Refuse, before any work, a model that cannot be compressed as given.

    Raises:
        ConfigError: ``model`` is not an ``nn.Module``; it is already quantized (a
            ``torch.ao`` quantized layer); a parameter holds NaN or inf.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_not_quantized(model)
    _check_finite_parameters(model)


def _check_not_quantized(model: nn.Module) -> None:
    for name, module in model.named_modules():
        kind = type(module)
        if kind.__module__.startswith(_QUANTIZED_NAMESPACES):
            raise ConfigError(
                f"the model is already quantized: {name or 'the model'} is a quantized "
                f"{kind.__name__} ({kind.__module__}); compress the float model before "
                "quantizing it"
            )


def _describe_parameter(name: str) -> str:
    """``"weight of layer fc1"`` for ``"fc1.weight"``; ``"parameter scale"`` at the top level."""
    module, _, param = name.rpartition(".")
    return f"{param} of layer {module}" if module else f"parameter {name}"


def _check_finite_parameters(model: nn.Module) -> None:
    bad: list[tuple[str, int]] = []
    for name, p in model.named_parameters():
        if p.is_meta or not (p.is_floating_point() or p.is_complex()):
            continue
        finite = torch.isfinite(p.detach())
        if not bool(finite.all()):
            bad.append((name, int((~finite).sum())))
    if not bad:
        return
    name, count = bad[0]
    more = ""
    if len(bad) > 1:
        others = ", ".join(n for n, _ in bad[1:4]) + (" …" if len(bad) > 4 else "")
        more = f" (and {len(bad) - 1} more parameters: {others})"
    raise ConfigError(
        f"{_describe_parameter(name)} has {count} non-finite value{'s' if count != 1 else ''} "
        f"(NaN or inf){more}; the model is broken, not the calibration: load a good checkpoint"
    )


def check_target_weights(targets: Sequence[Target]) -> None:
    """Refuse target weights that are not floating point (an integer-quantized layer that
    subclasses ``nn.Linear``, e.g. an int8 weight).

    Raises:
        ConfigError: naming the first such target and its dtype.
    """
    for t in targets:
        if not t.param.is_floating_point():
            raise ConfigError(
                f"{t.name} has dtype {t.param.dtype}, not floating point: the model looks "
                "already quantized; compress the float model before quantizing it"
            )
