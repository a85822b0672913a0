"""The forwarder's shared UDP socket pool: few file descriptors for many queries in flight,
random ports and IDs, answers only from the queried address and port, for the question asked."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from dnsserve import serve
from fakes.dns_upstream import RawUpstream, ask_many, ip_for, make_query, response
from helpers import DaemonProcess, free_port

from node_services.dns import wire
from node_services.dns.forward import Forwarder
from node_services.dns.metrics import DnsStats
from node_services.dns.upstream import Question, UdpPool, UpstreamError


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _a_record(answer: bytes) -> str:
    assert answer[3] & 0xF == 0 and answer[6:8] == b"\x00\x01", answer
    return socket.inet_ntoa(answer[-4:])


def test_thousand_forwards_in_flight_share_a_few_sockets(
    daemon: Callable[..., DaemonProcess],
) -> None:
    with RawUpstream("127.0.0.6", delay=2.0) as slow:
        process = daemon("--upstream", slow.address, "--dns-forward-timeout", "6")
        assert process.proc is not None
        pid = process.proc.pid
        idle = _fds(pid)
        names = [f"host-{i}.example.org" for i in range(1000)]
        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(ask_many, process.dns_port, names, timeout=15)
            deadline = time.monotonic() + 8
            while slow.queries < 1001 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert slow.queries == 1001  # all in flight (and a loop probe): answers after 2 s
            in_flight = max(_fds(pid) for _ in range(5))
            answers = asked.result()
        # The pool's 16 sockets and nothing per query (before: one socket each, 1000 fds).
        assert in_flight <= idle + 16 + 2, (idle, in_flight)
        assert 2 <= len(slow.sources) <= 16  # queries spread over the pool's random ports
        assert len(answers) == 1000
        assert {i: _a_record(a) for i, a in answers.items()} == {
            i: ip_for(name) for i, name in enumerate(names)
        }
        for i, a in answers.items():
            assert a[12 : 12 + len(names[i]) + 2] == make_query(names[i], i)[12:-4]


async def test_spoofed_answers_from_elsewhere_or_for_another_question_are_ignored() -> None:
    """Forged answers reach the pool's socket before the real one: from the upstream's
    address but another port, from another address with the upstream's port, with another
    ID, and with the right ID but another question. Only the real answer is taken."""
    forged_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    forged_port.bind(("127.0.0.7", 0))
    forged_host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def spoof(upstream: RawUpstream, data: bytes, addr: Any) -> None:
        forged = response(data, ip="203.0.113.66")
        forged_port.sendto(forged, addr)
        forged_host.sendto(forged, addr)
        other_id = bytes([data[0] ^ 0x55, data[1]]) + forged[2:]
        upstream.send(other_id, addr)
        other_question = response(make_query("evil.example.org", 0), ip="203.0.113.66")
        upstream.send(data[0:2] + other_question[2:], addr)
        upstream.loop.call_later(0.1, upstream.send, response(data, ip="192.0.2.10"), addr)

    with RawUpstream("127.0.0.7", on_query=spoof) as upstream:
        forged_host.bind(("127.0.0.8", upstream.port))
        s = await serve([], upstreams=((upstream.host, upstream.port),), forward_timeout=2.0)
        try:
            answer = await s.query("www.example.org", "A")
            assert [str(r) for rrset in answer.answer for r in rrset] == ["192.0.2.10"]
            assert s.stats.forward_ignored == {"unexpected": 3, "mismatch": 1}
            assert s.stats.forward_errors == {}
        finally:
            await s.stop()
            forged_port.close()
            forged_host.close()


class _Scripted:
    """randbits returning a script of values, then random ones."""

    def __init__(self, *values: int) -> None:
        self.values = list(values)

    def __call__(self, bits: int) -> int:
        return self.values.pop(0) if self.values else int.from_bytes(os.urandom(2), "big")


async def test_id_collision_on_a_socket_draws_another_id() -> None:
    seen: list[int] = []

    def late(upstream: RawUpstream, data: bytes, addr: Any) -> None:
        seen.append(data[0] << 8 | data[1])
        upstream.loop.call_later(0.2, upstream.answer, data, addr)

    stats = DnsStats()
    # Socket index 0 and ID 7 for the first query; index 0 and ID 7 (taken) then 9.
    pool = UdpPool(stats=stats, size=1, randbits=_Scripted(0, 7, 0, 7, 9))
    with RawUpstream("127.0.0.9", on_query=late) as upstream:
        forwarder = Forwarder(((upstream.host, upstream.port),), stats=stats, pool=pool)
        try:
            first, second = await asyncio.gather(
                forwarder.resolve_name("one.example.org", wire.A),
                forwarder.resolve_name("two.example.org", wire.A),
            )
        finally:
            forwarder.close()
    assert sorted(seen) == [7, 9]
    assert stats.forward_id_collisions == 1
    assert _a_record(first) == ip_for("one.example.org")
    assert _a_record(second) == ip_for("two.example.org")


async def test_sockets_are_renewed_on_new_random_ports() -> None:
    stats = DnsStats()
    pool = UdpPool(stats=stats, size=1, renew_after=3)
    with RawUpstream("127.0.0.10") as upstream:
        forwarder = Forwarder(((upstream.host, upstream.port),), stats=stats, pool=pool)
        try:
            for i in range(9):
                answer = await forwarder.resolve_name(f"n{i}.example.org", wire.A)
                assert _a_record(answer) == ip_for(f"n{i}.example.org")
                assert pool.sockets <= 1  # a retired socket closes once answered
        finally:
            forwarder.close()
    assert len(upstream.sources) == 3  # three ports, three queries each


async def test_unreachable_upstream_fails_over_at_once() -> None:
    """Port unreachable (ICMP) on the shared, unconnected socket still fails the query at
    once, so the next upstream answers long before the timeout."""
    with RawUpstream("127.0.0.11") as upstream:
        closed = free_port("127.0.0.11")
        s = await serve(
            [],
            upstreams=(("127.0.0.11", closed), (upstream.host, upstream.port)),
            forward_timeout=2.0,
        )
        try:
            started = time.monotonic()
            answer = await s.query("www.example.org", "A")
            assert time.monotonic() - started < 1.0
            assert [str(r) for rrset in answer.answer for r in rrset] == [ip_for("www.example.org")]
            assert s.stats.forward_errors == {"error": 1}
        finally:
            await s.stop()


async def test_pool_refuses_when_every_id_is_taken() -> None:
    stats = DnsStats()
    pool = UdpPool(stats=stats, size=1, randbits=lambda bits: 0)
    question = Question(wire.encode_name("a.example.org"), wire.A, 1)
    query = bytearray(make_query("a.example.org", 0))
    try:
        first = pool.send(query, ("127.0.0.12", 9), question)
        with pytest.raises(UpstreamError, match="no free query ID"):
            pool.send(query, ("127.0.0.12", 9), question)
        first.release()
        pool.send(query, ("127.0.0.12", 9), question).release()  # free again
    finally:
        pool.close()


async def test_ipv6_upstream_written_unusually_is_matched() -> None:
    """Answers are matched on the address as the kernel reports it: an upstream written
    "0:0::1" still gets its answers from "::1" taken."""
    loop = asyncio.get_running_loop()
    server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    server.bind(("::1", 0))
    server.setblocking(False)

    def answer() -> None:
        data, addr = server.recvfrom(4096)
        server.sendto(response(data), addr)

    loop.add_reader(server.fileno(), answer)
    stats = DnsStats()
    forwarder = Forwarder((("0:0::1", server.getsockname()[1]),), stats=stats)
    try:
        reply = await forwarder.resolve_name("v6.example.org", wire.A)
        assert _a_record(reply) == ip_for("v6.example.org")
        assert stats.forward_ignored == {} and stats.forward_errors == {}
    finally:
        forwarder.close()
        loop.remove_reader(server.fileno())
        server.close()
