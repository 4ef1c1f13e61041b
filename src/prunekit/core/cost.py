"""Model cost: parameters and multiply-accumulates (MACs) of one forward pass.

MACs count the multiplications of convolutions and linear layers (``out elements × in_channels/groups
× kernel size`` and ``out elements × in_features``), the convention of the pruning literature's FLOPs
tables (which count one MAC as one FLOP). Other ops are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.core.forward import eval_mode, example_args
from prunekit.core.targets import DEFAULT_TYPES, is_selected_type, is_transposed_linear


def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Number of parameters (only the nonzero ones with ``nonzero=True``)."""
    if nonzero:
        return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Sequence[Any] | Tensor) -> int:
    """MACs of convolutions and linear layers in one forward pass on ``example_inputs`` (batch 1 is
    the usual convention; the count scales with the batch). The model runs in eval mode and is left in
    its original mode."""
    return sum(macs for macs, _ in module_macs(model, example_inputs).values())


@torch.no_grad()
def module_macs(
    model: nn.Module, example_inputs: Sequence[Any] | Tensor
) -> dict[str, tuple[int, int]]:
    """``module name → (MACs, weight elements)`` of every convolution and linear layer called in one
    forward pass (a module called twice adds up). ``MACs / weight elements`` is what each weight
    costs, which structured pruning uses to price a group of weight slices."""
    inputs = example_args(example_inputs)
    out: dict[str, tuple[int, int]] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        weight = getattr(module, "weight", None)
        if weight is None or not isinstance(output, Tensor):
            return
        if isinstance(module, nn.Linear):
            macs = output.numel() * module.in_features
        elif is_transposed_linear(module):  # weight is (in, out)
            macs = output.numel() * weight.shape[0]
        else:  # convolution: weight is (out, in/groups, *kernel)
            macs = output.numel() * math.prod(weight.shape[1:])
        before = out.get(names[module], (0, 0))[0]
        out[names[module]] = (before + macs, weight.numel())

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if is_selected_type(m, DEFAULT_TYPES)
    ]
    try:
        with eval_mode(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return out
