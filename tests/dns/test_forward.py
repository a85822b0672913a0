"""Rule 4: forwarding names outside the cluster zones to (fake, loopback) upstreams."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import dns.flags
from dnshelpers import FakeUpstream, Z, answers, dig, kube_cluster, needs_dig, rcode
from dnsserve import serve
from helpers import DaemonProcess

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
