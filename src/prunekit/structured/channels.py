"""Channel bookkeeping for zero-invariant group discovery (pure data structures, no torch graph).

Every tensor in the captured graph carries a :class:`Flow`: which of its dimensions holds channels
(features) and, for each channel, an integer *channel id*. Ops either create fresh ids (a conv's output
channels), pass ids through (batch norm, ReLU, pooling), join ids (a residual add unions the ids of its
operands elementwise; concatenation concatenates them), or pin ids (an op that mixes channels or is not
understood: those channels can never be removed). Parameters and buffers attach to ids as
:class:`Member` slices. A union class of ids is one zero-invariant group.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple


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


@dataclass
class Flow:
    """Channel ids of one tensor along dimension ``dim`` (non-negative).

    A *head flow* (``heads`` set) lays the ids out over two dims: ``heads`` (the head index) and
    ``dim`` (the position within a head), ``ids[h · D + j]``. A *structural* flow (attention scores,
    one id per head on ``dim``) marks which slices go with a group without claiming that they are zero
    when the group is (see :mod:`prunekit.structured.heads`).
    """

    dim: int
    ids: list[int]
    heads: int | None = None
    structural: bool = False


@dataclass
class ChannelGraph:
    """Union-find over channel ids with members and pin reasons.

    Two kinds of pins: a *hard* pin (``pins``) says the channel can never be removed (it reaches the
    output, an op mixes it, a tensor is shared); a *value* pin (``value_pins``) says only that the
    tensor made at one node (its *site*) is not zero at this channel when the producers are
    (``sigmoid(0) = 1/2``). A value pin is waived (:meth:`waive`) when that tensor's only use is as
    the gate ``g`` of a product ``a · g`` whose other factor ``a`` is zero at the channel: the
    product is zero whatever ``g`` is, and ``g``'s channel is removed with the group.
    """

    parent: list[int] = field(default_factory=list)
    members: dict[int, list[Member]] = field(default_factory=lambda: defaultdict(list))
    pins: dict[int, str] = field(default_factory=dict)
    #: channel id → {site (node name) → reason}
    value_pins: dict[int, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    _owner: dict[tuple[str, int, int], int] = field(default_factory=dict)

    def fresh(self, n: int, pin: str | None = None) -> list[int]:
        """``n`` new channel ids, pinned with reason ``pin`` if given."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        ids = list(range(start, start + n))
        if pin is not None:
            self.pin(ids, pin)
        return ids

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_all(self, a: list[int], b: list[int]) -> None:
        for x, y in zip(a, b, strict=True):
            self.union(x, y)

    def pin(self, ids: list[int], reason: str) -> None:
        for i in ids:
            self.pins.setdefault(i, reason)

    def pin_value(self, ids: list[int], site: str, reason: str) -> None:
        """The tensor made at node ``site`` is not zero at channels ``ids`` when they are zeroed."""
        for i in ids:
            self.value_pins[i].setdefault(site, reason)

    def value_sites(self, ids: list[int]) -> set[str]:
        """The sites of the value pins on ``ids``."""
        return {site for i in ids for site in self.value_pins.get(i, {})}

    def waive(self, ids: list[int], sites: set[str]) -> None:
        """Drop the value pins of ``ids`` placed at ``sites`` (see the class docstring)."""
        for i in ids:
            pins = self.value_pins.get(i)
            if pins:
                for site in sites:
                    pins.pop(site, None)

    def reason(self, cid: int) -> str | None:
        """Why channel ``cid`` is pinned (hard pins first), or ``None``."""
        if cid in self.pins:
            return self.pins[cid]
        pins = self.value_pins.get(cid)
        return next(iter(pins.values())) if pins else None

    def add_member(self, cid: int, member: Member) -> None:
        """Attach ``member`` to channel ``cid``; a slice already attached elsewhere joins the two
        channels (module reuse and tied weights make one channel of two)."""
        key = member[:3]  # (tensor, axis, index)
        owner = self._owner.get(key)
        if owner is not None:
            self.union(owner, cid)
            return
        self._owner[key] = cid
        self.members[cid].append(member)

    def classes(self) -> dict[int, list[int]]:
        """Root id → all ids of its class, for every id."""
        out: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self.parent)):
            out[self.find(i)].append(i)
        return out
