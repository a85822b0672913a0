"""FrozenMap: updated copies share unchanged shards and never alter the original."""

from __future__ import annotations

import random

from node_services.state.frozenmap import FrozenMap


def test_evolve_matches_a_dict_and_leaves_the_original_unchanged() -> None:
    rng = random.Random(7)
    reference = {f"k{i}": i for i in range(5000)}
    current = FrozenMap(reference)
    history = [(current, dict(reference))]
    for _ in range(50):
        sets = {f"k{rng.randrange(8000)}": rng.random() for _ in range(40)}
        deletes = [f"k{rng.randrange(8000)}" for _ in range(40)]
        current = current.evolve(sets, deletes)
        for key in deletes:
            reference.pop(key, None)
        reference.update(sets)
        history.append((current, dict(reference)))
    for frozen, expected in history:
        assert dict(frozen) == expected
        assert len(frozen) == len(expected)


def test_lookup_protocol() -> None:
    m = FrozenMap({("ns", "a"): 1})
    assert m[("ns", "a")] == 1
    assert m.get(("ns", "b")) is None
    assert m.get(("ns", "b"), 5) == 5
    assert ("ns", "a") in m
    assert ("ns", "b") not in m


def test_evolve_without_changes_returns_the_same_map() -> None:
    m = FrozenMap({"a": 1})
    assert m.evolve({}, ["missing"]) is m


def test_unchanged_shards_are_shared() -> None:
    m = FrozenMap({f"k{i}": i for i in range(10000)})
    n = m.evolve({"k1": -1})
    shared = sum(a is b for a, b in zip(m._shards, n._shards, strict=True))
    assert shared == len(m._shards) - 1
