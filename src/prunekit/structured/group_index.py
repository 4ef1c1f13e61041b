"""Vectorised operations over zero-invariant groups (one tensor op per parameter, not per group)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from prunekit.structured.groups import Group


class GroupIndex:
    """For every parameter holding producing slices of the given groups: which indices along which
    axis belong to which group. Per-group norms, inner products and scalings then cost one reduction
    or one multiply per parameter.

    Args:
        groups: the groups to manage (usually the prunable ones); buffers in them are ignored.
    """

    def __init__(self, groups: Sequence[Group]):
        if not groups:
            raise ValueError("no groups given: nothing to optimise for group sparsity")
        params: dict[str, Tensor] = {
            name: t
            for g in groups
            for name, t in g.tensors().items()
            if isinstance(t, nn.Parameter)
        }
        self.groups = list(groups)
        self.num_groups = len(self.groups)
        entries: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        for gid, g in enumerate(self.groups):
            for (name, axis), idx in g.slices("out").items():
                if name not in params:  # buffers carry no optimisation state
                    continue
                index, owner = entries.setdefault((name, axis), ([], []))
                index.extend(idx)
                owner.extend([gid] * len(idx))
        self.entries: list[tuple[Tensor, int, Tensor, Tensor]] = []
        for (name, axis), (idx_list, owner_list) in entries.items():
            param = params[name]
            index_t = torch.tensor(idx_list, device=param.device)
            owner_t = torch.tensor(owner_list, device=param.device)
            self.entries.append((param, axis, index_t, owner_t))
        self.sizes = torch.zeros(self.num_groups, device=self.entries[0][0].device)
        for param, axis, _, owner_t in self.entries:
            per_index = param.numel() // param.shape[axis]  # elements in one slice along ``axis``
            self.sizes.index_add_(
                0, owner_t, torch.full_like(owner_t, per_index, dtype=self.sizes.dtype)
            )

    @property
    def params(self) -> list[Tensor]:
        return [e[0] for e in self.entries]

    def _reduce(self, values: Sequence[Tensor]) -> Tensor:
        """Sum ``values`` (one tensor per entry, shaped like its parameter) per group."""
        out = torch.zeros(self.num_groups, device=self.sizes.device)
        for (_, axis, index, owner), v in zip(self.entries, values, strict=True):
            dims = [d for d in range(v.dim()) if d != axis]
            per_index = v.sum(dim=dims) if dims else v
            out.index_add_(0, owner, per_index.index_select(0, index).to(out.dtype))
        return out

    def sq_norms(self, tensors: Sequence[Tensor] | None = None) -> Tensor:
        """``||x_g||²`` per group (of the parameters, or of tensors shaped like them)."""
        ts = [e[0].detach() for e in self.entries] if tensors is None else tensors
        return self._reduce([t.float().pow(2) for t in ts])

    def dots(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        """``<a_g, b_g>`` per group."""
        return self._reduce([x.float() * y.float() for x, y in zip(a, b, strict=True)])

    def grads(self) -> list[Tensor]:
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in self.params]

    def expand(self, factor: Tensor, p: Tensor, axis: int, index: Tensor, owner: Tensor) -> Tensor:
        """A tensor broadcastable to ``p`` holding ``factor[group]`` along ``axis`` (1 elsewhere)."""
        full = torch.ones(p.shape[axis], device=p.device, dtype=p.dtype)
        full[index] = factor[owner].to(p.dtype)
        shape = [1] * p.dim()
        shape[axis] = p.shape[axis]
        return full.view(shape)

    @torch.no_grad()
    def scale_(self, factor: Tensor, tensors: Sequence[Tensor] | None = None) -> None:
        """Multiply group ``g`` of the parameters (or of ``tensors``) by ``factor[g]``."""
        ts = self.params if tensors is None else tensors
        for (p, axis, index, owner), t in zip(self.entries, ts, strict=True):
            t.mul_(self.expand(factor, p, axis, index, owner))

    @torch.no_grad()
    def add_scaled_(
        self, factor: Tensor, source: Sequence[Tensor], target: Sequence[Tensor]
    ) -> None:
        """``target_g += factor[g] · source_g`` for every group."""
        for (p, axis, index, owner), s, t in zip(self.entries, source, target, strict=True):
            f = torch.zeros(p.shape[axis], device=p.device, dtype=p.dtype)
            f[index] = factor[owner].to(p.dtype)
            shape = [1] * p.dim()
            shape[axis] = p.shape[axis]
            t.add_(s * f.view(shape))
