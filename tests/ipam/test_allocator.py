"""Ranges and the allocation rule, as pure logic over the in-memory free list."""

from __future__ import annotations

import itertools
import random

import pytest

from node_services.ipam.allocator import (
    MemoryFreeList,
    RangeError,
    give,
    next_free,
    node_range_sets,
    parse_range_sets,
    take,
)

BASE = int.from_bytes(bytes([10, 244, 0, 0]), "big")


def test_network_gateway_and_last_address_are_never_free() -> None:
    (v4,) = parse_range_sets({"subnet": "10.244.0.0/29"})
    assert v4.free_intervals() == [(BASE + 2, BASE + 6)]
    assert v4.size == 5
    (v6,) = node_range_sets(["fd00::/125"])
    assert [(lo & 0xFF, hi & 0xFF) for lo, hi in v6.free_intervals()] == [(2, 6)]


def test_a_gateway_inside_the_range_is_cut_out() -> None:
    (rs,) = parse_range_sets(
        {
            "ranges": [
                [
                    {
                        "subnet": "10.244.0.0/24",
                        "rangeStart": "10.244.0.10",
                        "rangeEnd": "10.244.0.20",
                        "gateway": "10.244.0.15",
                    }
                ]
            ]
        }
    )
    assert rs.free_intervals() == [(BASE + 10, BASE + 14), (BASE + 16, BASE + 20)]
    assert rs.size == 10


def test_round_robin_takes_the_next_free_after_the_last_and_wraps() -> None:
    free = MemoryFreeList([(10, 20)])
    got = []
    cursor = None
    for _ in range(11):
        value = next_free(free, cursor)
        assert value is not None
        assert take(free, value)
        got.append(value)
        cursor = value
    assert got == list(range(10, 21))
    assert next_free(free, cursor) is None
    assert give(free, 12) and give(free, 18) and give(free, 13)
    assert free.intervals() == [(12, 13), (18, 18)]
    assert next_free(free, 15) == 18
    assert next_free(free, 20) == 12  # wraps around
    assert not give(free, 12)  # already free
    assert not take(free, 15)  # not free


def test_free_list_matches_a_set_model_under_random_operations() -> None:
    rng = random.Random(7)
    free = MemoryFreeList([(0, 199)])
    model = set(range(200))
    cursor = None
    for _ in range(3000):
        if rng.random() < 0.55:
            value = next_free(free, cursor)
            expected = min((v for v in model if cursor is None or v > cursor), default=None)
            if expected is None:
                expected = min(model, default=None)
            assert value == expected
            if value is not None:
                assert take(free, value)
                model.discard(value)
                cursor = value
        else:
            value = rng.randrange(200)
            assert give(free, value) == (value not in model)
            model.add(value)
        intervals = free.intervals()
        assert {v for lo, hi in intervals for v in range(lo, hi + 1)} == model
        assert all(b[0] > a[1] + 1 for a, b in itertools.pairwise(intervals))  # merged


@pytest.mark.parametrize(
    ("ipam", "message"),
    [
        ({}, 'ipam: needs "ranges", "subnet", or "range": "node"'),
        ({"ranges": []}, "ipam.ranges: expected a non-empty list of range sets"),
        ({"ranges": [[]]}, "ipam.ranges[0]: expected a non-empty list of ranges"),
        (
            {"ranges": [[{"subnet": "10.0.0.0/24"}, {"subnet": "fd00::/64"}]]},
            "ipam.ranges[0]: mixes IPv4 and IPv6 ranges",
        ),
        (
            {"ranges": [[{"subnet": "10.0.0.0/24"}, {"subnet": "10.0.0.128/25"}]]},
            "ipam.ranges[0]: ranges 10.0.0.0/24 and 10.0.0.128/25 overlap",
        ),
        (
            {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.0"},
            "ipam.rangeStart: 10.0.0.0 is not a usable address of 10.0.0.0/24",
        ),
        (
            {"subnet": "10.0.0.0/24", "rangeEnd": "10.0.0.255"},
            "ipam.rangeEnd: 10.0.0.255 is not a usable address of 10.0.0.0/24",
        ),
        (
            {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.9", "rangeEnd": "10.0.0.8"},
            "ipam: rangeStart is after rangeEnd",
        ),
        (
            {"subnet": "10.0.0.0/24", "gateway": "banana"},
            "ipam.gateway: 'banana' is not an IP address",
        ),
    ],
)
def test_bad_ranges_are_refused_with_the_field_named(ipam: dict[str, object], message: str) -> None:
    with pytest.raises(RangeError) as caught:
        parse_range_sets(ipam)
    assert str(caught.value) == message
