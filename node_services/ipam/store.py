"""The IPAM store: one SQLite database in WAL mode under ``dataDir``, shared by every plugin
process and the daemon.

Every CNI command is one ``BEGIN IMMEDIATE`` transaction: it takes the write lock first, so
concurrent plugin processes serialise, and a process killed at any point leaves either the
whole command or none of it (SQLite rolls back an uncommitted WAL tail on the next open).
``synchronous=NORMAL`` keeps WAL commits crash-safe against process death; a power loss may
lose the last commits, and with them only addresses of pods that did not survive it either.

Tables:
  ``pools``        one row per (network, range set): size, allocatable bounds, round-robin cursor
  ``free``         free addresses of each pool as disjoint intervals, indexed by start and end
  ``allocations``  (network, ip) -> container, interface, pod identity, creation time
  ``node_ranges``  this node's pod CIDRs, written by the daemon for ``"range": "node"``
  ``assigned``     container ID -> address the orchestrator assigned (Cattle primaryIpAddress),
                   written by the daemon, honoured by ADD

Standard library only, and cheap to import (no dataclasses, typing, pathlib or contextlib at
run time): the CNI plugin process imports this module.
"""

from __future__ import annotations

import itertools
import os
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
else:
    try:
        # The C module the sqlite3 package wraps: the package adds only date/time adapters
        # (unused here) and costs each plugin start ~2 ms importing datetime and collections.
        import _sqlite3 as sqlite3
    except ImportError:  # not CPython's layout
        import sqlite3
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Final

    from node_services.ipam.allocator import Interval

DB_NAME: Final = "ipam.db"
MARKER_NAME: Final = "ipam.db.initialised"
"""Written beside the database once it holds a store: a missing or empty database where this
file exists is a lost store (:class:`StoreLost`), never a fresh one."""
SCHEMA_VERSION: Final = 1
DEFAULT_TIMEOUT: Final = 30.0

_SCHEMA: Final = """
CREATE TABLE pools (
    id INTEGER PRIMARY KEY,
    network TEXT NOT NULL,
    spec TEXT NOT NULL,
    family INTEGER NOT NULL,
    size TEXT NOT NULL,
    bounds TEXT NOT NULL,
    cursor BLOB,
    UNIQUE (network, spec)
);
CREATE TABLE free (
    pool INTEGER NOT NULL,
    lo BLOB NOT NULL,
    hi BLOB NOT NULL,
    PRIMARY KEY (pool, lo)
) WITHOUT ROWID;
CREATE INDEX free_hi ON free (pool, hi);
CREATE TABLE allocations (
    network TEXT NOT NULL,
    ip TEXT NOT NULL,
    pool INTEGER NOT NULL,
    container_id TEXT NOT NULL,
    ifname TEXT NOT NULL,
    pod_namespace TEXT NOT NULL DEFAULT '',
    pod_name TEXT NOT NULL DEFAULT '',
    pod_uid TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    PRIMARY KEY (network, ip)
);
CREATE INDEX allocations_owner ON allocations (network, container_id, ifname);
CREATE TABLE node_ranges (idx INTEGER PRIMARY KEY, cidr TEXT NOT NULL);
CREATE TABLE assigned (
    container_id TEXT NOT NULL,
    ip TEXT NOT NULL,
    PRIMARY KEY (container_id, ip)
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(Exception):
    """The store cannot be read or written (CNI code 5)."""


class StoreBusy(StoreError):
    """Another process held the lock past the timeout (CNI code 11: try again later)."""


class StoreLost(StoreError):
    """``ipam.db`` is missing or empty although a store was initialised in this directory (its
    marker file says so): the reservations of running containers are unknown, so nothing may
    be handed out until the operator restores the file or starts afresh (CNI code 5)."""

    def __init__(self, path: str, marker: str) -> None:
        try:
            with open(marker, encoding="utf-8", errors="replace") as file:
                since = file.read(200).strip()
        except OSError:
            since = ""
        try:
            size = f"{os.stat(path).st_size} bytes"
        except OSError:
            size = "absent"
        super().__init__(
            f"{path} is missing or empty ({size}, no IPAM tables) but {marker} says a store "
            f"was in use here ({since or 'no date'}): handing out addresses now could give a new "
            "container an address a running one holds. Recover: restore ipam.db from a backup; "
            f"or, once no container on this node holds an address from it (node drained, its "
            f"pods restarted), delete {marker} and the next command starts an empty store"
        )
        self.path = path
        self.marker = marker


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


class IPAMStore:
    """The database file ``<data_dir>/ipam.db``; :meth:`transaction` is one command."""

    def __init__(
        self, data_dir: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.directory = os.fspath(data_dir)
        self.path = os.path.join(self.directory, DB_NAME)
        self.marker = os.path.join(self.directory, MARKER_NAME)
        self.timeout = timeout
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        deadline = time.monotonic() + self.timeout
        while True:
            db: sqlite3.Connection | None = None
            try:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
                db.execute("PRAGMA synchronous = NORMAL")
                if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    self._create(db)
                if not os.path.exists(self.marker):  # (one stat per command)
                    self._write_marker()
                break
            except sqlite3.OperationalError as exc:
                if db is not None:
                    db.close()
                # While another process creates the store (switching it to WAL), SQLite can
                # answer "locked" at once instead of waiting: retry until the lock timeout.
                if _is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                raise _translate(exc, self.path) from exc
            except StoreError:
                if db is not None:
                    db.close()
                raise
            except (OSError, sqlite3.Error) as exc:
                if db is not None:
                    db.close()
                raise StoreError(f"cannot open {self.path}: {exc}") from exc
        self._db = db
        return db

    def _create(self, db: sqlite3.Connection) -> None:
        """Create the schema in an empty database, unless the marker says this directory had a
        store: then the database was deleted or emptied behind our back (StoreLost)."""
        marked = os.path.exists(self.marker)
        if not marked:  # (with a marker, leave a lost file exactly as it was found)
            db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have created it meanwhile.
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0 and (marked or os.path.exists(self.marker)):
                raise StoreLost(self.path, self.marker)
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: unknown schema version {version}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _write_marker(self) -> None:
        """The marker, written whole (a temporary file renamed over it) after the schema."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        temporary = f"{self.marker}.{os.getpid()}.{id(self):x}.tmp"  # (unique per opener)
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(f"node-services IPAM store initialised {stamp}\n")
        os.replace(temporary, self.marker)

    def transaction(self) -> _Command:
        """``with store.transaction() as tx``: ``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back
        on any exception."""
        return _Command(self)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class _Command:
    """The context manager of one transaction (contextlib costs the plugin an import)."""

    __slots__ = ("db", "store")

    def __init__(self, store: IPAMStore) -> None:
        self.store = store
        self.db: sqlite3.Connection | None = None

    def __enter__(self) -> Transaction:
        db = self.store._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise _translate(exc, self.store.path) from exc
        self.db = db
        return Transaction(db)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        db = self.db
        assert db is not None
        if kind is not None:
            # A corrupt file can fail the rollback too; the original error tells the cause.
            # (contextlib.suppress would cost the plugin's start-up an import.)
            try:  # noqa: SIM105
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if exc is not None and isinstance(exc, sqlite3.Error):
                # A damaged page ("database disk image is malformed") or any other SQLite
                # failure inside the command: the store cannot be used (code 5), not a bug.
                if isinstance(exc, sqlite3.OperationalError):
                    raise _translate(exc, self.store.path) from exc
                raise StoreError(f"{self.store.path}: {exc}") from exc
            return
        try:
            db.execute("COMMIT")
        except sqlite3.OperationalError as error:
            db.execute("ROLLBACK")
            raise _translate(error, self.store.path) from error


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _translate(exc: sqlite3.OperationalError, path: str) -> StoreError:
    text = str(exc)
    if _is_busy(exc):
        return StoreBusy(f"{path} is locked by another process: {text}")
    return StoreError(f"{path}: {text}")
