"""The forward cache's byte budget: entries cost what they take in memory (keys and
bookkeeping included), the least recently used go first, and a real daemon flooded with
unique forwarded names stays within its memory."""

from __future__ import annotations

import gc
import re
import socket
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from fakes.dns_upstream import RawUpstream, make_query
from helpers import DaemonProcess
from prometheus_client import CollectorRegistry

from node_services.config import ConfigError, load_settings
from node_services.dns import wire
from node_services.dns.forward_cache import ResponseCache, entry_cost
from node_services.dns.metrics import DnsStats
from node_services.dns.service import build_dns
from node_services.state.store import Store


def _response(name: str, records: int, qid: int = 0x1234) -> bytes:
    head = wire.HEADER.pack(qid, 0x8180, 1, records, 0, 0)
    body = b"".join(
        wire.rr(wire.QNAME_POINTER, wire.A, 300, bytes([192, 0, 2, i])) for i in range(records)
    )
    return head + wire.encode_name(name) + struct.pack("!HH", wire.A, 1) + body


def _cache(max_bytes: int, max_entries: int = 1 << 30) -> ResponseCache:
    # Serve-stale and prefetch on: every per-entry deadline is its own object.
    return ResponseCache(
        stats=DnsStats(),
        max_bytes=max_bytes,
        max_entries=max_entries,
        negative_ttl_cap=300,
        serve_stale=3600,
        prefetch=10,
    )


def test_accounted_bytes_cover_what_entries_really_take() -> None:
    """tracemalloc measures what storing entries allocates (the key, the response and the
    name as the server would allocate them, plus the cache's own objects): the budget's
    accounting must not undercount it (keys and overhead included), nor overcount wildly."""
    for records in (1, 4, 20):
        cache = _cache(1 << 40)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(5000):
                name = f"host-{i}.example.org"
                lname = wire.encode_name(name)  # as parse_query slices it from the packet
                cache.store((lname, wire.A, 1, 9), _response(name, records))
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert used <= cache.bytes <= used * 1.5, (records, used, cache.bytes)


def test_cache_evicts_least_recently_used_to_stay_within_its_byte_budget() -> None:
    names = [f"n{i}.example.org" for i in range(4)]
    keys = [(wire.encode_name(n), wire.A, 1, 9) for n in names]
    cost = entry_cost(keys[0][0], _response(names[0], 2), 2)
    cache = _cache(3 * cost)  # room for three
    for key, name in zip(keys[:3], names[:3], strict=True):
        cache.store(key, _response(name, 2))
    assert len(cache) == 3 and cache.bytes == 3 * cost
    question = wire.encode_name(names[0]) + b"\x00\x01\x00\x01"
    assert cache.get(keys[0], 7, question) is not None  # n0 is now the most recent
    cache.store(keys[3], _response(names[3], 2))
    assert cache.get(keys[1], 7, question) is None  # n1 was the least recently used
    assert [cache.get(k, 7, question) is not None for k in (keys[0], keys[2], keys[3])] == [
        True,
        True,
        True,
    ]
    assert cache.bytes == 3 * cost == cache.stats.cache_bytes
    # An answer bigger than the whole budget is not kept (and evicts nothing).
    cache.store((b"\x03big\x00", wire.A, 1, 9), _response("big", 200))
    assert len(cache) == 3


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1))


def test_daemon_memory_stays_bounded_under_unique_forwarded_names(
    daemon: Callable[..., DaemonProcess],
) -> None:
    """12 s of unique names, each answered by the upstream with a 1.2 KB record: the cache
    fills its byte budget (16 MiB by default; the entry cap raised so it does not bind) and
    the daemon's RSS grows by less than 100 MB."""
    with RawUpstream("127.0.0.15", txt=1200) as upstream:
        process = daemon(
            "--upstream", upstream.address, env={"NODE_SERVICES_DNS_CACHE_SIZE": "100000000"}
        )
        assert process.proc is not None
        pid = process.proc.pid
        port = process.dns_port
        before = _rss_kib(pid)
        answered = sent = settled = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.settimeout(0.5)
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline:
                # A window of 64 outstanding queries; unanswered ones are given up on.
                while sent - settled < 64:
                    name = f"u{sent}-{'x' * 40}.flood.example.org"
                    sock.sendto(make_query(name, sent & 0xFFFF, edns=4096), ("127.0.0.1", port))
                    sent += 1
                try:
                    sock.recv(65535)
                    answered += 1
                    settled += 1
                except TimeoutError:
                    settled = sent
        grown_mb = (_rss_kib(pid) - before) / 1024
        cache_bytes = float(process.metric('node_services_dns_cache_bytes{zone="."}'))
        entries = float(process.metric('node_services_dns_cache_entries{zone="."}'))
    assert answered > 5000, answered  # enough names to fill the budget several times over
    assert 0.9 * 16 * 2**20 <= cache_bytes <= 16 * 2**20, cache_bytes
    assert entries < answered
    assert grown_mb < 100, grown_mb


def test_cache_budget_and_socket_pool_come_from_settings() -> None:
    settings = load_settings(
        environ={
            "NODE_NAME": "n",
            "NODE_SERVICES_DNS_CACHE_BYTES": "1048576",
            "NODE_SERVICES_DNS_UPSTREAM_SOCKETS": "4",
            "NODE_SERVICES_UPSTREAMS": "127.0.0.20:53",
        }
    )
    server = build_dns(settings, Store(), CollectorRegistry())
    assert server.forwarder is not None
    assert server.forwarder.cache.max_bytes == 1048576
    assert server.forwarder.pool.size == 4
    assert load_settings(environ={"NODE_NAME": "n"}).dns_cache_bytes == 16 * 2**20
    try:
        load_settings(
            environ={"NODE_NAME": "n"},
            overrides={"dns_upstream_sockets": "0", "dns_cache_bytes": "lots"},
        )
    except ConfigError as exc:
        assert len(exc.problems) == 2, exc.problems
        assert any("dns_upstream_sockets" in p and "at least 1" in p for p in exc.problems)
        assert any("dns_cache_bytes" in p and "whole number" in p for p in exc.problems)
    else:
        raise AssertionError("bad values accepted")
