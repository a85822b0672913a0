"""Forwarding names outside the cluster zones: upstreams in order, TCP retry on TC, a bounded
TTL-honouring cache (negative answers per RFC 2308), a concurrency cap and loop detection."""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from node_services.dns import wire
from node_services.dns.metrics import DnsStats

log = logging.getLogger(__name__)

MAX_POSITIVE_TTL: Final = 3600
_TTL: Final = struct.Struct("!I")
_LOOPBACK_PREFIXES: Final = ("127.", "::1")


def upstreams_from_resolv_conf(
    path: Path = Path("/etc/resolv.conf"),
) -> tuple[tuple[str, int], ...]:
    """The nameservers of a resolv.conf, without loopback stubs (systemd-resolved, us)."""
    try:
        text = path.read_text()
    except OSError:
        return ()
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            host = parts[1].split("%", 1)[0]
            if not host.startswith(_LOOPBACK_PREFIXES):
                found.append((host, 53))
    return tuple(found)


class UpstreamError(Exception):
    """An upstream did not give a usable answer."""


@dataclass(slots=True)
class _Cached:
    response: bytes  # as received, ID and question from the first asker
    stored: float
    expires: float
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, future: asyncio.Future[bytes], qid: int) -> None:
        self.future = future
        self.qid = qid

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if len(data) >= 12 and data[0] << 8 | data[1] == self.qid and not self.future.done():
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Forwarder:
    """Sends queries upstream and caches the answers."""

    def __init__(
        self,
        upstreams: tuple[tuple[str, int], ...],
        *,
        stats: DnsStats,
        timeout: float = 2.0,
        cache_size: int = 10000,
        max_inflight: int = 1000,
        negative_ttl_cap: int = 300,
    ) -> None:
        self.upstreams = upstreams
        self.stats = stats
        self.timeout = timeout
        self.cache_size = cache_size
        self.max_inflight = max_inflight
        self.negative_ttl_cap = negative_ttl_cap
        self._cache: OrderedDict[tuple[bytes, int, int, bool], _Cached] = OrderedDict()
        self._ours: set[tuple[int, bytes, int]] = set()

    def is_own_query(self, qid: int, lname: bytes, qtype: int) -> bool:
        """Whether a query reaching us is one we sent upstream ourselves: a forwarding loop."""
        return (qid, lname, qtype) in self._ours

    def overloaded(self) -> bool:
        return self.stats.forward_inflight >= self.max_inflight

    def cached(self, q: wire.Query) -> bytes | None:
        """The cached response for this query (ID, question and TTLs patched), if fresh."""
        key = (q.lname, q.qtype, q.qclass, q.edns)
        entry = self._cache.get(key)
        if entry is None:
            return None
        now = time.monotonic()
        if now >= entry.expires:
            del self._cache[key]
            self.stats.cache_entries = len(self._cache)
            return None
        self._cache.move_to_end(key)
        elapsed = int(now - entry.stored)
        out = bytearray(entry.response)
        out[0:2] = q.qid.to_bytes(2, "big")
        out[12 : 12 + len(q.question)] = q.question
        if elapsed:
            for offset, ttl in zip(entry.ttl_offsets, entry.ttls, strict=True):
                _TTL.pack_into(out, offset, max(0, ttl - elapsed))
        return bytes(out)

    async def resolve(self, q: wire.Query, data: bytes) -> bytes:
        """The upstream answer to a client's query (ID and question as the client sent them).

        Raises :class:`UpstreamError` when every upstream failed."""
        self.stats.cache_misses += 1
        query = bytearray(data)
        response = await self._exchange(query, q.lname, q.qtype)
        self._store(q, response)
        out = bytearray(response)
        out[0:2] = q.qid.to_bytes(2, "big")
        out[12 : 12 + len(q.question)] = q.question
        return bytes(out)

    async def resolve_name(self, name: str, qtype: int) -> bytes:
        """Resolve a name we need ourselves (an ExternalName target); the raw response."""
        qname = wire.encode_name(name)
        query = bytearray(
            wire.HEADER.pack(0, wire.RD, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)
        )
        return await self._exchange(query, qname, qtype)

    async def _exchange(self, query: bytearray, lname: bytes, qtype: int) -> bytes:
        self.stats.forward_inflight += 1
        try:
            for host, port in self.upstreams:
                qid = random.getrandbits(16)
                query[0:2] = qid.to_bytes(2, "big")
                marker = (qid, lname, qtype)
                self._ours.add(marker)
                started = time.perf_counter()
                try:
                    response = await self._udp(bytes(query), host, port, qid)
                    if response[2] & 0x02:  # TC: the answer did not fit, ask again over TCP
                        self.stats.forward_tcp_retries += 1
                        response = await self._tcp(bytes(query), host, port, qid)
                    self._check(response, lname, qtype)
                except TimeoutError:
                    self.stats.count(self.stats.forward_errors, "timeout")
                    log.debug("dns: upstream %s:%d timed out", host, port)
                    continue
                except (OSError, UpstreamError, ValueError, IndexError, struct.error) as exc:
                    self.stats.count(self.stats.forward_errors, "error")
                    log.debug("dns: upstream %s:%d failed: %s", host, port, exc)
                    continue
                finally:
                    self._ours.discard(marker)
                self.stats.forward_duration.observe(time.perf_counter() - started)
                return response
        finally:
            self.stats.forward_inflight -= 1
        self.stats.count(self.stats.forward_errors, "all_failed")
        raise UpstreamError("no upstream answered")

    @staticmethod
    def _check(response: bytes, lname: bytes, qtype: int) -> None:
        if len(response) < 12 or not response[2] & 0x80:
            raise UpstreamError("not a response")
        rcode = response[3] & 0x0F
        if rcode in (wire.SERVFAIL, wire.REFUSED, wire.NOTIMP):
            raise UpstreamError(f"upstream rcode {rcode}")
        end = 12 + len(lname)
        if response[4:6] != b"\x00\x01" or response[12:end].lower() != lname:
            raise UpstreamError("answer to another question")
        if int.from_bytes(response[end : end + 2], "big") != qtype:
            raise UpstreamError("answer to another question type")

    async def _udp(self, query: bytes, host: str, port: int, qid: int) -> bytes:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpExchange(future, qid), remote_addr=(host, port)
        )
        try:
            transport.sendto(query)
            async with asyncio.timeout(self.timeout):
                return await future
        finally:
            transport.close()

    async def _tcp(self, query: bytes, host: str, port: int, qid: int) -> bytes:
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(len(query).to_bytes(2, "big") + query)
                await writer.drain()
                size = int.from_bytes(await reader.readexactly(2), "big")
                response = await reader.readexactly(size)
            finally:
                writer.close()
        if int.from_bytes(response[0:2], "big") != qid:
            raise UpstreamError("TCP answer with another ID")
        return response

    def _store(self, q: wire.Query, response: bytes) -> None:
        if self.cache_size <= 0:
            return
        try:
            walked = wire.walk_response(response)
        except (ValueError, IndexError, struct.error):
            return
        if walked.truncated:
            return
        if walked.rcode == wire.NOERROR and walked.ancount:
            ttl = min(walked.min_ttl or 0, MAX_POSITIVE_TTL)
        elif walked.rcode in (wire.NXDOMAIN, wire.NOERROR) and walked.soa_negative_ttl is not None:
            ttl = min(walked.soa_negative_ttl, self.negative_ttl_cap)  # RFC 2308 section 5
        else:
            return
        if ttl <= 0:
            return
        ttls = tuple(_TTL.unpack_from(response, offset)[0] for offset in walked.ttl_offsets)
        now = time.monotonic()
        key = (q.lname, q.qtype, q.qclass, q.edns)
        self._cache[key] = _Cached(response, now, now + ttl, walked.ttl_offsets, ttls)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        self.stats.cache_entries = len(self._cache)
