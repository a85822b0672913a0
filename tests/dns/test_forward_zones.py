"""Stub domains (dns_forward_zones): names in a zone go to that zone's own (fake, loopback)
upstreams, the longest zone wins, everything else goes to the default upstreams; each zone
has its own timeout, cache, questions in flight, loop probes and metrics (label `zone`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import pytest
from dnshelpers import (
    FakeUpstream,
    Z,
    answers,
    dig,
    kube_cluster,
    needs_dig,
    rcode,
    service,
    write_snapshot,
)
from dnsserve import first
from dnsserve import start_from_settings as start
from fakes.dns_upstream import LoopingRelay, RawUpstream, ip_for, qname_text
from helpers import DaemonProcess


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeUpstream]]:
    """Factory of FakeUpstreams on 127.0.0.x, all stopped at teardown."""
    started: list[FakeUpstream] = []

    def make(host: str, **records: list[str]) -> FakeUpstream:
        table = {}
        for key, values in records.items():
            name, _, rdtype = key.rpartition("__")
            table[(name.replace("_", ".") + ".", rdtype)] = values
        upstream = FakeUpstream(host=host, records=table).start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        upstream.stop()


def asked(upstream: FakeUpstream) -> list[tuple[str, str, str]]:
    """What an upstream was asked, without our loop probes (HINFO, once a minute per zone)."""
    return [q for q in upstream.queries if q[2] != "HINFO"]


async def test_a_stub_zone_goes_to_its_own_upstream_and_the_rest_to_the_default(
    tmp_path: Path, fakes: Callable[..., FakeUpstream]
) -> None:
    default = fakes("127.0.0.41", www_example_org__A=["192.0.2.10"])
    consul = fakes("127.0.0.42", web_service_consul__A=["10.9.0.7"], consul__A=["10.9.0.1"])
    s = await start(
        tmp_path,
        kube_cluster(),
        upstreams=[default.address],
        dns_forward_zones=[f"consul={consul.address}"],
    )
    try:
        stub = await s.query("Web.Service.Consul", "A")
        assert answers(stub) == ["Web.Service.Consul. 300 A 10.9.0.7"]
        assert stub.flags & dns.flags.RA and not stub.flags & dns.flags.AA
        assert first(await s.query("consul", "A")) == ["10.9.0.1"]  # the zone's apex too
        assert first(await s.query("www.example.org", "A")) == ["192.0.2.10"]
        # a name that only ends in the same letters is not in the zone
        assert rcode(await s.query("notconsul", "A")) == "NXDOMAIN"
        assert rcode(await s.query(f"web.shop.svc.{Z}", "A")) == "NOERROR"
        assert rcode(await s.query(f"nope.shop.svc.{Z}", "A")) == "NXDOMAIN"
        assert asked(consul) == [
            ("udp", "web.service.consul.", "A"),
            ("udp", "consul.", "A"),
        ]
        assert asked(default) == [("udp", "www.example.org.", "A"), ("udp", "notconsul.", "A")]
        # asked again: from each zone's own cache
        assert first(await s.query("web.service.consul", "A")) == ["10.9.0.7"]
        assert len(asked(consul)) == 2
        metric = s.metric
        assert metric("node_services_dns_cache_misses_total", zone="consul.") == 2
        assert metric("node_services_dns_cache_hits_total", zone="consul.") == 1
        assert metric("node_services_dns_cache_misses_total", zone=".") == 2
        assert metric("node_services_dns_cache_hits_total", zone=".") == 0
        assert metric("node_services_dns_cache_entries", zone="consul.") == 2
        assert metric("node_services_dns_forward_duration_seconds_count", zone="consul.") == 2
    finally:
        await s.server.stop()


async def test_the_longest_zone_a_name_falls_in_wins(
    tmp_path: Path, fakes: Callable[..., FakeUpstream]
) -> None:
    corp = fakes("127.0.0.43")
    lab = fakes("127.0.0.44")
    default = fakes("127.0.0.45")
    s = await start(
        tmp_path,
        upstreams=[default.address],
        dns_forward_zones=[f"corp.example={corp.address};lab.corp.example.={lab.address}"],
    )
    try:
        for name in ("host.lab.corp.example", "lab.corp.example", "a.b.lab.corp.example"):
            await s.query(name, "A")
        for name in ("host.corp.example", "xlab.corp.example", "corp.example"):
            await s.query(name, "A")
        await s.query("example", "A")
        assert [q[1] for q in asked(lab)] == [
            "host.lab.corp.example.",
            "lab.corp.example.",
            "a.b.lab.corp.example.",
        ]
        assert [q[1] for q in asked(corp)] == [
            "host.corp.example.",
            "xlab.corp.example.",
            "corp.example.",
        ]
        assert [q[1] for q in asked(default)] == ["example."]
    finally:
        await s.server.stop()


@needs_dig
async def test_a_reverse_zone_stub_takes_the_reverse_names_we_hold_no_record_of(
    tmp_path: Path, fakes: Callable[..., FakeUpstream]
) -> None:
    reverse = fakes("127.0.0.46", **{"5_0_0_10_in-addr_arpa__PTR": ["files.corp.example."]})
    default = fakes("127.0.0.47", **{"10_2_0_192_in-addr_arpa__PTR": ["www.example.org."]})
    s = await start(
        tmp_path,
        kube_cluster(),
        upstreams=[default.address],
        dns_forward_zones=[f"10.in-addr.arpa={reverse.address}"],
    )
    try:
        out = await asyncio.to_thread(dig, s.port, "+noall", "+answer", "-x", "10.0.0.5")
        assert out.split() == ["5.0.0.10.in-addr.arpa.", "300", "IN", "PTR", "files.corp.example."]
        # a service IP of ours in 10/8: answered from the zone, not by the stub zone
        ours = await asyncio.to_thread(dig, s.port, "+noall", "+answer", "-x", "10.43.0.20")
        assert ours.split() == [
            "20.0.43.10.in-addr.arpa.",
            "5",
            "IN",
            "PTR",
            f"web.shop.svc.{Z}.",
        ]
        other = await asyncio.to_thread(dig, s.port, "+noall", "+answer", "-x", "192.0.2.10")
        assert other.split() == ["10.2.0.192.in-addr.arpa.", "300", "IN", "PTR", "www.example.org."]
        assert asked(reverse) == [("udp", "5.0.0.10.in-addr.arpa.", "PTR")]
        assert asked(default) == [("udp", "10.2.0.192.in-addr.arpa.", "PTR")]
    finally:
        await s.server.stop()


async def test_each_zone_waits_for_its_upstreams_its_own_timeout(
    tmp_path: Path, fakes: Callable[..., FakeUpstream]
) -> None:
    silent = FakeUpstream(host="127.0.0.48", silent=True).start()
    good = fakes("127.0.0.49", www_slow_example__A=["192.0.2.50"])
    try:
        s = await start(
            tmp_path,
            upstreams=[silent.address],
            dns_forward_timeout="3",
            dns_forward_zones=[f"slow.example={silent.address},{good.address},timeout=0.3"],
        )
        try:
            forwarders = s.server.forward_zones
            assert forwarders.zones["slow.example."].timeout == 0.3
            assert forwarders.default is not None and forwarders.default.timeout == 3.0
            started = time.monotonic()
            # the silent upstream gets 0.3 s, then the next one of the zone answers
            assert first(await s.query("www.slow.example", "A")) == ["192.0.2.50"]
            took = time.monotonic() - started
            assert 0.25 <= took < 2.5, took
            assert s.metric(
                "node_services_dns_forward_errors_total", zone="slow.example.", reason="timeout"
            )
            assert (
                s.metric("node_services_dns_forward_errors_total", zone=".", reason="timeout")
                is None
            )
            started = time.monotonic()
            assert rcode(await s.query("www.example.org", "A")) == "SERVFAIL"
            assert time.monotonic() - started >= 2.9  # the default zone's 3 s
            assert (
                s.metric("node_services_dns_forward_errors_total", zone=".", reason="timeout") == 1
            )
        finally:
            await s.server.stop()
    finally:
        silent.stop()


async def test_identical_questions_in_a_stub_zone_share_one_upstream_query(
    tmp_path: Path, fakes: Callable[..., FakeUpstream]
) -> None:
    seen: list[bytes] = []

    def late(upstream: RawUpstream, data: bytes, addr: Any) -> None:
        seen.append(data)
        upstream.loop.call_later(0.3, upstream.answer, data, addr)

    default = fakes("127.0.0.50")
    with RawUpstream("127.0.0.51", on_query=late) as stub:
        s = await start(
            tmp_path,
            upstreams=[default.address],
            dns_forward_zones=[f"consul={stub.address}"],
        )
        try:
            names = ["db.service.consul", "DB.service.consul", "db.SERVICE.consul"]
            replies = await asyncio.gather(*(s.query(name, "A") for name in names))
            for name, reply in zip(names, replies, strict=True):
                assert reply.question[0].name.to_text() == name + "."
                assert first(reply) == [ip_for("db.service.consul")]
            assert [qname_text(q) for q in seen].count("db.service.consul") == 1
            assert s.metric("node_services_dns_forward_coalesced_total", zone="consul.") == 2
            assert s.metric("node_services_dns_forward_coalesced_total", zone=".") == 0
            assert default.queries == []
        finally:
            await s.server.stop()


async def test_a_loop_through_a_stub_zones_upstream_is_found_by_its_probe(
    tmp_path: Path, fakes: Callable[..., FakeUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    """The stub zone's upstream forwards every query back to us under a new ID: the zone's
    own loop probe (a random name in no stub zone) comes back and is known for what it is."""
    default = fakes("127.0.0.52")
    with (
        LoopingRelay("127.0.0.63", ("127.0.0.1", 0)) as relay,
        RawUpstream("127.0.0.54") as good,
    ):
        s = await start(
            tmp_path,
            upstreams=[default.address],
            dns_forward_zones=[f"loop.example={relay.address},{good.address},timeout=1"],
        )
        relay.target = ("127.0.0.1", s.port)
        try:
            answer = await s.query("a.loop.example", "A")
            assert first(answer) == [ip_for("a.loop.example")]  # from the next upstream
            assert s.metric("node_services_dns_forward_loops_total", zone="loop.example.") == 1
            assert s.metric("node_services_dns_forward_loops_total", zone=".") == 0
            assert f"forwarding loop: upstream {relay.address} sends our queries back" in (
                caplog.text
            )
            before = relay.queries
            assert first(await s.query("b.loop.example", "A")) == [ip_for("b.loop.example")]
            assert relay.queries == before  # skipped until the next probe
            assert default.queries == []  # the default zone forwarded nothing, probed nothing
        finally:
            await s.server.stop()


async def test_names_of_our_zones_are_never_forwarded_to_a_wider_stub_zone(
    tmp_path: Path, fakes: Callable[..., FakeUpstream]
) -> None:
    local = fakes("127.0.0.55", printer_local__A=["192.168.1.9"])
    s = await start(tmp_path, kube_cluster(), dns_forward_zones=[f"local={local.address}"])
    try:
        assert first(await s.query(f"web.shop.svc.{Z}", "A")) == ["10.43.0.20"]
        assert rcode(await s.query(f"nope.shop.svc.{Z}", "A")) == "NXDOMAIN"
        assert first(await s.query("printer.local", "A")) == ["192.168.1.9"]
        assert asked(local) == [("udp", "printer.local.", "A")]
    finally:
        await s.server.stop()


async def test_an_external_name_in_a_stub_zone_is_chased_there(
    tmp_path: Path, fakes: Callable[..., FakeUpstream]
) -> None:
    consul = fakes("127.0.0.56", db_service_consul__A=["10.9.0.8"])
    default = fakes("127.0.0.57")
    objects = [*kube_cluster(), service("shop", "consuldb", external_name="db.service.consul")]
    s = await start(
        tmp_path,
        objects,
        upstreams=[default.address],
        dns_forward_zones=[f"consul={consul.address}"],
    )
    try:
        reply = await s.query(f"consuldb.shop.svc.{Z}", "A")
        assert answers(reply) == [
            f"consuldb.shop.svc.{Z}. 5 CNAME db.service.consul.",
            "db.service.consul. 300 A 10.9.0.8",
        ]
        assert asked(consul) == [("udp", "db.service.consul.", "A")]
        assert default.queries == []
    finally:
        await s.server.stop()


async def test_without_default_upstreams_only_the_stub_zones_are_forwarded(
    tmp_path: Path, fakes: Callable[..., FakeUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    consul = fakes("127.0.0.58", web_service_consul__A=["10.9.0.7"])
    s = await start(tmp_path, resolv="", dns_forward_zones=[f"consul={consul.address}"])
    try:
        assert first(await s.query("web.service.consul", "A")) == ["10.9.0.7"]
        refused = await s.query("www.example.org", "A")
        assert rcode(refused) == "REFUSED"
        assert refused.flags & dns.flags.RA  # we do forward (some zones)
        assert s.metric("node_services_dns_forward_no_upstream_total") == 1
        assert "names outside the cluster zones and dns_forward_zones are answered REFUSED" in (
            caplog.text
        )
    finally:
        await s.server.stop()


@needs_dig
def test_daemon_takes_stub_zones_from_flags_and_environment(
    daemon: Callable[..., DaemonProcess], fakes: Callable[..., FakeUpstream], tmp_path: Path
) -> None:
    default = fakes("127.0.0.59", www_example_org__A=["192.0.2.10"])
    consul = fakes("127.0.0.60", web_service_consul__A=["10.9.0.7"])
    corp = fakes("127.0.0.61", files_corp_example__A=["10.8.0.5"])
    snapshot = write_snapshot(tmp_path / "snapshot.yaml", kube_cluster())
    process = daemon(
        "--snapshot",
        str(snapshot),
        "--upstream",
        default.address,
        "--dns-forward-zone",
        f"consul={consul.address},timeout=0.5",
        env={"NODE_SERVICES_DNS_FORWARD_ZONES": "ignored.example=127.0.0.62"},
    )
    process.wait_for(lambda: process.get("/readyz")[0] == 200, what="/readyz")

    def short(name: str) -> list[str]:
        return dig(process.dns_port, "+short", name, "A").split()

    assert short("web.service.consul") == ["10.9.0.7"]
    assert short("www.example.org") == ["192.0.2.10"]
    assert short(f"web.shop.svc.{Z}") == ["10.43.0.20"]
    assert process.metric('node_services_dns_cache_misses_total{zone="consul."}') == "1.0"
    assert process.metric('node_services_dns_cache_misses_total{zone="."}') == "1.0"
    assert "dns: names in consul. are forwarded to " + consul.address + " (timeout 0.5 s)" in (
        process.output()
    )
    # the environment alone (a flag wins over it, as for every key)
    second = daemon(
        "--snapshot",
        str(snapshot),
        "--upstream",
        default.address,
        env={
            "NODE_SERVICES_DNS_FORWARD_ZONES": f"consul={consul.address};"
            f"corp.example={corp.address}"
        },
    )
    assert dig(second.dns_port, "+short", "files.corp.example", "A").split() == ["10.8.0.5"]
    assert asked(corp) == [("udp", "files.corp.example.", "A")]
