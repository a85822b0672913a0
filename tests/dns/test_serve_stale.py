"""Serve-stale (RFC 8767) and prefetch in the forward cache, over real loopback sockets: an
in-process server whose forward cache runs on a clock the test moves, a scripted fake
upstream on 127.0.0.x that can answer, go silent, SERVFAIL or REFUSE, and one real daemon
process on the real clock with the settings from the environment."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from dnshelpers import answers, dig, needs_dig, query, rcode
from fakes.dns_upstream import RawUpstream
from helpers import DaemonProcess
from prometheus_client import CollectorRegistry, generate_latest

from node_services.dns.forward import Forwarder
from node_services.dns.forward_cache import FAILURE_RECHECK, ResponseCache
from node_services.dns.metrics import DnsStats, register
from node_services.dns.server import DnsServer
from node_services.dns.zone import Zone
from node_services.state.store import Store

NAME = "www.example.org."
GONE = "gone.example.org."  # NXDOMAIN at the upstream
CHAIN = "alias.example.org."  # a CNAME to a name with no record of the type


class Clock:
    """The forward cache's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Scripted:
    """A fake upstream on ``host`` whose behaviour the test switches: ``mode`` is answer,
    silent (a timeout), servfail or refused. It answers ``ip`` with ``ttl`` for every name
    but ``GONE`` (NXDOMAIN with an SOA whose minimum is ``negative_ttl``) and AAAA questions
    (NODATA, the same SOA); ``asked`` lists the (name, type) of every query received."""

    host: str
    mode: str = "answer"
    ip: str = "192.0.2.1"
    ttl: int = 60
    negative_ttl: int = 60
    delay: float = 0.0
    asked: list[tuple[str, str]] = field(default_factory=list)
    raw: RawUpstream | None = None

    def __enter__(self) -> Scripted:
        self.raw = RawUpstream(self.host, on_query=self._on_query).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.raw is not None
        self.raw.__exit__(*exc)

    def of(self, name: str) -> list[tuple[str, str]]:
        """The queries received for ``name`` (not the daemon's loop probes)."""
        return [asked for asked in self.asked if asked[0] == name]

    @property
    def address(self) -> tuple[str, int]:
        assert self.raw is not None
        return (self.host, self.raw.port)

    def _soa(self) -> dns.rrset.RRset:
        """The zone's SOA, for a negative answer (its minimum: the negative TTL)."""
        return dns.rrset.from_text(
            "example.org.",
            self.negative_ttl,
            "IN",
            "SOA",
            f"ns.example.org. host.example.org. 1 7200 1800 86400 {self.negative_ttl}",
        )

    def _on_query(self, upstream: RawUpstream, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().lower()
        self.asked.append((name, dns.rdatatype.to_text(question.rdtype)))
        if self.mode == "silent":
            return
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if self.mode in ("servfail", "refused"):
            response.set_rcode(dns.rcode.SERVFAIL if self.mode == "servfail" else dns.rcode.REFUSED)
        elif name == CHAIN:  # a CNAME whose target has no record of the type: no data
            response.answer.append(
                dns.rrset.from_text(question.name, 600, "IN", "CNAME", "nothing.example.org.")
            )
            response.authority.append(self._soa())
        elif name == GONE or question.rdtype != dns.rdatatype.A:
            if name == GONE:
                response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
        else:
            response.answer.append(dns.rrset.from_text(question.name, self.ttl, "IN", "A", self.ip))
        wire = response.to_wire()
        if self.delay:
            upstream.loop.call_later(self.delay, upstream.send, wire, addr)
        else:
            upstream.send(wire, addr)


@dataclass
class Node:
    server: DnsServer
    forwarder: Forwarder
    stats: DnsStats
    port: int

    async def ask(self, name: str = NAME, rdtype: str = "A") -> dns.message.Message:
        message = dns.message.make_query(name, rdtype)
        return await dns.asyncquery.udp(message, "127.0.0.1", port=self.port, timeout=3)

    async def settled(self) -> None:
        """Until no background refresh is running (bounded)."""
        for _ in range(300):
            if not self.forwarder._refreshing:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("a background refresh did not finish")


@pytest.fixture
def upstream() -> Iterator[Scripted]:
    with Scripted("127.0.0.41") as fake:
        yield fake


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def start(upstream: Scripted, clock: Clock) -> AsyncIterator[Callable[..., Any]]:
    nodes: list[Node] = []

    async def make(
        *, serve_stale: float = 3600.0, prefetch: int = 0, forward_timeout: float = 0.3
    ) -> Node:
        stats = DnsStats()
        forwarder = Forwarder(
            (upstream.address,),
            stats=stats,
            timeout=forward_timeout,
            serve_stale=serve_stale,
            prefetch=prefetch,
            clock=clock,
        )
        store = Store()
        store.replace("static:test", [], synced=True)
        server = DnsServer(store, Zone(forwarding=True), stats=stats, forwarder=forwarder)
        await server.start("127.0.0.1", 0)
        assert server.sockname is not None
        node = Node(server, forwarder, stats, server.sockname[1])
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.server.stop()


@pytest.mark.parametrize("failure", ["silent", "servfail", "refused"])
async def test_stale_answer_with_ttl_30_while_upstream_fails_then_fresh_when_it_returns(
    start: Callable[..., Any], upstream: Scripted, clock: Clock, failure: str
) -> None:
    node: Node = await start()
    assert answers(await node.ask()) == [f"{NAME} 60 A 192.0.2.1"]
    clock.now += 61  # expired
    upstream.mode = failure
    response = await node.ask()
    assert rcode(response) == "NOERROR"
    assert answers(response) == [f"{NAME} 30 A 192.0.2.1"]
    assert upstream.asked == [(NAME, "A")] * 2  # the upstream was asked first
    assert node.stats.stale_answers == 1
    # Within the failure recheck time: the stale answer at once, the upstream not asked.
    clock.now += FAILURE_RECHECK - 1
    assert answers(await node.ask()) == [f"{NAME} 30 A 192.0.2.1"]
    assert len(upstream.asked) == 2 and node.stats.stale_answers == 2
    # The upstream is back with new data: after the recheck time the upstream is asked
    # first again, and the answer is its fresh one.
    upstream.mode, upstream.ip = "answer", "192.0.2.2"
    clock.now += 2
    assert answers(await node.ask()) == [f"{NAME} 60 A 192.0.2.2"]
    assert len(upstream.asked) == 3 and node.stats.stale_answers == 2
    assert answers(await node.ask()) == [f"{NAME} 60 A 192.0.2.2"]  # from the cache
    assert len(upstream.asked) == 3


OTHER, THIRD = "other.example.org.", "third.example.org."


async def test_while_upstreams_fail_expired_entries_are_stale_at_once_and_refreshed_behind(
    start: Callable[..., Any], upstream: Scripted, clock: Clock
) -> None:
    """Once the upstreams failed, other expired entries do not wait for them: the stale
    answer at once, and one background refresh, which finds out when they are back."""
    node: Node = await start()
    for name in (NAME, OTHER, THIRD):
        await node.ask(name)
    clock.now += 61
    upstream.mode = "servfail"
    assert answers(await node.ask()) == [f"{NAME} 30 A 192.0.2.1"]  # asked first: failed
    assert len(upstream.asked) == 4
    # OTHER: stale at once; its background refresh fails too.
    assert answers(await node.ask(OTHER)) == [f"{OTHER} 30 A 192.0.2.1"]
    await node.settled()
    assert upstream.asked[-1] == (OTHER, "A") and len(upstream.asked) == 5
    assert node.stats.stale_refreshes == node.stats.stale_refresh_failures == 1
    # The upstream is back, unknown to us: THIRD is stale at once, and its background
    # refresh brings the fresh answer for the next asker.
    upstream.mode, upstream.ip = "answer", "192.0.2.2"
    assert answers(await node.ask(THIRD)) == [f"{THIRD} 30 A 192.0.2.1"]
    await node.settled()
    assert upstream.asked[-1] == (THIRD, "A") and node.stats.stale_refreshes == 2
    assert node.stats.stale_refresh_failures == 1
    assert answers(await node.ask(THIRD)) == [f"{THIRD} 60 A 192.0.2.2"]
    # OTHER failed lately by itself: stale at once until its recheck time, then asked first.
    assert answers(await node.ask(OTHER)) == [f"{OTHER} 30 A 192.0.2.1"]
    assert len(upstream.asked) == 6
    clock.now += FAILURE_RECHECK
    assert answers(await node.ask(OTHER)) == [f"{OTHER} 60 A 192.0.2.2"]
    assert len(upstream.asked) == 7
    assert node.stats.stale_answers == 4


async def test_while_upstreams_fail_one_stale_refresh_runs_at_a_time(
    start: Callable[..., Any], upstream: Scripted, clock: Clock
) -> None:
    node: Node = await start(forward_timeout=2.0)
    for name in (NAME, OTHER, THIRD):
        await node.ask(name)
    clock.now += 61
    upstream.mode = "silent"
    assert answers(await node.ask()) == [f"{NAME} 30 A 192.0.2.1"]  # after the 2 s timeout
    started = time.monotonic()
    assert answers(await node.ask(OTHER)) == [f"{OTHER} 30 A 192.0.2.1"]
    assert answers(await node.ask(THIRD)) == [f"{THIRD} 30 A 192.0.2.1"]
    assert time.monotonic() - started < 1.0  # neither waited the 2 s for the upstream
    assert (
        node.stats.stale_refreshes == 1 and node.stats.refreshes_skipped == 0
    )  # the one-at-a-time rule, not load
    await node.settled()
    assert upstream.asked[-1] == (OTHER, "A") and len(upstream.asked) == 5
    # THIRD's refresh was not sent: it is tried by a later asker.
    assert answers(await node.ask(THIRD)) == [f"{THIRD} 30 A 192.0.2.1"]
    await node.settled()
    assert upstream.asked[-1] == (THIRD, "A") and node.stats.stale_refreshes == 2


async def test_nxdomain_and_nodata_are_never_served_stale(
    start: Callable[..., Any], upstream: Scripted, clock: Clock
) -> None:
    node: Node = await start()
    gone = await node.ask(GONE)
    assert rcode(gone) == "NXDOMAIN" and gone.answer == []
    nodata = await node.ask(NAME, "AAAA")
    assert rcode(nodata) == "NOERROR" and nodata.answer == [] and nodata.authority
    assert rcode(await node.ask(GONE)) == "NXDOMAIN"  # from the cache
    assert len(upstream.asked) == 2
    clock.now += 61  # past the negative TTL (SOA minimum 60)
    upstream.mode = "servfail"
    assert rcode(await node.ask(GONE)) == "SERVFAIL"
    assert rcode(await node.ask(NAME, "AAAA")) == "SERVFAIL"
    assert len(upstream.asked) == 4
    assert node.stats.stale_answers == 0
    assert len(node.forwarder.cache) == 0  # dropped at their TTL, not kept


async def test_a_cname_to_no_data_is_negative_never_stale(
    start: Callable[..., Any], upstream: Scripted, clock: Clock
) -> None:
    """NOERROR with a CNAME (TTL 600) and an SOA (minimum 60): the target has no record of
    the type, so the answer lives for the negative TTL and is never served stale."""
    node: Node = await start()
    first = await node.ask(CHAIN)
    assert rcode(first) == "NOERROR" and first.authority
    assert [r.to_text() for rr in first.answer for r in rr] == ["nothing.example.org."]
    clock.now += 61  # past the negative TTL, well inside the CNAME's 600 s
    upstream.mode = "servfail"
    assert rcode(await node.ask(CHAIN)) == "SERVFAIL"
    assert node.stats.stale_answers == 0
    assert len(upstream.of(CHAIN)) == 2


async def test_stale_window_ends_after_dns_serve_stale(
    start: Callable[..., Any], upstream: Scripted, clock: Clock
) -> None:
    node: Node = await start(serve_stale=100)
    await node.ask()
    upstream.mode = "refused"
    clock.now += 60 + 99  # 99 s into the window
    assert answers(await node.ask()) == [f"{NAME} 30 A 192.0.2.1"]
    clock.now += 1  # the window is over
    assert rcode(await node.ask()) == "SERVFAIL"
    assert len(node.forwarder.cache) == 0
    assert node.stats.stale_answers == 1


async def test_serve_stale_zero_disables_it(
    start: Callable[..., Any], upstream: Scripted, clock: Clock
) -> None:
    node: Node = await start(serve_stale=0)
    await node.ask()
    clock.now += 61
    upstream.mode = "servfail"
    assert rcode(await node.ask()) == "SERVFAIL"
    assert node.stats.stale_answers == 0


async def test_popular_entry_is_prefetched_once_before_it_expires(
    start: Callable[..., Any], upstream: Scripted, clock: Clock
) -> None:
    node: Node = await start(prefetch=3)
    upstream.ttl = 100
    assert answers(await node.ask()) == [f"{NAME} 100 A 192.0.2.1"]
    assert answers(await node.ask("quiet.example.org.")) == ["quiet.example.org. 100 A 192.0.2.1"]
    clock.now += 50
    for _ in range(3):  # popular now, but 50% of the TTL is left: no prefetch yet
        assert answers(await node.ask()) == [f"{NAME} 50 A 192.0.2.1"]
    assert answers(await node.ask("quiet.example.org.")) == ["quiet.example.org. 50 A 192.0.2.1"]
    assert len(upstream.asked) == 2
    upstream.ip, upstream.delay = "192.0.2.7", 0.2
    clock.now += 41  # 9 s left: under 10% of 100
    for _ in range(10):  # every asker is answered from the cache; one prefetch is sent
        assert answers(await node.ask()) == [f"{NAME} 9 A 192.0.2.1"]
    # Asked twice only in its lifetime: not popular, not prefetched.
    assert answers(await node.ask("quiet.example.org.")) == ["quiet.example.org. 9 A 192.0.2.1"]
    await node.settled()
    assert clock.now < 1100  # the clock has not reached the expiry
    assert upstream.asked == [(NAME, "A"), ("quiet.example.org.", "A"), (NAME, "A")]
    assert node.stats.prefetches == 1 and node.stats.prefetch_failures == 0
    assert answers(await node.ask()) == [f"{NAME} 100 A 192.0.2.7"]  # the new answer
    assert node.stats.cache_misses == 2


async def test_failed_prefetch_is_counted_and_the_entry_expires_as_usual(
    start: Callable[..., Any], upstream: Scripted, clock: Clock
) -> None:
    node: Node = await start(prefetch=1, serve_stale=0)
    await node.ask()
    upstream.mode = "silent"
    clock.now += 55  # 5 s of 60 left
    assert answers(await node.ask()) == [f"{NAME} 5 A 192.0.2.1"]
    await node.settled()
    assert node.stats.prefetches == node.stats.prefetch_failures == 1
    assert answers(await node.ask()) == [f"{NAME} 5 A 192.0.2.1"]  # no second prefetch
    await node.settled()
    assert len(upstream.asked) == 2 and node.stats.prefetches == 1


def test_stale_entries_stay_within_the_byte_budget_and_go_first(clock: Clock) -> None:
    """A stale entry costs what it did when fresh, and is the first evicted once served."""

    def response(name: str) -> bytes:
        query = dns.message.make_query(name, "A")
        reply = dns.message.make_response(query)
        reply.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.1"))
        return reply.to_wire()

    def key(name: str) -> tuple[bytes, int, int, int]:
        return (dns.name.from_text(name).to_wire() or b"", 1, 1, 8)

    names = [f"n{i}.example.org." for i in range(4)]
    probe = ResponseCache(
        stats=DnsStats(),
        max_bytes=1 << 20,
        max_entries=100,
        negative_ttl_cap=300,
        serve_stale=3600,
        clock=clock,
    )
    probe.store(key(names[0]), response(names[0]))
    cost = probe.bytes
    cache = ResponseCache(
        stats=DnsStats(),
        max_bytes=3 * cost,
        max_entries=100,
        negative_ttl_cap=300,
        serve_stale=3600,
        clock=clock,
    )
    cache.store(key(names[0]), response(names[0]))
    clock.now += 61
    cache.store(key(names[1]), response(names[1]))
    cache.store(key(names[2]), response(names[2]))
    question = response(names[0])[12 : 12 + len(key(names[0])[0]) + 4]
    assert cache.stale(key(names[0]), 1, question) is not None  # n0 is stale and served
    assert cache.bytes == 3 * cost
    cache.store(key(names[3]), response(names[3]))
    assert cache.bytes == 3 * cost == cache.stats.cache_bytes
    assert len(cache) == 3
    assert cache.stale(key(names[0]), 1, question) is None  # the stale one went first


def test_new_settings_are_read_and_checked() -> None:
    from node_services.config import ConfigError, load_settings
    from node_services.dns.service import build_dns

    defaults = load_settings(environ={"NODE_NAME": "n"})
    assert (defaults.dns_serve_stale, defaults.dns_prefetch) == (3600.0, 10)
    settings = load_settings(
        environ={
            "NODE_NAME": "n",
            "NODE_SERVICES_DNS_SERVE_STALE": "120",
            "NODE_SERVICES_DNS_PREFETCH": "0",
            "NODE_SERVICES_UPSTREAMS": "127.0.0.41:53",
        }
    )
    server = build_dns(settings, Store(), CollectorRegistry())
    assert server.forwarder is not None
    assert server.forwarder.cache.serve_stale == 120.0
    assert server.forwarder.cache.prefetch == 0
    with pytest.raises(ConfigError) as caught:
        load_settings(
            environ={"NODE_NAME": "n"},
            overrides={"dns_serve_stale": "-1", "dns_prefetch": "often"},
        )
    problems = caught.value.problems
    assert len(problems) == 2, problems
    assert any("dns_serve_stale" in p and "from 0" in p for p in problems)
    assert any("dns_prefetch" in p and "whole number" in p for p in problems)


def test_metrics_are_exported() -> None:
    stats = DnsStats(stale_answers=3, prefetches=2, prefetch_failures=1, stale_refreshes=4)
    registry = CollectorRegistry()
    register(registry, stats)
    text = generate_latest(registry).decode()
    for line in (
        'node_services_dns_cache_stale_answers_total{zone="."} 3.0',
        'node_services_dns_cache_prefetches_total{zone="."} 2.0',
        'node_services_dns_cache_prefetch_failures_total{zone="."} 1.0',
        'node_services_dns_cache_stale_refreshes_total{zone="."} 4.0',
        'node_services_dns_cache_stale_refresh_failures_total{zone="."} 0.0',
        'node_services_dns_cache_refreshes_skipped_total{zone="."} 0.0',
    ):
        assert line in text.splitlines(), line


@needs_dig
def test_daemon_prefetches_and_serves_stale_on_the_real_clock(
    daemon: Callable[..., DaemonProcess],
) -> None:
    """A real daemon, settings from the environment, dig as the client: an answer with TTL 6
    asked twice is prefetched in its last 10% (the upstream sees the query before the
    expiry); then, the upstream REFUSING, the expired answer comes with TTL 30."""
    with Scripted("127.0.0.42", ttl=6) as upstream:
        process = daemon(
            "--upstream",
            f"{upstream.host}:{upstream.address[1]}",
            env={"NODE_SERVICES_DNS_PREFETCH": "2", "NODE_SERVICES_DNS_SERVE_STALE": "60"},
        )
        port = process.dns_port
        asked = time.monotonic()
        assert dig(port, "+noall", "+answer", NAME).split() == [NAME, "6", "IN", "A", "192.0.2.1"]
        stored = time.monotonic()  # the daemon stored the answer between the two
        for _ in range(2):
            assert dig(port, "+short", NAME).split() == ["192.0.2.1"]
        assert len(upstream.of(NAME)) == 1
        upstream.ip, upstream.ttl = "192.0.2.9", 1
        time.sleep(max(0.0, stored + 5.42 - time.monotonic()))  # under 0.6 s of 6 left
        # with EDNS, as dig asks: the same cache entry
        assert answers(query(port, NAME, use_edns=0)) == [f"{NAME} 1 A 192.0.2.1"]
        for _ in range(200):
            if len(upstream.of(NAME)) == 2:
                break
            time.sleep(0.005)
        assert len(upstream.of(NAME)) == 2 and time.monotonic() < asked + 6.0
        assert float(process.metric('node_services_dns_cache_prefetches_total{zone="."}')) == 1
        # The prefetched answer (TTL 1) replaced the old one before it expired...
        assert dig(port, "+short", NAME).split() == ["192.0.2.9"]
        upstream.mode = "refused"
        time.sleep(1.5)  # ...and has expired in turn: the upstream refuses, stale it is
        out = dig(port, "+noall", "+answer", NAME).split()
        assert out == [NAME, "30", "IN", "A", "192.0.2.9"], out
        assert len(upstream.of(NAME)) == 3
        assert float(process.metric('node_services_dns_cache_stale_answers_total{zone="."}')) == 1
