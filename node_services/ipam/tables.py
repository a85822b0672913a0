"""The IPAM store's tables as one command sees them: :class:`Transaction` (allocations, pools
and their free intervals, node ranges, assigned addresses, the daemon's heartbeat) and the row
types it returns. :mod:`node_services.ipam.store` opens the database and runs each command in
``BEGIN IMMEDIATE``; this module only reads and writes rows inside that transaction.

Standard library only, and cheap to import (no dataclasses, typing, pathlib or contextlib at
run time): the CNI plugin process imports this module.
"""

from __future__ import annotations

import itertools
import time
from ipaddress import IPv4Address, IPv6Address, ip_address

from node_services.ipam.allocator import (
    Exhausted,
    RangeSet,
    Unavailable,
    give,
    next_free,
    take,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from typing import Final

    from node_services.ipam.allocator import Interval


class Owner:
    """Who an address is for: the CNI attachment and, when the runtime says, the pod."""

    __slots__ = ("container_id", "ifname", "pod_name", "pod_namespace", "pod_uid")

    def __init__(
        self,
        container_id: str,
        ifname: str,
        pod_namespace: str = "",
        pod_name: str = "",
        pod_uid: str = "",
    ) -> None:
        self.container_id = container_id
        self.ifname = ifname
        self.pod_namespace = pod_namespace
        self.pod_name = pod_name
        self.pod_uid = pod_uid


class Allocation:
    """One reserved address (a row of ``allocations``)."""

    __slots__ = (
        "container_id",
        "created",
        "ifname",
        "ip",
        "network",
        "pod_name",
        "pod_namespace",
        "pod_uid",
        "pool",
    )

    def __init__(
        self,
        network: str,
        ip: str,
        pool: int,
        container_id: str,
        ifname: str,
        pod_namespace: str,
        pod_name: str,
        pod_uid: str,
        created: float,
    ) -> None:
        self.network = network
        self.ip = ip
        self.pool = pool
        self.container_id = container_id
        self.ifname = ifname
        self.pod_namespace = pod_namespace
        self.pod_name = pod_name
        self.pod_uid = pod_uid
        self.created = created

    def __repr__(self) -> str:
        return f"Allocation({self.network} {self.ip} {self.container_id} {self.ifname})"

    def describe(self) -> str:
        """``net ip of container id ifname (pod ns/name)``, for log lines."""
        return (
            f"{self.network} {self.ip} of container {self.container_id} {self.ifname} "
            f"(pod {self.pod_namespace or '-'}/{self.pod_name or '-'})"
        )


class PoolStats:
    """Size, allocated and free addresses of one pool (network, range set)."""

    __slots__ = ("free", "network", "size", "spec", "used")

    def __init__(self, network: str, spec: str, size: int, used: int, free: int) -> None:
        self.network = network
        self.spec = spec
        self.size = size
        self.used = used
        self.free = free


def _width(family: int) -> int:
    return 4 if family == 4 else 16


def _key(value: int, width: int) -> bytes:
    return value.to_bytes(width, "big")


def _int(blob: bytes) -> int:
    return int.from_bytes(blob, "big")


def _text(value: int, family: int) -> str:
    return str(IPv4Address(value) if family == 4 else IPv6Address(value))


def _bounds(text: str) -> list[Interval]:
    out = []
    for part in text.split(";"):
        lo, hi = part.split("-")
        out.append((int(lo), int(hi)))
    return out


class SQLFreeList:
    """The allocator's FreeList over the ``free`` table (fixed-width big-endian blobs sort as
    numbers, so the primary key and the ``free_hi`` index answer each query in O(log n))."""

    def __init__(self, db: sqlite3.Connection, pool: int, family: int) -> None:
        self.db = db
        self.pool = pool
        self.width = _width(family)

    def _one(self, sql: str, *args: object) -> Interval | None:
        row = self.db.execute(sql, (self.pool, *args)).fetchone()
        return (_int(row[0]), _int(row[1])) if row else None

    def first_ending_at_or_after(self, value: int) -> Interval | None:
        if value >= 1 << (8 * self.width):
            return None
        return self._one(
            "SELECT lo, hi FROM free WHERE pool = ? AND hi >= ? ORDER BY hi LIMIT 1",
            _key(value, self.width),
        )

    def lowest(self) -> Interval | None:
        return self._one("SELECT lo, hi FROM free WHERE pool = ? ORDER BY lo LIMIT 1")

    def starting_at_or_before(self, value: int) -> Interval | None:
        return self._one(
            "SELECT lo, hi FROM free WHERE pool = ? AND lo <= ? ORDER BY lo DESC LIMIT 1",
            _key(value, self.width),
        )

    def ending_at(self, value: int) -> Interval | None:
        if value < 0:
            return None
        return self._one(
            "SELECT lo, hi FROM free WHERE pool = ? AND hi = ?", _key(value, self.width)
        )

    def starting_at(self, value: int) -> Interval | None:
        if value >= 1 << (8 * self.width):
            return None
        return self._one(
            "SELECT lo, hi FROM free WHERE pool = ? AND lo = ?", _key(value, self.width)
        )

    def remove(self, interval: Interval) -> None:
        self.db.execute(
            "DELETE FROM free WHERE pool = ? AND lo = ?", (self.pool, _key(interval[0], self.width))
        )

    def add(self, interval: Interval) -> None:
        self.db.execute(
            "INSERT INTO free (pool, lo, hi) VALUES (?, ?, ?)",
            (self.pool, _key(interval[0], self.width), _key(interval[1], self.width)),
        )

    def intervals(self) -> list[Interval]:
        rows = self.db.execute("SELECT lo, hi FROM free WHERE pool = ? ORDER BY lo", (self.pool,))
        return [(_int(lo), _int(hi)) for lo, hi in rows]


_ALLOCATION_COLUMNS: Final = (
    "network, ip, pool, container_id, ifname, pod_namespace, pod_name, pod_uid, created"
)


class Transaction:
    """One command's view of the store, inside ``BEGIN IMMEDIATE``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    # -- allocations -------------------------------------------------------------------------

    def owned(self, network: str, container_id: str, ifname: str) -> list[Allocation]:
        rows = self.db.execute(
            f"SELECT {_ALLOCATION_COLUMNS} FROM allocations "
            "WHERE network = ? AND container_id = ? AND ifname = ? ORDER BY rowid",
            (network, container_id, ifname),
        )
        return [Allocation(*row) for row in rows]

    def allocation(self, network: str, ip: str) -> Allocation | None:
        row = self.db.execute(
            f"SELECT {_ALLOCATION_COLUMNS} FROM allocations WHERE network = ? AND ip = ?",
            (network, ip),
        ).fetchone()
        return Allocation(*row) if row else None

    def allocations(self, network: str | None = None) -> list[Allocation]:
        if network is None:
            rows = self.db.execute(f"SELECT {_ALLOCATION_COLUMNS} FROM allocations ORDER BY rowid")
        else:
            rows = self.db.execute(
                f"SELECT {_ALLOCATION_COLUMNS} FROM allocations WHERE network = ? ORDER BY rowid",
                (network,),
            )
        return [Allocation(*row) for row in rows]

    def allocate(
        self, network: str, range_set: RangeSet, owner: Owner, requested: int | None = None
    ) -> str:
        """Reserve one address of ``range_set`` for ``owner``; the address as text.

        Raises Exhausted when the range set is full, Unavailable when ``requested`` is outside
        it or taken.
        """
        pool, cursor = self._pool(network, range_set)
        free = SQLFreeList(self.db, pool, range_set.family)
        if requested is not None:
            text = _text(requested, range_set.family)
            if not any(lo <= requested <= hi for lo, hi in range_set.free_intervals()):
                raise Unavailable(f"requested address {text} is not in range set {range_set.spec}")
            holder = self.allocation(network, text)
            if holder is not None:
                raise Unavailable(
                    f"requested address {text} is in use by container {holder.container_id} "
                    f"interface {holder.ifname}"
                )
            take(free, requested)  # not free here only if another pool overlapping took it
            value = requested
        else:
            value = self._next(network, range_set, free, cursor)
            self.db.execute(
                "UPDATE pools SET cursor = ? WHERE id = ?",
                (_key(value, _width(range_set.family)), pool),
            )
            text = _text(value, range_set.family)
        self.db.execute(
            f"INSERT INTO allocations ({_ALLOCATION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                network,
                text,
                pool,
                owner.container_id,
                owner.ifname,
                owner.pod_namespace,
                owner.pod_name,
                owner.pod_uid,
                time.time(),
            ),
        )
        self._take_elsewhere(network, text, pool)
        return text

    def _take_elsewhere(self, network: str, ip: str, pool: int) -> None:
        """Take the address out of the network's other pools that cover it too (a changed
        range configuration leaves overlapping pools): their free counts stay exact."""
        address = ip_address(ip)
        value = int(address)
        rows = self.db.execute(
            "SELECT id, bounds FROM pools WHERE network = ? AND family = ? AND id != ?",
            (network, address.version, pool),
        ).fetchall()
        for other, bounds in rows:
            if any(lo <= value <= hi for lo, hi in _bounds(bounds)):
                take(SQLFreeList(self.db, other, address.version), value)

    def _next(
        self, network: str, range_set: RangeSet, free: SQLFreeList, cursor: int | None
    ) -> int:
        # An address can be missing from this pool's free list yet still be taken by another
        # pool of the same network whose ranges overlap (a changed config); skip those.
        for _ in range(range_set.size):
            value = next_free(free, cursor)
            if value is None:
                break
            take(free, value)
            if self.allocation(network, _text(value, range_set.family)) is None:
                return value
            cursor = value
        raise Exhausted(f"no free address left in range set {range_set.spec}")

    def release(self, allocation: Allocation) -> bool:
        """Release this allocation if it still belongs to the same container; True if it did."""
        cursor = self.db.execute(
            "DELETE FROM allocations WHERE network = ? AND ip = ? AND container_id = ? "
            "AND ifname = ?",
            (allocation.network, allocation.ip, allocation.container_id, allocation.ifname),
        )
        if cursor.rowcount == 0:
            return False
        self._give_back(allocation.network, allocation.ip)
        return True

    def release_owner(self, network: str, container_id: str, ifname: str) -> list[Allocation]:
        released = self.owned(network, container_id, ifname)
        for allocation in released:
            self.release(allocation)
        return released

    def _give_back(self, network: str, ip: str) -> None:
        address = ip_address(ip)
        value = int(address)
        rows = self.db.execute(
            "SELECT id, bounds FROM pools WHERE network = ? AND family = ?",
            (network, address.version),
        ).fetchall()
        for pool, bounds in rows:
            if any(lo <= value <= hi for lo, hi in _bounds(bounds)):
                give(SQLFreeList(self.db, pool, address.version), value)

    # -- pools -------------------------------------------------------------------------------

    def _pool(self, network: str, range_set: RangeSet) -> tuple[int, int | None]:
        row = self.db.execute(
            "SELECT id, cursor FROM pools WHERE network = ? AND spec = ?",
            (network, range_set.spec),
        ).fetchone()
        if row is not None:
            return row[0], (_int(row[1]) if row[1] is not None else None)
        intervals = range_set.free_intervals()
        bounds = ";".join(f"{lo}-{hi}" for lo, hi in intervals)
        pool = self.db.execute(
            "INSERT INTO pools (network, spec, family, size, bounds) VALUES (?, ?, ?, ?, ?)",
            (network, range_set.spec, range_set.family, str(range_set.size), bounds),
        ).lastrowid
        assert pool is not None
        free = SQLFreeList(self.db, pool, range_set.family)
        for interval in intervals:
            free.add(interval)
        # Addresses the network already gave out from other (older or overlapping) pools.
        for allocation in self.allocations(network):
            address = ip_address(allocation.ip)
            if address.version == range_set.family:
                take(free, int(address))
        return pool, None

    def free_count(self, network: str, range_set: RangeSet) -> int:
        """Free addresses of a range set (its full size when no command has used it yet)."""
        row = self.db.execute(
            "SELECT id FROM pools WHERE network = ? AND spec = ?", (network, range_set.spec)
        ).fetchone()
        if row is None:
            bounds = range_set.free_intervals()
            used = 0
            for allocation in self.allocations(network):
                address = ip_address(allocation.ip)
                value = int(address)
                if address.version == range_set.family and any(
                    lo <= value <= hi for lo, hi in bounds
                ):
                    used += 1
            return range_set.size - used
        return sum(
            hi - lo + 1 for lo, hi in SQLFreeList(self.db, row[0], range_set.family).intervals()
        )

    def pool_stats(self) -> list[PoolStats]:
        stats = []
        rows = self.db.execute(
            "SELECT id, network, spec, family, size FROM pools ORDER BY network, id"
        ).fetchall()
        for pool, network, spec, family, size in rows:
            (used,) = self.db.execute(
                "SELECT count(*) FROM allocations WHERE pool = ?", (pool,)
            ).fetchone()
            free = sum(hi - lo + 1 for lo, hi in SQLFreeList(self.db, pool, family).intervals())
            stats.append(PoolStats(network, spec, int(size), used, free))
        return stats

    def check(self) -> list[str]:
        """Consistency problems (none expected): overlapping free intervals, a free address
        that is allocated, or free + allocated not adding up to a pool's size."""
        problems = []
        rows = self.db.execute("SELECT id, network, spec, family, size, bounds FROM pools")
        for pool, network, spec, family, size, bounds in rows.fetchall():
            intervals = SQLFreeList(self.db, pool, family).intervals()
            allowed = _bounds(bounds)
            for lo, hi in intervals:
                if lo > hi or not any(a <= lo and hi <= b for a, b in allowed):
                    problems.append(f"pool {spec}: free interval {lo}-{hi} out of bounds")
            for (_, hi1), (lo2, _) in itertools.pairwise(intervals):
                if lo2 <= hi1:
                    problems.append(f"pool {spec}: free intervals overlap at {lo2}")
            taken = 0
            for allocation in self.allocations(network):
                address = ip_address(allocation.ip)
                value = int(address)
                if address.version != family or not any(a <= value <= b for a, b in allowed):
                    continue
                taken += 1
                if any(lo <= value <= hi for lo, hi in intervals):
                    problems.append(f"pool {spec}: {allocation.ip} is allocated and free")
            free = sum(hi - lo + 1 for lo, hi in intervals)
            if free + taken != int(size):
                problems.append(f"pool {spec}: {free} free + {taken} allocated != size {size}")
        return problems

    # -- node ranges -------------------------------------------------------------------------

    def node_ranges(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT cidr FROM node_ranges ORDER BY idx")]

    def assigned(self, container_id: str) -> list[str]:
        rows = self.db.execute(
            "SELECT ip FROM assigned WHERE container_id = ? ORDER BY ip", (container_id,)
        )
        return [row[0] for row in rows]

    def all_assigned(self) -> set[tuple[str, str]]:
        return {
            (row[0], row[1]) for row in self.db.execute("SELECT container_id, ip FROM assigned")
        }

    def set_assigned(self, pairs: set[tuple[str, str]]) -> None:
        self.db.execute("DELETE FROM assigned")
        self.db.executemany("INSERT INTO assigned (container_id, ip) VALUES (?, ?)", sorted(pairs))

    def mark_reconciled(self, node_name: str, interval: float, now: float) -> None:
        """The daemon's heartbeat: which node it reconciles this store for, how often, and when
        it last did (wall clock), so the plugin can tell why the node's ranges are missing."""
        self.db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [
                ("reconciler_node", node_name),
                ("reconcile_interval", repr(float(interval))),
                ("reconciled_at", repr(float(now))),
            ],
        )

    def reconciler(self) -> tuple[str, float, float] | None:
        """(node name, interval, last pass time) the daemon last recorded, or None."""
        rows = dict(
            self.db.execute(
                "SELECT key, value FROM meta WHERE key IN "
                "('reconciler_node', 'reconcile_interval', 'reconciled_at')"
            ).fetchall()
        )
        try:
            return (
                rows["reconciler_node"],
                float(rows["reconcile_interval"]),
                float(rows["reconciled_at"]),
            )
        except (KeyError, ValueError):
            return None

    def set_node_ranges(self, cidrs: list[str], node_name: str) -> None:
        self.db.execute("DELETE FROM node_ranges")
        self.db.executemany(
            "INSERT INTO node_ranges (idx, cidr) VALUES (?, ?)", list(enumerate(cidrs))
        )
        self.db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('node_name', ?)", (node_name,)
        )
