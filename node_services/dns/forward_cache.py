"""The forwarder's response cache: upstream answers kept for their TTL (negative answers per
RFC 2308), least recently used evicted first, budgeted in bytes with keys and per-entry
bookkeeping counted, not just the response bodies."""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from node_services.dns import wire
from node_services.dns.metrics import DnsStats

MAX_POSITIVE_TTL: Final = 3600
_TTL: Final = struct.Struct("!I")

CacheKey = tuple[bytes, int, int, int]
"""(lowercased wire name, qtype, qclass, variant): the variant bits say which query flags the
answer depends on (see :func:`node_services.dns.forward.question_key`)."""

ENTRY_OVERHEAD: Final = 440
"""Bytes one entry costs besides its response and name: the entry object, the key tuple, the
two bytes objects' headers, the offsets tuple and the ordered dict's slot and link (measured
with tracemalloc on CPython 3.11, rounded up; tests/dns/test_forward_cache.py checks it)."""

PER_RECORD_OVERHEAD: Final = 32
"""Bytes per record whose TTL the entry tracks (an int in the offsets tuple)."""


@dataclass(slots=True)
class _Cached:
    response: bytes  # as received: ID and question of the first asker, the original TTLs
    stored: float
    expires: float
    ttl_offsets: tuple[int, ...]
    cost: int


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
    ) -> None:
        self.stats = stats
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.negative_ttl_cap = negative_ttl_cap
        self.bytes = 0
        self._entries: OrderedDict[CacheKey, _Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey, qid: int, question: bytes) -> bytes | None:
        """The cached response for ``key`` with this ID, question and aged TTLs, if fresh."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = time.monotonic()
        if now >= entry.expires:
            self._drop(key, entry)
            return None
        self._entries.move_to_end(key)
        elapsed = int(now - entry.stored)
        out = bytearray(entry.response)
        out[0:2] = qid.to_bytes(2, "big")
        out[12 : 12 + len(question)] = question
        if elapsed:
            response = entry.response
            for offset in entry.ttl_offsets:
                (ttl,) = _TTL.unpack_from(response, offset)
                _TTL.pack_into(out, offset, max(0, ttl - elapsed))
        return bytes(out)

    def store(self, key: CacheKey, response: bytes) -> None:
        """Keep ``response`` for its TTL when it is cacheable and fits the budget."""
        if self.max_entries <= 0 or self.max_bytes <= 0:
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
        cost = entry_cost(key[0], response, len(walked.ttl_offsets))
        if cost > self.max_bytes:
            return
        old = self._entries.get(key)
        if old is not None:
            self._drop(key, old)
        now = time.monotonic()
        self._entries[key] = _Cached(response, now, now + ttl, walked.ttl_offsets, cost)
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
