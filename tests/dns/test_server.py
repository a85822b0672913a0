"""The server's own guards: the fast path rejects exactly what the general path rejects, the
UDP answer cache is budgeted in bytes, and TCP clients cannot hold its connection slots."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import dns.message
import dns.rcode
import pytest
from dnshelpers import (
    Z,
    answers,
    dig,
    endpoint_slice,
    kube_cluster,
    needs_dig,
    query,
    service,
    write_snapshot,
)
from dnsserve import Served, serve
from helpers import DaemonProcess

from node_services.dns.server import MAX_TCP_CLIENTS, DnsServer


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    s = await serve(kube_cluster())
    yield s
    await s.stop()


def _name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def _query(qname: bytes, *, arcount: int = 0, additional: bytes = b"", qid: int = 0x4242) -> bytes:
    return (
        struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, arcount)
        + qname
        + struct.pack("!HH", 1, 1)
        + additional
    )


def _opt(size: int = 1232, rdlen: int | None = None, rdata: bytes = b"") -> bytes:
    """An OPT record; ``rdlen`` may lie about the length of ``rdata``."""
    length = len(rdata) if rdlen is None else rdlen
    return b"\x00" + struct.pack("!HHIH", 41, size, 0, length) + rdata


WEB = _name(b"web", b"shop", b"svc", *(part.encode() for part in Z.split(".")))
LONG = _name(*([b"a" * 60] * 4), b"svc", *(part.encode() for part in Z.split(".")))
COOKIE = struct.pack("!HH", 10, 8) + b"\x01" * 8


def _paths(server: DnsServer, packet: bytes) -> tuple[bytes, bytes]:
    """The reply of the fast path (which may hand over to the general path) and of the
    general path alone."""
    fast = server._answer_current(packet, False)
    general = server._answer(packet, False)
    assert isinstance(fast, bytes) and isinstance(general, bytes)
    return fast, general


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(_query(LONG), id="name-over-255-bytes"),
        pytest.param(_query(LONG, arcount=1, additional=_opt()), id="long-name-with-edns"),
        pytest.param(_query(WEB, arcount=1, additional=_opt(rdlen=12)), id="opt-past-the-end"),
        pytest.param(
            _query(WEB, arcount=1, additional=_opt(rdlen=40, rdata=COOKIE)),
            id="opt-options-past-the-end",
        ),
        pytest.param(_query(WEB, arcount=2, additional=_opt() + _opt()), id="two-opt-records"),
        pytest.param(
            _query(WEB, arcount=2, additional=_opt(rdata=COOKIE) + _opt(size=4096)),
            id="two-opt-records-with-options",
        ),
    ],
)
async def test_fast_path_answers_formerr_where_the_general_path_does(
    served: Served, packet: bytes
) -> None:
    fast, general = _paths(served.server, packet)
    assert fast == general
    assert fast[:2] == packet[:2] and fast[2] & 0x80 and fast[3] & 0xF == dns.rcode.FORMERR
    # Over the real socket, and a reply dnspython can read.
    reply = await served.raw(packet)
    assert reply == fast
    message = dns.message.from_wire(reply)
    assert message.id == 0x4242 and message.rcode() == dns.rcode.FORMERR


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(_query(WEB), id="plain"),
        pytest.param(_query(WEB, arcount=1, additional=_opt(rdata=COOKIE)), id="opt-with-cookie"),
        pytest.param(_query(WEB, arcount=1, additional=_opt() + b"\x00\x00"), id="trailing-bytes"),
        pytest.param(
            _query(WEB, arcount=1, additional=_opt(rdlen=4, rdata=COOKIE)),
            id="opt-shorter-than-its-bytes",
        ),
    ],
)
async def test_well_formed_queries_get_the_same_answer_on_both_paths(
    served: Served, packet: bytes
) -> None:
    fast, general = _paths(served.server, packet)
    assert fast == general
    message = dns.message.from_wire(await served.raw(packet) or b"")
    assert message.rcode() == dns.rcode.NOERROR
    assert answers(message) == [f"web.shop.svc.{Z}. 5 A 10.43.0.20"]


async def test_a_name_of_exactly_255_bytes_is_nxdomain_on_both_paths(served: Served) -> None:
    # 53 + 3 * 61 + 4 ("svc") + 8 ("cluster") + 6 ("local") + 1 (the root) = 255 bytes.
    padded = _name(b"c" * 52, *([b"b" * 60] * 3), b"svc", b"cluster", b"local")
    assert len(padded) == 255
    fast, general = _paths(served.server, _query(padded))
    assert fast == general
    message = dns.message.from_wire(fast)
    assert message.rcode() == dns.rcode.NXDOMAIN


def _status_kib(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (the peak resident size) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


def _flood_unique_names(port: int, *, seconds: float, limit: int) -> int:
    """Unique in-zone names (NXDOMAIN, answered and cached by the fast path), each query
    padded with a 3 KB EDNS option so the keys are big; up to ``limit`` queries, 32 in
    flight. Returns how many were answered."""
    padding = struct.pack("!HH", 12, 3000) + b"\x00" * 3000
    opt = _opt(rdata=padding)
    answered = 0
    sent = 0
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        sock.settimeout(0.5)
        while sent < limit and time.monotonic() < deadline:
            for _ in range(32):
                qname = _name(b"u%08x" % sent, b"svc", b"cluster", b"local")
                sock.send(_query(qname, arcount=1, additional=opt, qid=sent & 0xFFFF))
                sent += 1
            for _ in range(32):
                try:
                    sock.recv(4096)
                except TimeoutError:
                    break
                answered += 1
    return answered


def test_unique_names_with_big_queries_grow_rss_by_less_than_100_mb(
    daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    snapshot = write_snapshot(tmp_path / "cluster.yaml", kube_cluster())
    # An upstream that never answers: nothing here leaves the cluster zone anyway.
    process = daemon("--snapshot", str(snapshot), "--upstream", "127.0.0.1:1")
    process.wait_for(lambda: process.get("/readyz")[0] == 200, what="readyz")
    assert process.proc is not None
    before = _status_kib(process.proc.pid, "VmRSS")
    # 60,000 queries of ~3.1 KB, under the 65,536-entry cap: ~200 MB of keys if uncapped.
    answered = _flood_unique_names(process.dns_port, seconds=12, limit=60_000)
    grown_mb = (_status_kib(process.proc.pid, "VmRSS") - before) / 1024
    peak_mb = (_status_kib(process.proc.pid, "VmHWM") - before) / 1024
    assert answered > 30_000, answered  # enough to cost > 100 MB at 3.3 KB an entry
    assert grown_mb < 100, f"RSS grew {grown_mb:.0f} MB for {answered} queries"
    assert peak_mb < 100, f"peak RSS grew {peak_mb:.0f} MB for {answered} queries"
    held = float(process.metric("node_services_dns_answer_cache_bytes"))
    assert 0 < held <= 32 << 20
    entries = float(process.metric("node_services_dns_answer_cache_entries"))
    assert 0 < entries <= held / 3000
    response = query(process.dns_port, f"web.shop.svc.{Z}")
    assert answers(response) == [f"web.shop.svc.{Z}. 5 A 10.43.0.20"]


HUGE = f"huge.shop.svc.{Z}"


@pytest.fixture
def tcp_daemon(daemon: Callable[..., DaemonProcess], tmp_path: Path) -> DaemonProcess:
    """A daemon whose HUGE answers 1,000 A records (~16 KB over TCP)."""
    objects = [
        *kube_cluster(),
        service("shop", "huge", cluster_ips=None),
        endpoint_slice(
            "shop",
            "huge",
            "huge-1",
            [{"ip": f"10.44.{i // 250}.{i % 250 + 1}"} for i in range(1000)],
        ),
    ]
    snapshot = write_snapshot(tmp_path / "cluster.yaml", objects)
    process = daemon("--snapshot", str(snapshot), "--upstream", "127.0.0.1:1")
    process.wait_for(lambda: process.get("/readyz")[0] == 200, what="readyz")
    return process


def _timed_dig_tcp(port: int) -> tuple[float, list[str]]:
    started = time.monotonic()
    out = dig(port, "+tcp", "+short", f"web.shop.svc.{Z}", "A", timeout=3)
    return time.monotonic() - started, out.split()


def _tcp_query(name: str, qid: int) -> bytes:
    packet = dns.message.make_query(name, "A", id=qid).to_wire()
    return len(packet).to_bytes(2, "big") + packet


@needs_dig
def test_a_fresh_tcp_query_is_answered_while_256_clients_never_read(
    tcp_daemon: DaemonProcess,
) -> None:
    process = tcp_daemon
    assert process.proc is not None
    before = _status_kib(process.proc.pid, "VmRSS")
    # 256 connections each asking 20 x 16 KB and reading nothing (their receive buffers are
    # small): their answers fill every buffer between us and them.
    pipelined = b"".join(_tcp_query(HUGE, i) for i in range(20))
    attackers = []
    try:
        for _ in range(MAX_TCP_CLIENTS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", process.dns_port))
            sock.sendall(pipelined)
            attackers.append(sock)
        elapsed, out = _timed_dig_tcp(process.dns_port)
        assert out == ["10.43.0.20"]
        assert elapsed < 1.5, f"dig +tcp took {elapsed:.2f} s"
        # The silent readers are cut off once their queue is full and 2 s pass.
        process.wait_for(
            lambda: (
                float(process.metric('node_services_dns_tcp_closed_total{reason="write_timeout"}'))
                >= MAX_TCP_CLIENTS - 10
            ),
            what="write timeouts",
            timeout=8,
        )
        grown_mb = (_status_kib(process.proc.pid, "VmHWM") - before) / 1024
        assert grown_mb < 100, f"peak RSS grew {grown_mb:.0f} MB"
        for sock in attackers[-5:]:
            # (up to 10 may still be within their 2 s when the count above is reached)
            sock.settimeout(10)
            with pytest.raises(ConnectionResetError):
                while sock.recv(65536):
                    pass
    finally:
        for sock in attackers:
            sock.close()


@needs_dig
def test_a_fresh_tcp_query_is_answered_while_256_clients_sit_idle(
    tcp_daemon: DaemonProcess,
) -> None:
    process = tcp_daemon
    idle = []
    try:
        for _ in range(MAX_TCP_CLIENTS):
            idle.append(socket.create_connection(("127.0.0.1", process.dns_port)))
        process.wait_for(
            lambda: float(process.metric("node_services_dns_tcp_connections")) >= MAX_TCP_CLIENTS,
            what="every TCP slot taken",
        )
        elapsed, out = _timed_dig_tcp(process.dns_port)
        assert out == ["10.43.0.20"]
        assert elapsed < 1.5, f"dig +tcp took {elapsed:.2f} s"
        evicted = process.metric('node_services_dns_tcp_closed_total{reason="evicted"}')
        assert evicted == "1.0"  # the oldest idle one made room; dig's own left with dig
        # The oldest idle connection was the one closed; the newest still works.
        idle[0].settimeout(2)
        assert idle[0].recv(1) == b""
        newest = idle[-1]
        newest.settimeout(2)
        newest.sendall(_tcp_query(f"web.shop.svc.{Z}", 7))
        size = int.from_bytes(newest.recv(2), "big")
        reply = b""
        while len(reply) < size:
            reply += newest.recv(size - len(reply))
        assert answers(dns.message.from_wire(reply)) == [f"web.shop.svc.{Z}. 5 A 10.43.0.20"]
    finally:
        for sock in idle:
            sock.close()
