"""Rule 4: forwarding names outside the cluster zones to (fake, loopback) upstreams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
from dnshelpers import (
    FakeUpstream,
    Z,
    answers,
    dig,
    kube_cluster,
    needs_dig,
    query,
    rcode,
    write_snapshot,
)
from dnsserve import serve
from fakes.dns_upstream import LoopingRelay, RawUpstream, ask_many, ip_for
from helpers import DaemonProcess

from node_services.dns.forward import Forwarder
from node_services.dns.metrics import DnsStats
from node_services.dns.server import DnsServer
from node_services.dns.zone import Zone
from node_services.state.store import Store

WWW = "www.example.org"


async def test_forwarded_answer_and_ra(upstream: FakeUpstream) -> None:
    s = await serve(kube_cluster(), upstreams=((upstream.host, upstream.port),))
    try:
        response = await s.query(WWW, "A")
        assert answers(response) == [f"{WWW}. 300 A 192.0.2.10"]
        assert response.flags & dns.flags.RA and not response.flags & dns.flags.AA
        assert upstream.queries == [("udp", f"{WWW}.", "A")]
        # Cluster-zone names are never forwarded, whatever the answer.
        for name in (
            f"web.shop.svc.{Z}",
            f"nope.shop.svc.{Z}",
            f"x.y.{Z}",
            "nope.rancher.internal",
        ):
            await s.query(name, "A")
        assert upstream.queries == [("udp", f"{WWW}.", "A")]
    finally:
        await s.stop()


async def test_timeout_then_next_upstream_then_servfail(upstream: FakeUpstream) -> None:
    silent = FakeUpstream(host="127.0.0.3", silent=True).start()
    try:
        s = await serve(
            [],
            upstreams=((silent.host, silent.port), (upstream.host, upstream.port)),
            forward_timeout=0.3,
        )
        try:
            assert answers(await s.query(WWW, "A")) == [f"{WWW}. 300 A 192.0.2.10"]
            assert s.stats.forward_errors == {"timeout": 1}
            assert silent.queries == [("udp", f"{WWW}.", "A")]
        finally:
            await s.stop()
        s = await serve([], upstreams=((silent.host, silent.port),), forward_timeout=0.3)
        try:
            assert rcode(await s.query(WWW, "A")) == "SERVFAIL"
            assert s.stats.forward_errors == {"timeout": 1, "all_failed": 1}
        finally:
            await s.stop()
    finally:
        silent.stop()


async def test_truncated_upstream_answer_retried_over_tcp(upstream: FakeUpstream) -> None:
    upstream.truncate_udp = True
    s = await serve([], upstreams=((upstream.host, upstream.port),))
    try:
        response = await s.query(WWW, "AAAA")
        assert answers(response) == [f"{WWW}. 300 AAAA 2001:db8::10"]
        assert not response.flags & dns.flags.TC
        assert upstream.queries == [("udp", f"{WWW}.", "AAAA"), ("tcp", f"{WWW}.", "AAAA")]
        assert s.stats.forward_tcp_retries == 1
    finally:
        await s.stop()


async def test_cache_honours_ttl_and_patches_id_and_case(upstream: FakeUpstream) -> None:
    s = await serve([], upstreams=((upstream.host, upstream.port),))
    try:
        await s.query(WWW, "A")
        await asyncio.sleep(1.1)
        again = await s.query("WWW.Example.ORG", "A")
        assert answers(again) == ["WWW.Example.ORG. 299 A 192.0.2.10"]
        assert upstream.queries == [("udp", f"{WWW}.", "A")]
        assert s.stats.cache_hits == 1 and s.stats.cache_entries == 1
    finally:
        await s.stop()


async def test_negative_answers_cached_per_soa_minimum(upstream: FakeUpstream) -> None:
    upstream.soa_minimum = 1
    s = await serve([], upstreams=((upstream.host, upstream.port),))
    try:
        assert rcode(await s.query("missing.example.org", "A")) == "NXDOMAIN"
        assert rcode(await s.query("missing.example.org", "A")) == "NXDOMAIN"
        assert len(upstream.queries) == 1  # the second came from the cache
        nodata = await s.query(WWW, "MX")  # NODATA is cached the same way
        assert rcode(nodata) == "NOERROR" and nodata.answer == []
        await s.query(WWW, "MX")
        assert len(upstream.queries) == 2
        await asyncio.sleep(1.1)  # SOA minimum 1 s: expired
        assert rcode(await s.query("missing.example.org", "A")) == "NXDOMAIN"
        assert len(upstream.queries) == 3
    finally:
        await s.stop()


async def test_concurrency_cap_refuses_beyond_it() -> None:
    silent = FakeUpstream(host="127.0.0.3", silent=True).start()
    s = await serve(
        [], upstreams=((silent.host, silent.port),), forward_timeout=1.0, max_inflight=1
    )
    try:
        first = asyncio.ensure_future(s.query("a.example.org", "A"))
        await asyncio.sleep(0.2)
        assert rcode(await s.query("b.example.org", "A")) == "REFUSED"
        assert rcode(await first) == "SERVFAIL"
        assert s.stats.refused_overload == 1
    finally:
        await s.stop()
        silent.stop()


async def test_forwarding_loop_is_detected() -> None:
    relay = FakeUpstream(host="127.0.0.4")
    relay.start()
    s = await serve([], upstreams=((relay.host, relay.port),), forward_timeout=2.0)
    relay.relay_to = ("127.0.0.1", s.port)  # the upstream sends our own query back to us
    try:
        assert rcode(await s.query("loop.example.org", "A")) == "SERVFAIL"
        assert s.stats.loops == 1
    finally:
        await s.stop()
        relay.stop()


@needs_dig
def test_daemon_forwards_with_dig(
    daemon: Callable[..., DaemonProcess], upstream: FakeUpstream
) -> None:
    process = daemon("--upstream", upstream.address)
    out = dig(process.dns_port, "+noall", "+answer", WWW, "A")
    assert out.split() == [f"{WWW}.", "300", "IN", "A", "192.0.2.10"]


def test_loop_through_upstream_that_rewrites_ids_is_detected_and_bounded(
    daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """The upstream forwards every query back to us with a new random ID, as a real resolver
    configured to forward to us does: 200 client queries must not snowball (before: 12,441
    upstream packets), the loop is reported (our random probe name came back), and cluster
    names keep being answered meanwhile."""
    snapshot = write_snapshot(tmp_path / "snapshot.yaml", kube_cluster())
    with LoopingRelay("127.0.0.13", ("127.0.0.1", 0)) as relay:
        process = daemon(
            "--snapshot",
            str(snapshot),
            "--upstream",
            relay.address,
            "--dns-forward-timeout",
            "1",
        )
        relay.target = ("127.0.0.1", process.dns_port)
        process.wait_for(lambda: process.get("/readyz")[0] == 200, what="/readyz")
        names = [f"loop-{i}.example.org" for i in range(200)]
        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(ask_many, process.dns_port, names, timeout=8)
            served = []
            while not asked.done():
                answer = query(process.dns_port, f"web.shop.svc.{Z}", "A", timeout=1)
                served.append(sorted(str(r) for rrset in answer.answer for r in rrset))
                time.sleep(0.05)
            answers_ = asked.result()
        time.sleep(1.5)  # let whatever is still circling come back or die out
        assert len(answers_) == 200
        assert {a[3] & 0xF for a in answers_.values()} == {2}  # SERVFAIL: no one can answer
        assert served and all(s == ["10.43.0.20"] for s in served)
        assert relay.queries < 2000, relay.queries
        assert float(process.metric('node_services_dns_forward_loops_total{zone="."}')) >= 1
        assert f"forwarding loop: upstream {relay.address} sends our queries back" in (
            process.output()
        )


async def test_loop_through_upstream_that_rewrites_ids_adds_no_queries_without_probes() -> None:
    """Without the probe's help, the looped queries join the questions in flight."""
    with LoopingRelay("127.0.0.17", ("127.0.0.1", 0)) as relay:
        s = await serve(
            [], upstreams=((relay.host, relay.port),), forward_timeout=1.0, max_inflight=1000
        )
        relay.target = ("127.0.0.1", s.port)
        try:
            names = [f"loop-{i}.example.org" for i in range(200)]
            got = await asyncio.to_thread(ask_many, s.port, names, timeout=8)
            await asyncio.sleep(1.2)  # anything still circling comes back or dies out
            assert len(got) == 200 and {a[3] & 0xF for a in got.values()} == {2}
            assert relay.queries < 2000, relay.queries
            assert s.stats.forward_coalesced >= 100, s.stats.forward_coalesced
            assert s.stats.loops == 0
        finally:
            await s.stop()


async def test_identical_queries_in_flight_share_one_upstream_query() -> None:
    """Clients asking the same question at once each get the answer with their own ID and
    their own case; one query went upstream. A query differing in DO is asked on its own."""
    seen: list[bytes] = []

    def late(upstream: RawUpstream, data: bytes, addr: Any) -> None:
        seen.append(data)
        upstream.loop.call_later(0.3, upstream.answer, data, addr)

    with RawUpstream("127.0.0.14", on_query=late) as upstream:
        s = await serve([], upstreams=((upstream.host, upstream.port),), forward_timeout=2.0)
        try:
            cases = ["www.example.org", "WWW.example.org", "www.EXAMPLE.org", "Www.Example.Org"]
            messages = [dns.message.make_query(name, "A") for name in cases]
            messages.append(dns.message.make_query(WWW, "A", want_dnssec=True))
            replies = await asyncio.gather(
                *(dns.asyncquery.udp(m, "127.0.0.1", port=s.port, timeout=3) for m in messages)
            )
            for message, reply in zip(messages, replies, strict=True):
                assert reply.id == message.id
                assert reply.question[0].name.to_text() == message.question[0].name.to_text()
                ip = ip_for(WWW)
                assert [r.to_text() for rrset in reply.answer for r in rrset] == [ip]
            assert len(seen) == 2  # one for the four plain queries, one for the DO query
            assert s.stats.forward_coalesced == 3
        finally:
            await s.stop()


async def test_upstream_found_looping_is_skipped_until_the_next_probe() -> None:
    with (
        LoopingRelay("127.0.0.18", ("127.0.0.1", 0)) as relay,
        RawUpstream("127.0.0.19") as good,
    ):
        store = Store()
        store.replace("static:test", [], synced=True)
        stats = DnsStats()
        forwarder = Forwarder(
            ((relay.host, relay.port), (good.host, good.port)),
            stats=stats,
            timeout=1.0,
            loop_probe_interval=60.0,
        )
        server = DnsServer(store, Zone(forwarding=True), stats=stats, forwarder=forwarder)
        await server.start("127.0.0.1", 0)
        assert server.sockname is not None
        port = server.sockname[1]
        relay.target = ("127.0.0.1", port)
        try:
            # The first query starts the probes; it loops through the relay until its timeout.
            first = await dns.asyncquery.udp(
                dns.message.make_query("a.example.org", "A"), "127.0.0.1", port=port, timeout=3
            )
            assert [r.to_text() for rrset in first.answer for r in rrset] == [
                ip_for("a.example.org")
            ]
            assert stats.loops == 1  # the relay's probe came back to us
            before = relay.queries
            started = time.monotonic()
            second = await dns.asyncquery.udp(
                dns.message.make_query("b.example.org", "A"), "127.0.0.1", port=port, timeout=3
            )
            assert time.monotonic() - started < 0.5  # straight to the good upstream
            assert [r.to_text() for rrset in second.answer for r in rrset] == [
                ip_for("b.example.org")
            ]
            assert relay.queries == before
            assert stats.forward_errors.get("loop") == 1
        finally:
            await server.stop()
