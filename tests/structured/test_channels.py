"""The vectorised channel graph: components, member ownership, pins (against plain-Python
references written here)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from prunekit.structured.channels import ChannelGraph, Flow, connected_components


def reference_components(n: int, edges: list[tuple[int, int]]) -> list[int]:
    """Each node's smallest connected node, by breadth-first search."""
    adjacent: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        adjacent[a].append(b)
        adjacent[b].append(a)
    label = [-1] * n
    for start in range(n):
        if label[start] >= 0:
            continue
        seen, frontier = [start], [start]
        label[start] = start
        while frontier:
            nxt = []
            for u in frontier:
                for v in adjacent[u]:
                    if label[v] < 0:
                        label[v] = start
                        seen.append(v)
                        nxt.append(v)
            frontier = nxt
    return label


@pytest.mark.parametrize("seed", range(6))
def test_components_match_breadth_first_search(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([1, 7, 60, 400])
    edges = [(rng.randrange(n), rng.randrange(n)) for _ in range(rng.randrange(2 * n))]
    if seed == 0:  # a long path given in reverse: many hooking rounds
        edges = [(i + 1, i) for i in reversed(range(n - 1))]
    a = np.array([e[0] for e in edges], dtype=np.int64)
    b = np.array([e[1] for e in edges], dtype=np.int64)
    assert connected_components(n, a, b).tolist() == reference_components(n, edges)


def test_fresh_ids_are_consecutive_and_flows_hold_read_only_arrays() -> None:
    g = ChannelGraph()
    assert g.fresh(3).tolist() == [0, 1, 2]
    ids = g.fresh(2)
    assert ids.tolist() == [3, 4] and g.size == 5
    flow = Flow(1, np.array([4, 3]))
    assert flow.ids.dtype == np.int64 and not flow.ids.flags.writeable


def test_a_slice_attached_twice_joins_its_channels() -> None:
    g = ChannelGraph()
    a, b = g.fresh(3), g.fresh(3)
    g.attach(a, "w", 0, "out")
    g.attach(b[::-1], "w", 0, "in")  # slice i of w is owned by a[i]: b[2-i] joins a[i]
    labels = g.labels()
    assert [labels[a[i]] == labels[b[2 - i]] for i in range(3)] == [True] * 3
    assert len(set(labels.tolist())) == 3
    rows = g.members()
    assert rows.role.tolist() == [2, 2, 2]  # the second attachment added no member


def test_repeated_slices_within_one_call_join_their_channels() -> None:
    g = ChannelGraph()
    ids = g.fresh(4)
    g.attach(ids, "w", 1, "in", index=np.array([0, 1, 0, 1]))
    labels = g.labels()
    assert labels[ids].tolist() == [0, 1, 0, 1]
    table = g.members()
    assert sorted(zip(table.index.tolist(), table.ids.tolist(), strict=True)) == [(0, 0), (1, 1)]


def test_first_hard_pin_is_kept_and_wins_over_value_pins() -> None:
    g = ChannelGraph()
    ids = g.fresh(3)
    g.pin_value(ids, "sig", "sigmoid(0) != 0")
    g.pin(ids[:1], "first")
    g.pin(ids[:2], "second")
    hard, value, reasons = g.first_pins()
    assert [reasons[r] if r >= 0 else None for r in hard.tolist()] == ["first", "second", None]
    assert [reasons[r] for r in value.tolist()] == ["sigmoid(0) != 0"] * 3


def test_value_pins_are_found_and_waived_per_channel() -> None:
    g = ChannelGraph()
    ids = g.fresh(6)
    g.pin_value(ids[[4, 1]], "gate", "g")
    g.pin_value(ids[[5]], "other", "o")
    assert g.value_sites(ids[[0, 2]]) == set()
    assert g.value_sites(ids[[0, 1]]) == {"gate"}
    assert g.value_sites(ids) == {"gate", "other"}
    g.waive(ids[[1, 5]], {"gate"})  # only channel 1 at site "gate" goes
    assert g.value_sites(ids[[1]]) == set()
    assert g.value_sites(ids[[4]]) == {"gate"}
    assert g.value_sites(ids[[5]]) == {"other"}


def test_union_all_refuses_different_lengths() -> None:
    g = ChannelGraph()
    ids = g.fresh(3)
    with pytest.raises(ValueError, match="3 and 2"):
        g.union_all(ids, ids[:2])
