"""Rule 3: protocol behaviour — UDP/TCP, EDNS sizes, truncation, case, flags, NXDOMAIN vs
NODATA, SERVFAIL before sync, one question, ANY, malformed packets."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Iterator

import dns.flags
import dns.message
import dns.rcode
import pytest
from dnshelpers import Z, answers, dig, kube_cluster, needs_dig, rcode, write_snapshot
from dnsserve import Served, serve
from helpers import DaemonProcess


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("proto")
    snapshot = write_snapshot(tmp / "cluster.yaml", kube_cluster())
    process = DaemonProcess(
        ["--snapshot", str(snapshot), "--upstream", "127.0.0.1:1"], tmp / "daemon.log"
    ).start()
    process.wait_for(lambda: process.get("/readyz")[0] == 200, what="readyz")
    yield process.dns_port
    process.stop()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    s = await serve(kube_cluster())
    yield s
    await s.stop()


BIG = f"big.shop.svc.{Z}"
BIG_IPS = sorted(f"10.42.3.{i}" for i in range(1, 61))


@needs_dig
def test_tcp_answers_the_same(port: int) -> None:
    out = dig(port, "+tcp", "+noall", "+answer", f"web.shop.svc.{Z}", "A")
    assert out.split() == [f"web.shop.svc.{Z}.", "5", "IN", "A", "10.43.0.20"]


@needs_dig
def test_truncated_60_endpoints_then_dig_retries_over_tcp(port: int) -> None:
    # Without EDNS: 512 bytes, TC=1 with as many whole records as fit.
    out = dig(port, "+noedns", "+ignore", "+noall", "+comments", "+answer", BIG, "A")
    assert "flags: qr aa tc rd ra;" in out
    truncated = [line for line in out.splitlines() if "\tA\t" in line or " A " in line]
    assert 20 <= len(truncated) < 60
    # dig follows TC=1 to TCP by itself and gets all 60.
    full = dig(port, "+noedns", "+short", BIG, "A").split()
    assert sorted(full) == BIG_IPS


async def test_udp_size_without_edns_is_512(served: Served) -> None:
    response = await served.query(BIG, "A", use_edns=False)
    assert response.flags & dns.flags.TC
    wire = response.to_wire()
    assert len(wire) <= 512
    assert len(response.answer[0]) == (512 - 12 - len(BIG) - 2 - 4) // 16
    assert {str(r) for r in response.answer[0]} <= set(BIG_IPS)


async def test_edns_buffer_size_is_honoured_and_opt_echoed(served: Served) -> None:
    small = await served.query(BIG, "A", use_edns=0, payload=700)
    assert small.flags & dns.flags.TC
    assert small.edns == 0 and len(small.to_wire()) <= 700
    full = await served.query(BIG, "A", use_edns=0, payload=4096)
    assert not full.flags & dns.flags.TC
    assert sorted(str(r) for r in full.answer[0]) == BIG_IPS
    assert full.edns == 0 and full.payload == 1232


async def test_tcp_has_no_size_limit(served: Served) -> None:
    response = await served.query(BIG, "A", tcp=True, use_edns=False)
    assert not response.flags & dns.flags.TC
    assert len(response.answer[0]) == 60


async def test_case_insensitive_and_client_case_echoed(served: Served) -> None:
    response = await served.query("WeB.ShOp.SVC.Cluster.LOCAL", "A")
    assert response.question[0].name.to_text() == "WeB.ShOp.SVC.Cluster.LOCAL."
    assert answers(response) == ["WeB.ShOp.SVC.Cluster.LOCAL. 5 A 10.43.0.20"]


async def test_aa_on_authoritative_answers_and_no_ra_without_forwarding(served: Served) -> None:
    response = await served.query(f"web.shop.svc.{Z}", "A")
    assert response.flags & dns.flags.AA
    assert not response.flags & dns.flags.RA
    assert rcode(await served.query("example.com", "A")) == "REFUSED"


@needs_dig
def test_ra_when_forwarding_is_enabled(port: int) -> None:
    out = dig(port, "+noall", "+comments", f"web.shop.svc.{Z}", "A")
    assert "flags: qr aa rd ra;" in out


async def test_nodata_vs_nxdomain_with_soa_minimum_equal_to_ttl(served: Served) -> None:
    nodata = await served.query(f"web.shop.svc.{Z}", "TXT")
    assert rcode(nodata) == "NOERROR" and nodata.answer == []
    (soa,) = nodata.authority
    assert soa.ttl == 5 and soa[0].minimum == 5 and soa.name.to_text() == f"{Z}."
    nx = await served.query(f"nope.shop.svc.{Z}", "A")
    assert rcode(nx) == "NXDOMAIN" and nx.authority[0][0].minimum == 5
    # Parents of real names: NODATA (RFC 8020 empty non-terminals).
    for parent in (f"_tcp.web.shop.svc.{Z}", f"shop.svc.{Z}", f"svc.{Z}", f"pod.{Z}"):
        response = await served.query(parent, "A")
        assert rcode(response) == "NOERROR" and response.answer == [], parent
    # ndots:5 search-path expansions of real names: NXDOMAIN.
    for expansion in (
        f"web.shop.svc.{Z}.shop.svc.{Z}",
        f"web.shop.svc.{Z}.svc.{Z}",
        f"web.shop.svc.{Z}.{Z}",
        f"web.shop.shop.svc.{Z}",
    ):
        assert rcode(await served.query(expansion, "A")) == "NXDOMAIN", expansion


async def test_servfail_for_cluster_names_until_synced() -> None:
    s = await serve(kube_cluster(), synced=False)
    try:
        assert rcode(await s.query(f"web.shop.svc.{Z}", "A")) == "SERVFAIL"
        assert rcode(await s.query(f"nope.svc.{Z}", "A")) == "SERVFAIL"
        s.store.mark_synced("static:test")
        response = await s.query(f"web.shop.svc.{Z}", "A")
        assert answers(response) == [f"web.shop.svc.{Z}. 5 A 10.43.0.20"]
    finally:
        await s.stop()


def _query_bytes(name: str, qtype: int = 1, qdcount: int = 1, flags: int = 0x0100) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", 0x1234, flags, qdcount, 0, 0, 0) + (
        qname + struct.pack("!HH", qtype, 1)
    ) * max(qdcount, 1)


async def test_one_question_only_else_formerr(served: Served) -> None:
    reply = await served.raw(_query_bytes(f"web.shop.svc.{Z}", qdcount=2))
    assert reply is not None
    assert reply[:2] == b"\x12\x34" and reply[2] & 0x80 and reply[3] & 0xF == 1  # FORMERR
    reply = await served.raw(_query_bytes(f"web.shop.svc.{Z}", qdcount=0))
    assert reply is not None and reply[3] & 0xF == 1


async def test_any_is_answered_minimally(served: Served) -> None:
    response = await served.query(f"web.shop.svc.{Z}", "ANY")
    # RFC 8482: one RRset, not everything the name has (A here, not also AAAA).
    assert answers(response) == [f"web.shop.svc.{Z}. 5 A 10.43.0.20"]


async def test_other_opcodes_notimp_and_edns_version_badvers(served: Served) -> None:
    reply = await served.raw(_query_bytes(f"web.shop.svc.{Z}", flags=0x2000 | 0x0100))  # UPDATE
    assert reply is not None and reply[3] & 0xF == dns.rcode.NOTIMP
    response = await served.query(f"web.shop.svc.{Z}", "A", use_edns=1)
    assert response.rcode() == dns.rcode.BADVERS


async def test_malformed_packets_dropped_or_formerr_and_serving_goes_on(served: Served) -> None:
    assert await served.raw(b"\x00\x01\x02", wait=0.2) is None  # shorter than a header
    response_bit = bytearray(_query_bytes(f"web.shop.svc.{Z}"))
    response_bit[2] |= 0x80
    assert await served.raw(bytes(response_bit), wait=0.2) is None  # a response: dropped
    cut = _query_bytes(f"web.shop.svc.{Z}")[:-3]
    reply = await served.raw(cut)
    assert reply is not None and reply[3] & 0xF == 1  # FORMERR
    pointer = struct.pack("!HHHHHH", 7, 0x100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
    reply = await served.raw(pointer)
    assert reply is not None and reply[3] & 0xF == 1
    assert served.stats.dropped["malformed"] >= 4
    assert answers(await served.query(f"web.shop.svc.{Z}", "A")) == [
        f"web.shop.svc.{Z}. 5 A 10.43.0.20"
    ]


async def test_tcp_pipelined_queries_on_one_connection(served: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        for i, name in enumerate((f"web.shop.svc.{Z}", f"db.shop.svc.{Z}", "nope.svc." + Z)):
            wire = dns.message.make_query(name, "A", id=i + 1).to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        codes = []
        for _ in range(3):
            size = int.from_bytes(await reader.readexactly(2), "big")
            message = dns.message.from_wire(await reader.readexactly(size))
            codes.append((message.id, rcode(message)))
        assert codes == [(1, "NOERROR"), (2, "NOERROR"), (3, "NXDOMAIN")]
    finally:
        writer.close()


async def test_pod_records_insecure_and_disabled() -> None:
    insecure = await serve(kube_cluster(), pod_records="insecure")
    disabled = await serve(kube_cluster(), pod_records="disabled")
    try:
        name = f"1-2-3-4.anyns.pod.{Z}"
        assert answers(await insecure.query(name, "A")) == [f"{name}. 5 A 1.2.3.4"]
        assert rcode(await insecure.query(f"1-2-3.anyns.pod.{Z}", "A")) == "NXDOMAIN"
        assert rcode(await insecure.query(f"1-2-3-999.anyns.pod.{Z}", "A")) == "NXDOMAIN"
        assert rcode(await disabled.query(name, "A")) == "NXDOMAIN"
        assert rcode(await disabled.query(f"10-42-1-40.shop.pod.{Z}", "A")) == "NXDOMAIN"
    finally:
        await insecure.stop()
        await disabled.stop()


async def test_badvers_is_counted_by_name(served: Served) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from node_services.dns.metrics import DnsCollector

    response = await served.query(f"web.shop.svc.{Z}", "A", use_edns=1)
    assert response.rcode() == dns.rcode.BADVERS
    registry = CollectorRegistry()
    registry.register(DnsCollector(served.stats))
    text = generate_latest(registry).decode()
    assert 'node_services_dns_responses_total{rcode="BADVERS"} 1.0' in text
    assert 'rcode="16"' not in text
