"""An immutable mapping whose updated copies share unchanged parts with the original.

Published snapshots must never change, yet a watch event that touches one service must not
copy a 100,000-entry index. The map is split into fixed shards by key hash; an update copies
only the shards it touches (~1/256 of the entries each) and shares the rest. Lookups cost one
hash, one tuple index and one dict lookup.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, Generic, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")

_BITS: Final = 8
_SHARDS: Final = 1 << _BITS
_MASK: Final = _SHARDS - 1
_EMPTY: Final[dict[Any, Any]] = {}  # shared by every empty shard; never written to


class FrozenMap(Mapping[K, V], Generic[K, V]):
    """A read-only mapping; :meth:`evolve` returns an updated copy and leaves this one alone."""

    __slots__ = ("_len", "_shards")

    def __init__(self, items: Mapping[K, V] | None = None) -> None:
        shards: list[dict[K, V]] = [_EMPTY] * _SHARDS
        if items:
            for key, value in items.items():
                index = hash(key) & _MASK
                shard = shards[index]
                if shard is _EMPTY:
                    shard = shards[index] = {}
                shard[key] = value
        self._shards: tuple[dict[K, V], ...] = tuple(shards)
        self._len = len(items) if items else 0

    def __getitem__(self, key: K) -> V:
        return self._shards[hash(key) & _MASK][key]

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | D, /) -> V | D: ...
    def get(self, key: K, default: Any = None, /) -> Any:
        return self._shards[hash(key) & _MASK].get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) & _MASK]

    def __iter__(self) -> Iterator[K]:
        for shard in self._shards:
            yield from shard

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"FrozenMap({len(self)} entries)"

    def evolve(self, sets: Mapping[K, V], deletes: Iterable[K] = ()) -> FrozenMap[K, V]:
        """A copy with ``sets`` stored and ``deletes`` removed (missing keys are ignored)."""
        # Shards are copied with dict.copy(): a dict that lost keys (holes in its table) is
        # cloned in one move, where dict(shard) re-inserts each entry (several times slower).
        touched: dict[int, dict[K, V]] = {}
        shards = self._shards
        for key in deletes:
            index = hash(key) & _MASK
            shard = touched.get(index)
            if shard is None:
                if key not in shards[index]:
                    continue
                shard = touched[index] = shards[index].copy()
            shard.pop(key, None)
        for key, value in sets.items():
            index = hash(key) & _MASK
            shard = touched.get(index)
            if shard is None:
                shard = touched[index] = shards[index].copy()
            shard[key] = value
        if not touched:
            return self
        new = FrozenMap.__new__(FrozenMap)
        merged = list(shards)
        length = self._len
        for index, shard in touched.items():
            length += len(shard) - len(shards[index])  # the size of each shard it replaces
            merged[index] = shard if shard else _EMPTY
        new._shards = tuple(merged)
        new._len = length
        return new


_MISSING: Final = object()
