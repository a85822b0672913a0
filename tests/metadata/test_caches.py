"""The answer caches are bounded in bytes, keys included: unique paths cannot grow the daemon."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from helpers import FIXTURES
from metadata_helpers import MetadataDaemon
from prometheus_client import CollectorRegistry, Counter, Gauge

from node_services.metadata.caches import DEFAULT_BUDGET, ENTRY_OVERHEAD, AnswerCaches, footprint

SCENARIO = FIXTURES / "cattle" / "recorded-scenario.json"


def test_an_entry_is_charged_its_key_value_and_overhead() -> None:
    path = ("services", "p" * 4000)
    key = (None, path, "text")
    value = (404, b"Not found\n")
    assert footprint(key) == (
        sys.getsizeof(key)
        + sys.getsizeof(path)
        + sys.getsizeof("services")
        + sys.getsizeof("p" * 4000)
        + sys.getsizeof("text")
    )
    assert footprint(key) > 4000
    registry = CollectorRegistry()
    used = Gauge("used", "bytes", registry=registry)
    resets = Counter("resets", "resets", registry=registry)
    size = ENTRY_OVERHEAD + footprint(key) + footprint(value)
    caches = AnswerCaches(budget=3 * size, used_bytes=used, resets=resets)
    first, second = caches.track({}), caches.track({})
    caches.remember(first, key, value)
    caches.remember(second, key, value)
    assert caches.used == 2 * size
    assert used._value.get() == caches.used
    caches.remember(first, (*key, "b"), value)  # past the budget: both start over
    assert (list(first), second, resets._value.get()) == ([(*key, "b")], {}, 1.0)
    huge = AnswerCaches(budget=100)
    mine: dict[object, object] = huge.track({})
    huge.remember(mine, key, value)  # bigger than the whole budget: not kept
    assert (mine, huge.used) == ({}, 0)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_rss_stays_bounded_under_unique_long_paths(
    metadata_daemon: Callable[..., MetadataDaemon],
) -> None:
    # half the default budget, so the caches fill (and start over) within the 12 s even on
    # a machine busy with other tests; the default budget behaves the same at twice the size
    budget = DEFAULT_BUDGET // 2
    daemon = metadata_daemon(
        "--snapshot",
        str(SCENARIO),
        "--node-name",
        "node1",
        env={"NODE_SERVICES_METADATA_CACHE_BYTES": str(budget)},
    )
    assert daemon.process.proc is not None
    pid = daemon.process.proc.pid
    resets = "node_services_metadata_cache_resets_total"
    before = rss_mib(pid)
    numbers = itertools.count()
    pad = "p" * 3500  # near the 4 KiB request line limit: the costliest keys
    versions = ("latest", "2015-07-25", "2015-12-19", "2016-07-29")
    accepts = ("text/plain", "application/json", "application/yaml")
    # Unique paths until the caches have filled and started over twice (each fill is the
    # whole budget, about 2,000 of these answers), at most 12 s.
    deadline = time.monotonic() + 12
    sent = 0

    async def client(session: aiohttp.ClientSession) -> int:
        done = 0
        while time.monotonic() < deadline:
            i = next(numbers)
            route = "services" if i % 2 else "self"
            url = f"{daemon.url}/{versions[i % 4]}/{route}/{pad}{i}"
            async with session.get(url, headers={"Accept": accepts[i // 4 % 3]}) as reply:
                assert reply.status == 404
                await reply.read()
            done += 1
            if done % 500 == 0 and float(daemon.process.metric(resets)) >= 2:
                break
        return done

    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and float(daemon.process.metric(resets)) < 2:
            sent += sum(await asyncio.gather(*(client(session) for _ in range(8))))
    grown = rss_mib(pid) - before
    assert float(daemon.process.metric(resets)) >= 1, f"the caches never filled ({sent} sent)"
    print(f"RSS grew {grown:.0f} MiB over {sent} unique paths")
    assert grown < 100, f"RSS grew {grown:.0f} MiB over {sent} unique paths"
    cached = float(daemon.process.metric("node_services_metadata_cache_bytes"))
    assert 0 < cached <= budget
