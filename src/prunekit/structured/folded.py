"""Layers whose channels were all removed, folded into what they still compute.

When every output channel of a convolution is removed, its output is an empty tensor; when every
*input* channel is removed, the convolution sees only zeros and its output is its bias at every
position (zero padding, like any padding of zeros, adds nothing). Either way the weights are gone and
no convolution runs: :class:`FoldedConv` returns that tensor. A residual branch whose inner channels
are all zero thus shrinks to ``shortcut(x) + constant`` — depth pruning from the same zero-invariant
groups — and a batch norm left with no channels becomes ``nn.Identity``.

By default the constant has size 1 along every spatial axis, ``(N, C, 1, 1)``: a batch norm maps it
per channel (in training mode too: a constant has zero variance at any size) and the residual add
broadcasts it, so a removed branch costs no full-size pass at all. Where the model's code needs the
full shape (a concatenation, a reshape) the slim model's output check fails and
:func:`~prunekit.structured.slim.slim` sets ``broadcast = False``: the full ``(N, C, H', W')``.

PyTorch cannot run a ``Conv2d`` or a ``BatchNorm2d`` with zero channels, hence the replacements;
:func:`~prunekit.structured.slim.slim` checks the output and falls back to keeping one zero channel
where a model's own code cannot handle an empty tensor (a ``view`` with a computed size, say).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx
from torch import Tensor, fx, nn

from prunekit.structured.rule_context import RuleContext, Value, fresh_flow


def _conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def folded_conv(
    x: Tensor,
    bias: Tensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    broadcast: bool = False,
) -> Tensor:
    """What a convolution with no input or no output channels computes: ``bias`` (one entry per
    output channel, zeros for a conv without bias) at every position (see :class:`FoldedConv`).

    A leaf for ``torch.fx.symbolic_trace`` (``torch.fx.wrap``): it reads ``x``'s shape.
    """
    spatial = list(x.shape[2:])
    if broadcast:
        out = [1] * len(spatial)
    elif padding == "same":
        out = spatial
    else:
        pads = [0] * len(spatial) if isinstance(padding, str) else list(padding)
        out = [
            _conv_out_size(n, k, s, p, d)
            for n, k, s, p, d in zip(spatial, kernel_size, stride, pads, dilation, strict=True)
        ]
    channels = bias.shape[0]
    return bias.view([1, channels] + [1] * len(out)).expand([x.shape[0], channels, *out])


torch.fx.wrap("folded_conv")


class FoldedConv(nn.Module):
    """A convolution with no input or no output channels left.

    Output: ``bias`` (zeros for a conv without bias) of shape ``(N, out_channels, 1, …)`` with
    ``broadcast``, else expanded to ``(N, out_channels, *spatial)``, where ``spatial`` follows the
    convolution's own size formula ``⌊(L + 2p − d(k − 1) − 1)/s⌋ + 1``; with ``out_channels == 0``
    it is an empty tensor. The constant is a buffer (``bias``) so state dicts round-trip, and
    ``out_channels`` is its length.
    """

    bias: Tensor

    def __init__(
        self,
        bias: Tensor,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int] | str,
        dilation: Sequence[int],
        broadcast: bool = True,
    ):
        super().__init__()
        self.broadcast = broadcast
        self.kernel_size, self.stride, self.dilation = (
            tuple(kernel_size),
            tuple(stride),
            tuple(dilation),
        )
        self.padding: tuple[int, ...] | str = (
            padding if isinstance(padding, str) else tuple(padding)
        )
        self.register_buffer("bias", bias.detach().clone())

    @property
    def out_channels(self) -> int:
        return self.bias.shape[0]

    @classmethod
    def from_conv(cls, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> FoldedConv:
        """The folded form of ``conv`` (whose weight has a zero-sized axis)."""
        return cls(
            conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.weight.shape[0]),
            conv.kernel_size,
            conv.stride,
            conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            conv.dilation,
        )

    def forward(self, x: Tensor) -> Tensor:
        return folded_conv(
            x, self.bias, self.kernel_size, self.stride, self.padding, self.dilation,
            self.broadcast,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, broadcast={self.broadcast}"
        )


def folded_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    """Group discovery through a :class:`FoldedConv`: its output channels are new channels whose
    producer is the constant (``bias``); its input channels reach nothing (the output does not
    depend on them), so a slim model can be captured and pruned again."""
    out = fresh_flow(ctx, node, None, dim=1)
    if out is not None:
        name = node.target if isinstance(node.target, str) else ""
        ctx.attach(out.ids, ctx.tensor_name(name, "bias", m), 0, "out")
    return out
