"""The forwarder's response cache: upstream answers kept for their TTL (negative answers per
RFC 2308), least recently used evicted first, budgeted in bytes with keys and per-entry
bookkeeping counted, not just the response bodies.

Two RFC 8767 / CoreDNS ``cache`` features: an expired positive answer is kept for the
serve-stale window and served (TTL 30) when the upstreams fail; a popular answer (asked
``prefetch`` times) asks for a refresh when 10% of its TTL is left. Negative answers are
never kept past their own TTL."""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from node_services.dns import wire
from node_services.dns.metrics import DnsStats

MAX_POSITIVE_TTL: Final = 3600
_TTL: Final = struct.Struct("!I")

CacheKey = tuple[bytes, int, int, int]
"""(lowercased wire name, qtype, qclass, variant): the variant bits say which query flags the
answer depends on (see :func:`node_services.dns.forward.question_key`)."""

ENTRY_OVERHEAD: Final = 520
"""Bytes one entry costs besides its response and name: the entry object, the key tuple, the
two bytes objects' headers, the offsets tuple, the serve-stale and prefetch deadlines and the
ordered dict's slot and link (measured with tracemalloc on CPython 3.11, rounded up;
tests/dns/test_forward_cache.py checks it)."""

PER_RECORD_OVERHEAD: Final = 32
"""Bytes per record whose TTL the entry tracks (an int in the offsets tuple)."""

STALE_TTL: Final = 30
"""TTL of a stale answer (RFC 8767 section 4: 30 seconds)."""

FAILURE_RECHECK: Final = 30.0
"""Seconds after a failure (of the upstreams, or for one entry) during which expired
entries are served stale at once instead of asking the upstreams first (RFC 8767 section 5's
failure recheck timer: 30 s); a stale entry is asked again in the background at most once
in that time."""

PREFETCH_LEFT: Final = 0.1
"""A popular entry asks for a refresh when this share of its TTL is left (CoreDNS: 10%)."""

DERIVED_VARIANTS: Final = 16
"""Key variants from this bit up are answers we built (autopath walks), not an upstream's
answer to that very question: never served stale, never prefetched."""

Refresh = Callable[[CacheKey, bytes, bool], bool]
"""``refresh(key, response, prefetch)``: ask the upstreams again for the question of a
cached ``response`` in the background (``prefetch``: the entry is still fresh); whether a
refresh was started (not when one is already running or the forwarder is busy)."""

_NEVER: Final = float("inf")


@dataclass(slots=True)
class _Cached:
    response: bytes  # ID and question of the first asker; TTLs as of ``stored``
    stored: float  # when the TTLs in ``response`` were right (moved on as it is aged)
    expires: float
    ttl_offsets: tuple[int, ...]
    cost: int
    stale_until: float  # kept (expired) until then to be served stale; = expires if negative
    refresh_at: float  # a prefetch is due from then (once asked often enough); inf: never
    hits: int = 0  # answers served from this entry (prefetch popularity)
    retry_at: float = 0.0  # its refresh failed or was asked: no new one before then


def entry_cost(lname: bytes, response: bytes, records: int) -> int:
    """What one cached answer costs in memory, by the accounting of the byte budget."""
    return ENTRY_OVERHEAD + len(lname) + len(response) + PER_RECORD_OVERHEAD * records


class ResponseCache:
    """Upstream answers by question, within ``max_bytes`` (and ``max_entries``)."""

    def __init__(
        self,
        *,
        stats: DnsStats,
        max_bytes: int,
        max_entries: int,
        negative_ttl_cap: int,
        serve_stale: float = 0.0,
        prefetch: int = 0,
        refresh: Refresh | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.negative_ttl_cap = negative_ttl_cap
        self.serve_stale = serve_stale
        """Seconds an expired positive answer is kept to be served stale (0: not kept)."""
        self.prefetch = prefetch
        """Answers from one entry that make it popular enough to prefetch (0: never)."""
        self.refresh = refresh
        self.clock = clock
        self.failing_until = 0.0
        """The upstreams failed lately (the forwarder sets it, a success clears it): until
        then, expired entries are served stale at once."""
        self.bytes = 0
        self._entries: OrderedDict[CacheKey, _Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey, qid: int, question: bytes) -> bytes | None:
        """The cached response for ``key`` with this ID, question and aged TTLs, if fresh;
        for an expired entry in its serve-stale window, the stale answer at once while the
        upstreams are known to fail (lately, or for this entry: see :meth:`stale`), with a
        background refresh asked at most once per recheck time.

        None for an expired entry otherwise: the caller asks the upstreams, and calls
        :meth:`stale` if they fail."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self.clock()
        if now >= entry.expires:
            if now >= entry.stale_until:
                self._drop(key, entry)
                return None
            if now >= entry.retry_at:
                if now >= self.failing_until:
                    return None  # no failure known: ask the upstreams first
                if self.refresh is not None and self.refresh(key, entry.response, False):
                    entry.retry_at = now + FAILURE_RECHECK
            return self._stale_answer(key, entry, qid, question)
        self._entries.move_to_end(key)
        entry.hits += 1
        if (
            now >= entry.refresh_at
            and entry.hits >= self.prefetch
            and self.refresh is not None
            and self.refresh(key, entry.response, True)
        ):
            entry.refresh_at = _NEVER  # one prefetch per entry: a new answer replaces it
        response = entry.response
        elapsed = int(now - entry.stored)
        if elapsed:  # age the entry itself, once per second it is asked in
            aged = bytearray(response)
            for offset in entry.ttl_offsets:
                (ttl,) = _TTL.unpack_from(response, offset)
                _TTL.pack_into(aged, offset, max(0, ttl - elapsed))
            entry.response = response = bytes(aged)
            entry.stored += elapsed
        end = 12 + len(question)  # the same length for every asker of this key
        return b"".join((qid.to_bytes(2, "big"), response[2:12], question, response[end:]))

    def stale(self, key: CacheKey, qid: int, question: bytes) -> bytes | None:
        """The stale answer for ``key`` (every TTL 30) when the upstreams just failed to
        refresh it and it is an expired positive answer within the serve-stale window; from
        now on it is served at once until the failure recheck time."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self.clock()
        if now < entry.expires or now >= entry.stale_until:
            return None
        entry.retry_at = now + FAILURE_RECHECK
        return self._stale_answer(key, entry, qid, question)

    def refresh_failed(self, key: CacheKey) -> None:
        """A background refresh of ``key`` failed: the entry waits the recheck time."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.retry_at = self.clock() + FAILURE_RECHECK

    def _stale_answer(self, key: CacheKey, entry: _Cached, qid: int, question: bytes) -> bytes:
        self.stats.stale_answers += 1
        # A stale entry is the first to go when the budget needs room.
        self._entries.move_to_end(key, last=False)
        out = bytearray(entry.response)
        out[0:2] = qid.to_bytes(2, "big")
        out[12 : 12 + len(question)] = question
        for offset in entry.ttl_offsets:
            _TTL.pack_into(out, offset, STALE_TTL)
        return bytes(out)

    def store(self, key: CacheKey, response: bytes) -> None:
        """Keep ``response`` for its TTL when it is cacheable and fits the budget."""
        if self.max_entries <= 0 or self.max_bytes <= 0:
            return
        # A newer answer replaces the old one, even one we do not keep: no stale answer
        # outlives what the upstream says now.
        old = self._entries.get(key)
        if old is not None:
            self._drop(key, old)
        try:
            walked = wire.walk_response(response)
        except (ValueError, IndexError, struct.error):
            return
        if walked.truncated:
            return
        # A CNAME chain ending in no data (an SOA in authority) is a negative answer: its
        # negative TTL, never served stale.
        positive = (
            walked.rcode == wire.NOERROR and walked.ancount and walked.soa_negative_ttl is None
        )
        if positive:
            ttl = min(walked.min_ttl or 0, MAX_POSITIVE_TTL)
        elif walked.rcode in (wire.NXDOMAIN, wire.NOERROR) and walked.soa_negative_ttl is not None:
            ttl = min(walked.soa_negative_ttl, self.negative_ttl_cap)  # RFC 2308 section 5
        else:
            return
        if ttl <= 0:
            return
        cost = entry_cost(key[0], response, len(walked.ttl_offsets))
        if cost > self.max_bytes:
            return
        now = self.clock()
        expires = now + ttl
        ours = key[3] < DERIVED_VARIANTS
        # Negative answers are never served past their own TTL (unlike coredns#3586).
        stale_until = expires + self.serve_stale if positive and ours else expires
        refresh_at = expires - ttl * PREFETCH_LEFT if self.prefetch and ours else _NEVER
        self._entries[key] = _Cached(
            response, now, expires, walked.ttl_offsets, cost, stale_until, refresh_at
        )
        self.bytes += cost
        entries = self._entries
        while self.bytes > self.max_bytes or len(entries) > self.max_entries:
            _, evicted = entries.popitem(last=False)
            self.bytes -= evicted.cost
        self._publish()

    def _drop(self, key: CacheKey, entry: _Cached) -> None:
        del self._entries[key]
        self.bytes -= entry.cost
        self._publish()

    def _publish(self) -> None:
        self.stats.cache_entries = len(self._entries)
        self.stats.cache_bytes = self.bytes
