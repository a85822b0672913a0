"""Forwarding names outside the cluster zones: upstreams in order, TCP retry on TC, one
upstream query per distinct question in flight (later askers join it: no loop can multiply
queries), loop probes, a byte-budgeted cache and a concurrency cap; stale answers when the
upstreams fail and prefetches of popular names, both refreshed in the background."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import struct
import time
from collections.abc import Callable
from typing import Final

from node_services.dns import wire
from node_services.dns.forward_cache import (
    DERIVED_VARIANTS,
    FAILURE_RECHECK,
    MAX_POSITIVE_TTL,
    CacheKey,
    ResponseCache,
)
from node_services.dns.metrics import DnsStats
from node_services.dns.upstream import Question, UdpPool, Upstream, UpstreamError

__all__ = [
    "LOOP_PROBE_INTERVAL",
    "MAX_POSITIVE_TTL",
    "Forwarder",
    "UpstreamError",
    "question_key",
]

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES: Final = 16 << 20
MAX_REFRESHES: Final = 64
"""Background refreshes (prefetches, stale refreshes) in flight at once at most; while the
upstreams fail, one stale refresh at a time (it finds out when they are back)."""
LOOP_PROBE_INTERVAL: Final = 60.0
"""Seconds between loop probes to the upstreams while we forward (the daemon's setting)."""
_HINFO: Final = 13


def question_key(q: wire.Query) -> CacheKey:
    """What makes two queries the same question for the upstream: the name (any case), type,
    class, and the flags the answer depends on (EDNS, DO, CD, RD)."""
    variant = q.edns | q.do << 1 | bool(q.flags & wire.CD) << 2 | bool(q.flags & wire.RD) << 3
    return (q.lname, q.qtype, q.qclass, variant)


def _refresh_query(key: CacheKey, response: bytes) -> bytes:
    """A query for the question of a cached ``response`` with the flags its key stands for
    (RD, CD; EDNS with DO): what the upstream answers the same way as the first asker."""
    lname, _, _, variant = key
    flags = (wire.RD if variant & 8 else 0) | (wire.CD if variant & 4 else 0)
    question = response[12 : 12 + len(lname) + 4]  # the first asker's spelling of the name
    opt = b""
    if variant & 1:
        do = 0x8000 if variant & 2 else 0
        opt = b"\x00" + wire.RR_FIXED.pack(wire.OPT, wire.EDNS_UDP_SIZE, do, 0)
    return wire.HEADER.pack(0, flags, 1, 0, 0, int(bool(opt))) + question + opt


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _canonical(upstream: tuple[str, int]) -> tuple[str, int]:
    """The address as the kernel reports a datagram's source (answers are matched on it)."""
    host, port = upstream
    try:
        return (str(ipaddress.ip_address(host)), port)
    except ValueError:
        return upstream  # a host name: resolved when first used


class Forwarder:
    """Sends queries upstream and caches the answers."""

    def __init__(
        self,
        upstreams: tuple[tuple[str, int], ...],
        *,
        stats: DnsStats,
        timeout: float = 2.0,
        cache_size: int = 10000,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_inflight: int = 1000,
        negative_ttl_cap: int = 300,
        sockets: int = 16,
        pool: UdpPool | None = None,
        loop_probe_interval: float = 0.0,
        serve_stale: float = 0.0,
        prefetch: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstreams = tuple(_canonical(u) for u in upstreams)
        self.stats = stats
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.cache = ResponseCache(
            stats=stats,
            max_bytes=cache_bytes,
            max_entries=cache_size,
            negative_ttl_cap=negative_ttl_cap,
            serve_stale=serve_stale,
            prefetch=prefetch,
            refresh=self._refresh,
            clock=clock,
        )
        self._refreshing: dict[CacheKey, asyncio.Task[None]] = {}
        """Background refreshes (prefetch, stale) by question: one at a time per entry."""
        self._stale_refreshing = 0
        self.pool = pool if pool is not None else UdpPool(stats=stats, size=sockets)
        self._flights: dict[CacheKey, asyncio.Future[bytes]] = {}
        """Questions being asked upstream: later askers of the same question await the answer."""
        self._ours: set[tuple[int, bytes, int]] = set()  # (ID, name, type) of our queries out
        self._resolved: dict[Upstream, Upstream] = {}
        self.loop_probe_interval = loop_probe_interval
        self._next_probe = 0.0
        self._probes: dict[bytes, Upstream] = {}  # probe name in flight -> the upstream asked
        self._probe_tasks: set[asyncio.Task[None]] = set()
        self._looping: dict[Upstream, float] = {}  # upstream -> skipped until (monotonic)

    def is_own_query(self, qid: int, lname: bytes, qtype: int) -> bool:
        """Whether a query reaching us is one we sent upstream ourselves: a forwarding loop.

        Two signals: our ID echoed, or one of our loop probes (a random name only we ask,
        whatever its ID). A looped client query under a new ID cannot be told apart from
        another client's; it joins the question in flight and adds no upstream query."""
        upstream = self._probes.get(lname)
        if upstream is not None:
            if upstream not in self._looping:
                log.error(
                    "dns: forwarding loop: upstream %s:%d sends our queries back to us; not "
                    "using it for %.0f s (fix its configuration)",
                    *upstream,
                    self.loop_probe_interval,
                )
            self._looping[upstream] = time.monotonic() + self.loop_probe_interval
            return True
        return (qid, lname, qtype) in self._ours

    def overloaded(self) -> bool:
        return self.stats.forward_inflight >= self.max_inflight

    def cached(self, q: wire.Query) -> bytes | None:
        """The cached response for this query (ID, question and TTLs patched), if fresh."""
        return self.cache.get(question_key(q), q.qid, q.question)

    async def resolve(self, q: wire.Query, data: bytes) -> bytes:
        """The upstream answer to a client's query (ID and question as the client sent them).

        Raises :class:`UpstreamError` when every upstream failed and no stale answer is
        kept for the question."""
        self.stats.cache_misses += 1
        key = question_key(q)
        try:
            response = await self._ask(key, data)
        except UpstreamError:
            stale = self.cache.stale(key, q.qid, q.question)
            if stale is None:
                raise
            return stale
        out = bytearray(response)
        out[0:2] = q.qid.to_bytes(2, "big")
        out[12 : 12 + len(q.question)] = q.question
        return bytes(out)

    async def resolve_name(self, name: str, qtype: int) -> bytes:
        """Resolve a name we need ourselves (an ExternalName target, an autopath step); the
        raw response, from the forward cache while it is fresh."""
        qname = wire.encode_name(name)
        question = qname + struct.pack("!HH", qtype, 1)
        key = (qname.lower(), qtype, wire.CLASS_IN, 8)
        cached = self.cache.get(key, 0, question)
        if cached is not None:
            self.stats.cache_hits += 1
            return cached
        query = wire.HEADER.pack(0, wire.RD, 1, 0, 0, 0) + question
        try:
            return await self._ask(key, query)
        except UpstreamError:
            stale = self.cache.stale(key, 0, question)
            if stale is None:
                raise
            return stale

    def close(self) -> None:
        """Close the upstream sockets (queries still waiting fail) and stop the probes and
        background refreshes."""
        for task in self._probe_tasks:
            task.cancel()
        for task in self._refreshing.values():
            task.cancel()
        self.pool.close()

    def _refresh(self, key: CacheKey, response: bytes, prefetch: bool) -> bool:
        """Ask the upstreams again for a cached question in the background (the cache's
        prefetch or stale-refresh call); at most one refresh per question at a time, none
        while a client's query for it is in flight (that one refreshes it) or when the
        forwarder is at its concurrency cap. Whether it was started."""
        if key in self._refreshing or key in self._flights or key[3] >= DERIVED_VARIANTS:
            return False
        if not prefetch and self._stale_refreshing:
            return False  # one stale refresh at a time: the rule, not a skip for load
        if self.overloaded() or len(self._refreshing) >= MAX_REFRESHES:
            self.stats.refreshes_skipped += 1
            return False
        query = _refresh_query(key, response)
        task = asyncio.get_running_loop().create_task(self._background(key, query, prefetch))
        self._refreshing[key] = task
        if not prefetch:
            self._stale_refreshing += 1
        task.add_done_callback(lambda _: self._refreshed(key, prefetch))
        return True

    def _refreshed(self, key: CacheKey, prefetch: bool) -> None:
        del self._refreshing[key]
        if not prefetch:
            self._stale_refreshing -= 1

    async def _background(self, key: CacheKey, query: bytes, prefetch: bool) -> None:
        stats = self.stats
        if prefetch:
            stats.prefetches += 1
        else:
            stats.stale_refreshes += 1
        try:
            await self._ask(key, query)  # stores the new answer in the cache
        except UpstreamError as exc:
            if prefetch:
                stats.prefetch_failures += 1
            else:
                stats.stale_refresh_failures += 1
            self.cache.refresh_failed(key)
            log.debug("dns: background refresh of %r failed: %s", key[0], exc)
        except Exception:  # a bug: logged, never an unretrieved task exception
            log.exception("dns: background refresh of %r failed", key[0])

    async def _ask(self, key: CacheKey, query: bytes) -> bytes:
        """The answer to ``query``: from the flight already asking it, else asked upstream."""
        stats = self.stats
        stats.forward_inflight += 1
        try:
            flight = self._flights.get(key)
            if flight is not None:
                stats.forward_coalesced += 1
                # Shielded: one asker giving up must not cancel the answer for the others.
                return await asyncio.shield(flight)
            if self.loop_probe_interval:
                self._maybe_probe()
            return await self._lead(key, bytearray(query))
        finally:
            stats.forward_inflight -= 1

    async def _lead(self, key: CacheKey, query: bytearray) -> bytes:
        flight: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            response = await self._exchange(query, Question(key[0], key[1], key[2]))
        except BaseException as exc:
            failure = exc if isinstance(exc, UpstreamError) else UpstreamError(repr(exc))
            flight.set_exception(failure)
            flight.exception()  # retrieved: there may be no other asker
            raise
        finally:
            del self._flights[key]
        self.cache.store(key, response)
        flight.set_result(response)
        return response

    async def _exchange(self, query: bytearray, question: Question) -> bytes:
        looping = self._looping
        for upstream in self.upstreams:
            host, port = upstream
            if looping and upstream in looping:
                if time.monotonic() < looping[upstream]:
                    self.stats.count(self.stats.forward_errors, "loop")
                    continue
                del looping[upstream]
            started = time.perf_counter()
            try:
                address = await self._address(upstream)
                response = await self._udp(query, address, question)
                if response[2] & 0x02:  # TC: the answer did not fit, ask again over TCP
                    self.stats.forward_tcp_retries += 1
                    response = await self._tcp(bytes(query), address, question)
                self._check(response)
            except TimeoutError:
                self.stats.count(self.stats.forward_errors, "timeout")
                log.debug("dns: upstream %s:%d timed out", host, port)
                continue
            except (OSError, UpstreamError, ValueError, IndexError, struct.error) as exc:
                self.stats.count(self.stats.forward_errors, "error")
                log.debug("dns: upstream %s:%d failed: %s", host, port, exc)
                continue
            self.stats.forward_duration.observe(time.perf_counter() - started)
            self.cache.failing_until = 0.0
            return response
        self.stats.count(self.stats.forward_errors, "all_failed")
        self.cache.failing_until = self.cache.clock() + FAILURE_RECHECK
        raise UpstreamError("no upstream answered")

    async def _udp(self, query: bytearray, address: Upstream, question: Question) -> bytes:
        exchange = self.pool.send(query, address, question)
        marker = (exchange.qid, question.lname, question.qtype)
        self._ours.add(marker)
        try:
            async with asyncio.timeout(self.timeout):
                return await exchange.answer
        finally:
            exchange.release()
            self._ours.discard(marker)

    def _maybe_probe(self) -> None:
        now = time.monotonic()
        if now < self._next_probe:
            return
        self._next_probe = now + self.loop_probe_interval
        task = asyncio.get_running_loop().create_task(self._probe())
        self._probe_tasks.add(task)
        task.add_done_callback(self._probe_tasks.discard)

    async def _probe(self) -> None:
        """Ask each upstream for a random name no one else asks (CoreDNS's `loop` check):
        if it reaches us, :meth:`is_own_query` knows that upstream loops back to us."""
        randbits = random.SystemRandom().getrandbits
        for upstream in self.upstreams:
            name = f"{randbits(40)}.{randbits(40)}.node-services-loop-probe."
            lname = wire.encode_name(name)
            query = bytearray(
                wire.HEADER.pack(0, wire.RD, 1, 0, 0, 0) + lname + struct.pack("!HH", _HINFO, 1)
            )
            self._probes[lname] = upstream
            try:
                address = await self._address(upstream)
                await self._udp(query, address, Question(lname, _HINFO, wire.CLASS_IN))
            except (TimeoutError, OSError, UpstreamError, ValueError) as exc:
                log.debug("dns: loop probe to %s:%d: %s", *upstream, exc)
            finally:
                del self._probes[lname]

    async def _address(self, upstream: Upstream) -> Upstream:
        """The IP address of an upstream given by name, looked up once (off the loop)."""
        if _is_ip(upstream[0]):
            return upstream
        found = self._resolved.get(upstream)
        if found is None:
            infos = await asyncio.get_running_loop().getaddrinfo(
                upstream[0], upstream[1], type=socket.SOCK_DGRAM
            )
            if not infos:
                raise UpstreamError(f"{upstream[0]}: no address")
            found = self._resolved[upstream] = _canonical(
                (str(infos[0][4][0]), int(infos[0][4][1]))
            )
        return found

    @staticmethod
    def _check(response: bytes) -> None:
        rcode = response[3] & 0x0F
        if rcode in (wire.SERVFAIL, wire.REFUSED, wire.NOTIMP):
            raise UpstreamError(f"upstream rcode {rcode}")

    async def _tcp(self, query: bytes, upstream: Upstream, question: Question) -> bytes:
        # marked as ours like the UDP try, so a TCP retry that loops back is known at once
        marker = (int.from_bytes(query[0:2], "big"), question.lname, question.qtype)
        self._ours.add(marker)
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(*upstream)
                try:
                    writer.write(len(query).to_bytes(2, "big") + query)
                    await writer.drain()
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    response = await reader.readexactly(size)
                finally:
                    writer.close()
        finally:
            self._ours.discard(marker)
        if response[0:2] != query[0:2]:
            raise UpstreamError("TCP answer with another ID")
        if not question.asked_by(response):
            raise UpstreamError("TCP answer to another question")
        return response
