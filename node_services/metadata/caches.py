"""The byte budget of the metadata server's answer caches.

Rendered answers are kept so a repeated question costs a dict lookup: per tree (by caller,
path and format) and per peer on the fast path (by raw path, ``Accept`` and peer). Each
unique path a client asks adds entries, so the caches are bounded by one shared budget in
bytes, and an entry is charged what it really holds: its key (a 4 KiB request line makes a
4 KiB key, twice), its value (body, headers) and a fixed per-entry overhead (the dict slot
with its share of the table, the tuples). Counting bodies alone let one client asking for
unique paths grow the daemon by 290 MB.

When an entry would take the caches past the budget, they all start over (cheaper than
keeping an eviction order, and a new store version empties them anyway).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import Counter, Gauge

DEFAULT_BUDGET: Final = 32 * 1024 * 1024
"""Bytes all answer caches together may hold (``metadata_cache_bytes``)."""

ENTRY_OVERHEAD: Final = 160
"""Bytes an entry costs beyond what :func:`footprint` sees in its key and value: the dict
slot and index (a table is up to 3x its entries), allocator rounding and headers."""


def footprint(obj: object) -> int:
    """Bytes held by ``obj`` and what it contains (str, bytes, tuples, dicts); ints, enums,
    None and metric children are shared with the rest of the process and count nothing."""
    if isinstance(obj, str | bytes):
        return sys.getsizeof(obj)
    if isinstance(obj, tuple):
        return sys.getsizeof(obj) + sum(footprint(item) for item in obj)
    if isinstance(obj, dict):
        return sys.getsizeof(obj) + sum(footprint(k) + footprint(v) for k, v in obj.items())
    return 0


@dataclass(eq=False)
class AnswerCaches:
    """The caches of the current store version and the bytes they hold together."""

    budget: int = DEFAULT_BUDGET
    used_bytes: Gauge | None = None
    resets: Counter | None = None
    used: int = 0
    _caches: list[dict[Any, Any]] = field(default_factory=list)

    def track(self, cache: dict[Any, Any]) -> dict[Any, Any]:
        """Charge ``cache``'s entries to this budget (and empty it when the budget is spent)."""
        self._caches.append(cache)
        return cache

    def remember(self, cache: dict[Any, Any], key: object, value: object) -> None:
        """Keep ``value`` under ``key`` in ``cache`` unless it alone exceeds the budget."""
        size = ENTRY_OVERHEAD + footprint(key) + footprint(value)
        if size > self.budget:
            return
        if self.used + size > self.budget:
            self.clear()
            if self.resets is not None:
                self.resets.inc()
        cache[key] = value
        self.used += size
        if self.used_bytes is not None:
            self.used_bytes.set(self.used)

    def clear(self) -> None:
        """Empty every tracked cache."""
        for cache in self._caches:
            cache.clear()
        self.used = 0

    def new_version(self) -> None:
        """Forget the caches of the last store version (their owners drop them)."""
        self._caches = []
        self.used = 0
        if self.used_bytes is not None:
            self.used_bytes.set(0)
