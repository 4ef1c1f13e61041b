"""Compressible layers as matrices: ``y = W x`` views of Linear and convolution layers.

Every layer-wise method works on a weight matrix ``W`` of shape ``(d_out, d_in)`` and its inputs
``X`` of shape ``(n, d_in)``. A convolution with weight ``(C_out, C_in/g, *k)`` and ``g`` groups is
``g`` such matrices; its inputs are the unfolded patches (im2col), one row per output position.

Column layout of a convolution matrix: ``(kernel position, input channel)``, channel fastest, so
``m`` consecutive columns are ``m`` input channels at one kernel position — the grouping of the
N:M pattern (as in :func:`prunekit.core.patterns.nm_mask`) and of group-wise quantization.

A ``transformers`` ``Conv1D`` (GPT-2), whose weight is stored ``(in, out)``, is a Linear layer
with a transposed weight: its matrix is ``weight.T``
(:func:`~prunekit.core.targets.is_transposed_linear`).

Dispatch is on the module type; :func:`register_layer_view` adds new types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.core.targets import is_transposed_linear

__all__ = [
    "LayerView",
    "matrices_to_weight",
    "register_layer_view",
    "view_of",
    "weight_to_matrices",
]


@dataclass
class LayerView:
    """How to read and write one layer as ``groups`` matrices and unfold its inputs.

    Attributes:
        module: the layer.
        groups: number of independent matrices (a grouped convolution's ``groups``; 1 otherwise).
        d_in: columns of each matrix.
        channels: input channels per kernel position (``d_in`` for a Linear layer): N:M groups
            of ``m`` consecutive columns stay within one kernel position when it divides by ``m``.
    """

    module: nn.Module
    groups: int
    d_in: int
    channels: int
    _inputs: Callable[[Tensor], Tensor]
    #: the weight is stored ``(in, out)``: its matrix is ``weight.T``
    transposed: bool = False
    #: inputs are ``(..., d_in)`` feature vectors, one per token (a Linear layer): an attention
    #: mask over the leading ``(batch, sequence)`` dimensions says which rows count
    per_token: bool = False

    @property
    def weight(self) -> Tensor:
        w = self.module.weight
        if not isinstance(w, Tensor):
            raise TypeError(f"{type(self.module).__name__}.weight is not a tensor")
        return w

    def matrices(self, weight: Tensor | None = None) -> Tensor:
        """The weight (or ``weight``, of the same shape) as ``(groups, d_out/groups, d_in)``
        (a copy, in the weight's dtype)."""
        w = (self.weight if weight is None else weight).detach()
        if self.transposed:
            w = w.t()
        # contiguous: a transposed weight's matrix is a strided view; the maths views it flat
        return weight_to_matrices(w, self.groups).clone(memory_format=torch.contiguous_format)

    def write_(self, matrices: Tensor) -> None:
        """Write ``(groups, d_out/groups, d_in)`` matrices back into the layer's weight."""
        w = self.weight
        shape = tuple(w.shape)[::-1] if self.transposed else tuple(w.shape)
        new = matrices_to_weight(matrices.to(device=w.device), shape)
        with torch.no_grad():
            w.copy_(new.t() if self.transposed else new)

    def inputs(self, x: Tensor) -> Tensor:
        """The layer's input batch as ``(groups, n, d_in)``, one row per output position.

        Raises:
            ValueError: ``x`` has a shape the layer does not take (the message gives it).
        """
        return self._inputs(x)


def weight_to_matrices(weight: Tensor, groups: int) -> Tensor:
    """``(groups, d_out/groups, d_in)`` view of a Linear ``(out, in)`` or convolution
    ``(out, in/groups, *k)`` weight, columns ordered (kernel position, channel)."""
    if weight.dim() == 2:
        return weight.unsqueeze(0)
    w = weight.movedim(1, -1).reshape(weight.shape[0], -1)
    return w.reshape(groups, weight.shape[0] // groups, -1)


def matrices_to_weight(matrices: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`weight_to_matrices` for a weight of ``shape``."""
    if len(shape) == 2:
        return matrices.reshape(shape)
    full = matrices.reshape(shape[0], *shape[2:], shape[1])
    return full.movedim(-1, 1)


def _linear_view(module: nn.Module) -> LayerView:
    transposed = is_transposed_linear(module)
    assert isinstance(module, nn.Linear) or transposed
    weight = module.weight
    assert isinstance(weight, Tensor)
    d_in = int(weight.shape[0 if transposed else 1])

    def inputs(x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != d_in:
            raise ValueError(f"takes inputs of {d_in} features, got shape {tuple(x.shape)}")
        return x.reshape(1, -1, d_in)

    return LayerView(module, 1, d_in, d_in, inputs, transposed, per_token=True)


def _conv_view(module: nn.Module) -> LayerView:
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise ValueError(
            f"{type(module).__name__} with padding={module.padding!r}, "
            f"padding_mode={module.padding_mode!r} is not supported for post-training compression; "
            "pass it in ignore=[...]"
        )
    one_d = isinstance(module, nn.Conv1d)
    k = tuple(module.kernel_size)
    kernel = (1, *k) if one_d else k
    stride = (1, *module.stride) if one_d else tuple(module.stride)
    padding = (0, *module.padding) if one_d else tuple(module.padding)
    dilation = (1, *module.dilation) if one_d else tuple(module.dilation)
    g = module.groups
    c_in = module.in_channels
    positions = kernel[0] * kernel[1]

    def inputs(x: Tensor) -> Tensor:
        if x.dim() not in ((2, 3) if one_d else (3, 4)) or x.shape[-2 if one_d else -3] != c_in:
            raise ValueError(
                f"takes {'(N, C, L)' if one_d else '(N, C, H, W)'} inputs with C={c_in}, "
                f"got shape {tuple(x.shape)}"
            )
        if one_d:
            x = x.unsqueeze(-2)
        if x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        # (N, C_in·positions, L) with channel slowest -> (g, N·L, positions·C_in/g), channel fastest
        n, _, length = cols.shape
        cols = cols.reshape(n, g, c_in // g, positions, length)
        return cols.permute(1, 0, 4, 3, 2).reshape(g, n * length, positions * (c_in // g))

    return LayerView(module, g, positions * (c_in // g), c_in // g, inputs)


_VIEWS: dict[type[nn.Module], Callable[[nn.Module], LayerView]] = {
    nn.Linear: _linear_view,
    nn.Conv1d: _conv_view,
    nn.Conv2d: _conv_view,
}


def register_layer_view(kind: type[nn.Module], factory: Callable[[nn.Module], LayerView]) -> None:
    """Teach post-training compression a new layer type (the most specific registered base wins)."""
    _VIEWS[kind] = factory


def view_of(module: nn.Module, name: str = "") -> LayerView:
    """The matrix view of ``module``.

    Raises:
        TypeError: the module type has no registered view (the message lists the supported ones).
    """
    if is_transposed_linear(module):
        return _linear_view(module)
    for kind in type(module).__mro__:
        factory = _VIEWS.get(kind)
        if factory is not None:
            return factory(module)
    supported = ", ".join(sorted([*(t.__name__ for t in _VIEWS), "transformers' Conv1D"]))
    raise TypeError(
        f"{name or type(module).__name__}: post-training compression supports {supported}; "
        f"{type(module).__name__} is not one of them (pass it in ignore=[...])"
    )
