"""Channel bookkeeping for zero-invariant group discovery (pure data structures, no torch graph).

Every tensor in the captured graph carries a :class:`Flow`: which of its dimensions holds channels
(features) and, for each channel, an integer *channel id*. Ops either create fresh ids (a conv's output
channels), pass ids through (batch norm, ReLU, pooling), join ids (a residual add unions the ids of its
operands elementwise; concatenation concatenates them), or pin ids (an op that mixes channels or is not
understood: those channels can never be removed). Parameters and buffers attach to ids as
:class:`Member` slices. A connected class of ids is one zero-invariant group.

Ids are numpy arrays and every operation works on a whole flow at once: a rule costs the same
whatever the width of the layer, and the classes are the connected components of all recorded joins,
found in one vectorised pass at the end (:func:`connected_components`). A zoo model has 10⁵–10⁶
channel ids; per-id Python work made discovery 10–30× slower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

Ids = npt.NDArray[np.int64]
#: Member roles, coded in the order ``sorted`` puts their names in.
ROLES = ("aux", "in", "out")
_ROLE_CODE = {r: i for i, r in enumerate(ROLES)}


class Member(NamedTuple):
    """One slice of one parameter or buffer that belongs to a channel.

    ``role`` is ``"out"`` for slices that *produce* the channel (zeroing all of them makes the
    channel exactly zero), ``"in"`` for slices that consume it (removed with it) and ``"aux"`` for
    per-channel state that is removed with it but does not matter for zero-invariance (batch-norm
    running statistics).
    """

    tensor: str
    axis: int
    index: int  # type: ignore[assignment]  # a field named like tuple.index (shadows it)
    role: str


def as_ids(ids: Ids | Sequence[int]) -> Ids:
    """``ids`` as a read-only one-dimensional int64 array (shared, never copied when it is one)."""
    out = np.asarray(ids, dtype=np.int64).reshape(-1)
    if out.flags.writeable:
        out.flags.writeable = False
    return out


@dataclass
class Flow:
    """Channel ids of one tensor along dimension ``dim`` (non-negative).

    A *head flow* (``heads`` set) lays the ids out over two dims: ``heads`` (the head index) and
    ``dim`` (the position within a head), ``ids[h · D + j]``. A *structural* flow (attention scores,
    one id per head on ``dim``) marks which slices go with a group without claiming that they are zero
    when the group is (see :mod:`prunekit.structured.heads`).
    """

    dim: int
    ids: Ids
    heads: int | None = None
    structural: bool = False

    def __post_init__(self) -> None:
        self.ids = as_ids(self.ids)


def connected_components(n: int, a: Ids, b: Ids) -> Ids:
    """Label of each of ``n`` nodes under the undirected edges ``a[i] — b[i]``: the smallest node
    of its component.

    Hooking and pointer jumping (Shiloach–Vishkin style), vectorised: every round points each
    edge's larger root at the smaller one, then shortcuts every node to its root. Labels only ever
    decrease within a component, and the loop ends when both ends of every edge share a root, so
    the root is the component's minimum.
    """
    parent = np.arange(n, dtype=np.int64)
    while len(a):
        pa, pb = parent[a], parent[b]
        live = pa != pb
        if not live.any():
            break
        a, b, pa, pb = a[live], b[live], pa[live], pb[live]
        np.minimum.at(parent, np.maximum(pa, pb), np.minimum(pa, pb))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


@dataclass
class MemberTable:
    """Every member slice, one row each: ``names[tensor[r]]`` sliced at ``index[r]`` along
    ``axis[r]``, belonging to channel ``ids[r]`` with role ``ROLES[role[r]]``."""

    names: list[str]
    ids: Ids
    tensor: Ids
    axis: Ids
    index: Ids
    role: Ids


class ChannelGraph:
    """Channel ids with their joins, members and pin reasons.

    Two kinds of pins: a *hard* pin (:meth:`pin`) says the channel can never be removed (it reaches
    the output, an op mixes it, a tensor is shared); a *value* pin (:meth:`pin_value`) says only
    that the tensor made at one node (its *site*) is not zero at this channel when the producers are
    (``sigmoid(0) = 1/2``). A value pin is waived (:meth:`waive`) when that tensor's only use is as
    the gate ``g`` of a product ``a · g`` whose other factor ``a`` is zero at the channel: the
    product is zero whatever ``g`` is, and ``g``'s channel is removed with the group.

    Joins are recorded and resolved together (:meth:`labels`); hard pins and members are kept in the
    order they were made, the first reason given for an id being the one reported.
    """

    def __init__(self) -> None:
        self.size = 0
        self._edges: list[tuple[Ids, Ids]] = []
        self._pins: list[tuple[Ids, str]] = []
        #: site (node name) → (sorted channel ids still pinned there, reason)
        self._value: dict[str, tuple[Ids, str]] = {}
        #: (tensor, axis, role code, slice indices, channel ids), in the order attached
        self._rows: list[tuple[str, int, int, Ids, Ids]] = []
        #: (tensor, axis) → channel id owning each slice (−1: none yet)
        self._owner: dict[tuple[str, int], npt.NDArray[np.int64]] = {}
        self._labels: Ids | None = None

    def fresh(self, n: int, pin: str | None = None) -> Ids:
        """``n`` new channel ids, pinned with reason ``pin`` if given."""
        ids = as_ids(np.arange(self.size, self.size + n, dtype=np.int64))
        self.size += n
        self._labels = None
        if pin is not None:
            self.pin(ids, pin)
        return ids

    def union_all(self, a: Ids | Sequence[int], b: Ids | Sequence[int]) -> None:
        """Join ``a[i]`` with ``b[i]`` for every ``i``."""
        a, b = as_ids(a), as_ids(b)
        if len(a) != len(b):
            raise ValueError(f"union_all of {len(a)} and {len(b)} ids")
        if len(a):
            self._edges.append((a, b))
            self._labels = None

    def labels(self) -> Ids:
        """Each id's class: the smallest id joined with it."""
        if self._labels is None:
            if self._edges:
                a = np.concatenate([e[0] for e in self._edges])
                b = np.concatenate([e[1] for e in self._edges])
                self._edges = [(a, b)]
            else:
                a = b = np.zeros(0, dtype=np.int64)
            self._labels = connected_components(self.size, a, b)
        return self._labels

    def pin(self, ids: Ids | Sequence[int], reason: str) -> None:
        ids = as_ids(ids)
        if len(ids):
            self._pins.append((ids, reason))

    def pin_value(self, ids: Ids | Sequence[int], site: str, reason: str) -> None:
        """The tensor made at node ``site`` is not zero at channels ``ids`` when they are zeroed."""
        ids = np.unique(as_ids(ids))
        if site in self._value:
            old, first = self._value[site]
            self._value[site] = (np.union1d(old, ids), first)
        elif len(ids):
            self._value[site] = (ids, reason)

    def value_sites(self, ids: Ids | Sequence[int]) -> set[str]:
        """The sites of the value pins on ``ids``."""
        ids = as_ids(ids)
        if not len(ids) or not self._value:
            return set()
        lo, hi = int(ids.min()), int(ids.max())
        return {
            site
            for site, (pinned, _) in self._value.items()
            if len(pinned) and pinned[0] <= hi and pinned[-1] >= lo and _meets(pinned, ids)
        }

    def waive(self, ids: Ids | Sequence[int], sites: set[str]) -> None:
        """Drop the value pins of ``ids`` placed at ``sites`` (see the class docstring)."""
        ids = as_ids(ids)
        for site in sites:
            if site in self._value:
                pinned, reason = self._value[site]
                self._value[site] = (pinned[~_isin_sorted(np.sort(ids), pinned)], reason)

    def attach(
        self, ids: Ids | Sequence[int], tensor: str, axis: int, role: str, index: Ids | None = None
    ) -> None:
        """Attach slice ``index[i]`` (default ``i``) of ``tensor`` along ``axis`` to channel
        ``ids[i]``. A slice already attached — earlier, or twice in this call — joins the two
        channels instead (module reuse and tied weights make one channel of two)."""
        ids = as_ids(ids)
        index = np.arange(len(ids), dtype=np.int64) if index is None else as_ids(index)
        if len(ids) != len(index):
            raise ValueError(f"attach: {len(ids)} ids for {len(index)} slices of {tensor}")
        if not len(ids):
            return
        code, key = _ROLE_CODE[role], (tensor, axis)
        owner = self._owner.get(key)
        need = int(index.max()) + 1
        if owner is None and need == len(index) and np.array_equal(index, np.arange(need)):
            # the common case, a whole tensor attached once: every slice is new
            self._owner[key] = np.array(ids)
            self._rows.append((tensor, axis, code, index, ids))
            return
        if owner is None:
            owner = np.full(need, -1, dtype=np.int64)
        elif len(owner) < need:
            owner = np.concatenate([owner, np.full(need - len(owner), -1, dtype=np.int64)])
        self._owner[key] = owner
        slots, first, where = np.unique(index, return_index=True, return_inverse=True)
        held = owner[slots]
        # each slice goes with its earlier owner, or else with the first of this call's ids for it
        keeper = np.where(held >= 0, held, ids[first])[where]
        joined = ids != keeper
        if joined.any():
            self.union_all(ids[joined], keeper[joined])
        new = held < 0
        owner[slots[new]] = ids[first[new]]
        self._rows.append((tensor, axis, code, as_ids(slots[new]), as_ids(ids[first[new]])))

    def first_pins(self) -> tuple[Ids, Ids, list[str]]:
        """``(hard, value, reasons)``: per id, the index in ``reasons`` of its first hard pin and of
        its first value pin still in place (−1: none)."""
        reasons: list[str] = []
        hard = np.full(self.size, -1, dtype=np.int64)
        for ids, reason in self._pins:
            free = ids[hard[ids] < 0]
            if len(free):
                hard[free] = len(reasons)
                reasons.append(reason)
        value = np.full(self.size, -1, dtype=np.int64)
        for ids, reason in self._value.values():
            free = ids[value[ids] < 0]
            if len(free):
                value[free] = len(reasons)
                reasons.append(reason)
        return hard, value, reasons

    def members(self) -> MemberTable:
        """All members, one row each, in the order attached."""
        names: dict[str, int] = {}
        sizes = [len(r[4]) for r in self._rows]

        def column(values: list[int]) -> Ids:
            return np.repeat(np.array(values, dtype=np.int64), sizes)

        tensor = column([names.setdefault(r[0], len(names)) for r in self._rows])
        axis, role = column([r[1] for r in self._rows]), column([r[2] for r in self._rows])
        index, ids = (
            np.concatenate([r[k] for r in self._rows]) if self._rows else np.zeros(0, np.int64)
            for k in (3, 4)
        )
        return MemberTable(list(names), ids, tensor, axis, index, role)


def _isin_sorted(sorted_ids: Ids, ids: Ids) -> npt.NDArray[np.bool_]:
    """For each of ``ids``, whether it is in ``sorted_ids`` (sorted)."""
    if not len(sorted_ids):
        return np.zeros(len(ids), dtype=bool)
    at = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
    return sorted_ids[at] == ids


def _meets(sorted_ids: Ids, ids: Ids) -> bool:
    """Whether any of ``ids`` is in ``sorted_ids`` (sorted)."""
    return bool(_isin_sorted(sorted_ids, ids).any())
