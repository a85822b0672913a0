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

The tables' rows and the queries of one command are :mod:`node_services.ipam.tables`.

Standard library only, and cheap to import (no dataclasses, typing, pathlib or contextlib at
run time): the CNI plugin process imports this module.
"""

from __future__ import annotations

import os
import time

from node_services.ipam.tables import Transaction

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
