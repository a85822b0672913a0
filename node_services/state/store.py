"""The shared state cache: sources write records, services read immutable snapshots.

Writers call :meth:`Store.replace` (a full relist: records the source no longer has vanish) or
:meth:`Store.apply` (watch events). Each call that changes anything publishes one new
:class:`Snapshot` with the next version. Readers hold a snapshot as long as they like: it is
never mutated. Long-polls use :meth:`Store.wait_for_change`; services that rebuild views
incrementally use :meth:`Store.subscribe` and get the keys that changed.

When two sources hold the same key, the source registered first wins; the other's record
shows again if the winner drops it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeAlias

from node_services.state.frozenmap import FrozenMap
from node_services.state.records import (
    ENDPOINTS,
    HOST,
    KIND_OF,
    KINDS,
    SERVICE,
    STACK,
    WORKLOAD,
    Change,
    Deleted,
    Endpoints,
    Host,
    Record,
    Service,
    Stack,
    Workload,
    kind_of,
)

_NO_KEYS: Final[tuple[str, ...]] = ()
OFF_LOOP_REPLACE: Final = 1000
"""Records below which :meth:`Store.replace_async` merges on the loop, as :meth:`replace`."""

_Changed: TypeAlias = dict[str, tuple[Record | None, Record | None]]
"""Key -> (new record or None when gone, record in the current snapshot or None)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One published, immutable state of the cache, with its indexes."""

    version: int
    hosts: FrozenMap[str, Host]
    stacks: FrozenMap[str, Stack]
    services: FrozenMap[str, Service]
    endpoints: FrozenMap[str, Endpoints]
    workloads: FrozenMap[str, Workload]
    by_ip: FrozenMap[str, tuple[str, ...]]
    """IP -> keys of the workloads, services and endpoint groups that hold it."""
    by_host: FrozenMap[str, tuple[str, ...]]
    """Host key -> keys of the workloads scheduled on it."""
    by_name: FrozenMap[tuple[str, str], tuple[str, ...]]
    """(namespace or stack, service name) -> service keys (Kubernetes and Cattle may share)."""
    endpoints_of: FrozenMap[str, tuple[str, ...]]
    """Service key -> keys of its endpoint groups."""
    synced: Mapping[str, bool]
    """Source name -> whether its first full list has landed."""

    @property
    def all_synced(self) -> bool:
        return all(self.synced.values())

    def by_kind(self, kind: str) -> FrozenMap[str, Record]:
        return getattr(self, _FIELD_OF_KIND[kind])  # type: ignore[no-any-return]

    def get(self, key: str) -> Record | None:
        # The maps of KINDS, in that order, without a getattr per kind.
        for records in (self.hosts, self.stacks, self.services, self.endpoints, self.workloads):
            record = records.get(key)
            if record is not None:
                return record
        return None

    def counts(self) -> dict[str, int]:
        """Number of records of each kind."""
        return {kind: len(self.by_kind(kind)) for kind in KINDS}

    def service(self, namespace: str, name: str, *, source_prefix: str = "") -> Service | None:
        """The service of that name; ``source_prefix`` ("k8s:" or "cattle:") narrows the match."""
        for key in self.by_name.get((namespace, name), _NO_KEYS):
            if key.startswith(source_prefix):
                return self.services.get(key)
        return None

    def endpoints_for(self, service_key: str) -> tuple[Endpoints, ...]:
        groups = (self.endpoints.get(k) for k in self.endpoints_of.get(service_key, _NO_KEYS))
        return tuple(g for g in groups if g is not None)

    def workloads_on(self, host_key: str) -> tuple[Workload, ...]:
        found = (self.workloads.get(k) for k in self.by_host.get(host_key, _NO_KEYS))
        return tuple(w for w in found if w is not None)

    def workload_by_ip(self, ip: str) -> Workload | None:
        """The workload that owns this IP (host-network workloads excluded)."""
        for key in self.by_ip.get(ip, _NO_KEYS):
            workload = self.workloads.get(key)
            if workload is not None and not workload.host_network:
                return workload
        return None

    def host_named(self, name: str) -> Host | None:
        """A host by node name or hostname. When two sources name the same host (a
        Kubernetes Node and a Cattle host both ``node-a``), one wins by a fixed rule: the one
        with pod CIDRs (IPAM and the overlay need them), then the Kubernetes Node, then the
        lowest key. :meth:`hosts_named` gives them all."""
        found = self.hosts_named(name)
        return found[0] if found else None

    def hosts_named(self, name: str) -> tuple[Host, ...]:
        """Every host by node name or hostname, the one :meth:`host_named` picks first."""
        found = [host for host in self.hosts.values() if name in (host.name, host.hostname)]
        if len(found) > 1:
            found.sort(key=lambda h: (not h.pod_cidrs, not h.key.startswith("k8s:"), h.key))
        return tuple(found)


_FIELD_OF_KIND: Final = {
    HOST: "hosts",
    STACK: "stacks",
    SERVICE: "services",
    ENDPOINTS: "endpoints",
    WORKLOAD: "workloads",
}
_FIELD_OF_TYPE: Final[dict[type, str]] = {
    cls: _FIELD_OF_KIND[kind] for cls, kind in KIND_OF.items()
}


def _empty_snapshot() -> Snapshot:
    return Snapshot(
        version=0,
        hosts=FrozenMap(),
        stacks=FrozenMap(),
        services=FrozenMap(),
        endpoints=FrozenMap(),
        workloads=FrozenMap(),
        by_ip=FrozenMap(),
        by_host=FrozenMap(),
        by_name=FrozenMap(),
        endpoints_of=FrozenMap(),
        synced=MappingProxyType({}),
    )


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """What a subscriber learns: the snapshot to read and the keys changed since its last read.

    ``full`` is true on a subscriber's first read: build everything from ``snapshot``.
    """

    snapshot: Snapshot
    keys: frozenset[str]
    full: bool = False


@dataclass(eq=False)
class Subscription:
    """Coalescing change feed for one consumer: memory stays bounded however slow it reads."""

    _store: Store
    _pending: set[str] = field(default_factory=set)
    _event: asyncio.Event = field(default_factory=asyncio.Event)
    _first: bool = True
    _closed: bool = False
    _seen_version: int = -1

    def _notify(self, keys: Iterable[str]) -> None:
        self._pending.update(keys)
        self._event.set()

    def poll(self) -> ChangeSet | None:
        """The pending change set, or None when the store has not changed since the last read.

        A change that touched no record (a source's synced flag) comes as an empty ``keys``."""
        snapshot = self._store.snapshot
        self._event.clear()
        if self._closed:
            return None
        if self._first:
            self._first = False
            self._pending.clear()
            self._seen_version = snapshot.version
            return ChangeSet(snapshot, frozenset(), full=True)
        if not self._pending and snapshot.version == self._seen_version:
            return None
        keys = frozenset(self._pending)
        self._pending.clear()
        self._seen_version = snapshot.version
        return ChangeSet(snapshot, keys)

    async def next(self) -> ChangeSet:
        """Wait for and return the next change set."""
        while True:
            changes = self.poll()
            if changes is not None:
                return changes
            await self._event.wait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._store._subscriptions.remove(self)


class Store:
    """The cache. Single-threaded: call it from the event loop that reads it."""

    def __init__(self) -> None:
        self._by_source: dict[str, dict[str, Record]] = {}
        self._synced: dict[str, bool] = {}
        self._snapshot = _empty_snapshot()
        self._change_future: asyncio.Future[None] | None = None
        self._subscriptions: list[Subscription] = []

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def version(self) -> int:
        return self._snapshot.version

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self._by_source)

    def register(self, source: str) -> None:
        """Declare a source so readiness waits for it; earlier sources win key conflicts."""
        if source not in self._by_source:
            self._by_source[source] = {}
            self._synced[source] = False
            self._publish({}, synced_changed=True)

    def mark_synced(self, source: str, synced: bool = True) -> None:
        self.register(source)
        if self._synced[source] != synced:
            self._synced[source] = synced
            self._publish({}, synced_changed=True)

    def replace(self, source: str, records: Iterable[Record], *, synced: bool = True) -> int:
        """Make ``records`` the source's whole content; what it held before and not now vanishes.

        Returns the version after the call. Marks the source synced unless told otherwise.
        """
        self.register(source)
        old = self._by_source[source]
        new = _by_key(records)
        self._by_source[source] = new
        touched = _touched(old, new)
        synced_changed = self._synced[source] != synced
        self._synced[source] = synced
        return self._publish(self._merge(touched), synced_changed=synced_changed)

    async def replace_async(
        self,
        source: str,
        records: Iterable[Record],
        *,
        synced: bool = True,
        min_records: int = OFF_LOOP_REPLACE,
    ) -> int:
        """:meth:`replace` for a large content: the new snapshot is computed in a worker
        thread (a 68k-service file costs the loop ~1 s otherwise) and published here, on the
        loop, so readers never see a half-made one. Computed against the snapshot current
        when it starts; if another write lands meanwhile it is computed again (after three
        tries, here, as :meth:`replace` does)."""
        records = records if isinstance(records, Collection) else tuple(records)
        if len(records) < min_records:  # two thread hops would cost more than they save
            return self.replace(source, records, synced=synced)
        self.register(source)
        new = await asyncio.to_thread(_by_key, records)
        for _ in range(3):
            base = self._snapshot
            old = self._by_source[source]
            # The worker reads the other sources' dicts while the loop may still write them:
            # any write publishes a new snapshot, and the result is then thrown away.
            sources = [new if name == source else held for name, held in self._by_source.items()]
            synced_now = {**self._synced, source: synced}
            changed, snapshot = await asyncio.to_thread(
                _plan_replace, base, old, new, sources, synced_now
            )
            if self._snapshot is base and self._by_source[source] is old:
                return self._commit_replace(source, new, synced, changed, snapshot)
        return self.replace(source, new.values(), synced=synced)

    def _commit_replace(
        self,
        source: str,
        new: dict[str, Record],
        synced: bool,
        changed: _Changed,
        snapshot: Snapshot | None,
    ) -> int:
        self._by_source[source] = new
        synced_changed = self._synced[source] != synced
        self._synced[source] = synced
        if snapshot is None:
            return self._publish(changed, synced_changed=synced_changed)
        self._snapshot = snapshot
        self._wake(changed)
        return snapshot.version

    def apply(self, source: str, changes: Iterable[Change], *, compared: bool = False) -> int:
        """Apply upserts and deletions as one batch: at most one new version.

        ``compared``: the caller already left out every upsert equal to the record the source
        held for its key, so the store does not compare them again (a record equal to the one
        published only costs its readers a needless rebuild; it is never wrong)."""
        self.register(source)
        held = self._by_source[source]
        if compared and len(self._by_source) == 1:  # (a source's events, with no other)
            return self._publish(_apply_only(self._snapshot, held, changes))
        touched: set[str] = set()
        before: dict[str, Record] | None = {} if compared else None
        for change in changes:
            if isinstance(change, Deleted):
                if held.pop(change.key, None) is not None:
                    touched.add(change.key)
            else:
                key = change.key
                if before is not None:
                    previous = held.get(key)
                    if previous is not None:
                        before.setdefault(key, previous)
                held[key] = change
                touched.add(key)
        return self._publish(_merge(self._snapshot, self._by_source.values(), touched, before))

    async def wait_for_change(self, since: int, timeout: float) -> Snapshot:  # noqa: ASYNC109
        """Return the first snapshot whose version differs from ``since``, or the current one
        after ``timeout`` seconds."""
        if self._snapshot.version != since:
            return self._snapshot
        if self._change_future is None or self._change_future.done():
            self._change_future = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._change_future)
        except TimeoutError:
            pass
        return self._snapshot

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self._subscriptions.append(subscription)
        return subscription

    # -- internals -------------------------------------------------------------------------

    def _merge(self, keys: set[str]) -> _Changed:
        """(winning record or None: gone, current record) for each key whose merged value
        changed."""
        return _merge(self._snapshot, self._by_source.values(), keys)

    def _publish(self, changed: _Changed, *, synced_changed: bool = False) -> int:
        if not changed and not synced_changed:
            return self._snapshot.version
        self._snapshot = _evolve(self._snapshot, changed, self._synced)
        self._wake(changed)
        return self._snapshot.version

    def _wake(self, changed: _Changed) -> None:
        if self._change_future is not None and not self._change_future.done():
            self._change_future.set_result(None)
        self._change_future = None
        for subscription in self._subscriptions:
            subscription._notify(changed)


def _merge(
    snapshot: Snapshot,
    sources: Iterable[Mapping[str, Record]],
    keys: set[str],
    compared: Mapping[str, Record] | None = None,
) -> _Changed:
    """(winning record or None: gone, record in ``snapshot``) for each key whose merged value
    differs from ``snapshot``; ``sources`` in registration order. ``compared``: key -> the
    record a source held before an upsert its caller knows differs from it (not compared
    again when it is the current one)."""
    changed: _Changed = {}
    sources = tuple(sources)
    gets = {cls: getattr(snapshot, name).get for cls, name in _FIELD_OF_TYPE.items()}
    only = sources[0] if len(sources) == 1 else None
    for key in keys:
        winner: Record | None = None
        if only is not None:
            winner = only.get(key)
        else:
            for held in sources:
                winner = held.get(key)
                if winner is not None:
                    break
        # A key is in one kind's map at most: the winner's kind first (an update keeps its
        # kind), every kind only when it is not there.
        current = gets[type(winner)](key) if winner is not None else None
        if current is None:
            current = snapshot.get(key)
        if winner is current:
            continue
        if (
            winner is not None
            and current is not None
            and (compared is None or compared.get(key) is not current)
            and winner == current
        ):
            continue
        changed[key] = (winner, current)
    return changed


def _apply_only(snapshot: Snapshot, held: dict[str, Record], changes: Iterable[Change]) -> _Changed:
    """:meth:`Store.apply` (``compared``) for the one source there is: ``held`` edited, and
    what :func:`_merge` would find changed, in the same pass (the winner of a key is what the
    source now holds for it)."""
    changed: _Changed = {}
    gets = {cls: getattr(snapshot, name).get for cls, name in _FIELD_OF_TYPE.items()}
    for change in changes:
        key = change.key
        if isinstance(change, Deleted):
            previous = held.pop(key, None)
            if previous is None:
                continue
            current = snapshot.get(key)
            if current is None:
                changed.pop(key, None)
            else:
                changed[key] = (None, current)
            continue
        previous = held.get(key)
        held[key] = change
        current = gets[type(change)](key)
        if current is None:
            current = snapshot.get(key)  # (a record that changed kind)
        if current is change or (
            current is not None and previous is not current and change == current
        ):  # the caller compared ``change`` with ``previous`` only: one published earlier
            changed.pop(key, None)
            continue
        changed[key] = (change, current)
    return changed


def _by_key(records: Iterable[Record]) -> dict[str, Record]:
    return {record.key: record for record in records}


def _touched(old: Mapping[str, Record], new: Mapping[str, Record]) -> set[str]:
    """Keys a source's content change may affect: gone, new or replaced records."""
    touched = {key for key in old if key not in new}
    touched.update(key for key, record in new.items() if old.get(key) is not record)
    return touched


def _plan_replace(
    base: Snapshot,
    old: Mapping[str, Record],
    new: Mapping[str, Record],
    sources: Iterable[Mapping[str, Record]],
    synced: dict[str, bool],
) -> tuple[_Changed, Snapshot | None]:
    """What :meth:`Store.replace` computes, from arguments only (so a worker thread can):
    the merged changes and the snapshot to publish (None: nothing changed)."""
    changed = _merge(base, sources, _touched(old, new))
    if not changed and synced == dict(base.synced):
        return changed, None
    return changed, _evolve(base, changed, synced)


class _MultiIndex:
    """Pending edits to one FrozenMap[str-ish, tuple[str, ...]] index.

    Values stay sorted tuples of unique keys. An entry that goes from empty to one key (most
    of them: an IP held by one record) is edited as that 1-tuple, shared by every entry that
    names the same key (the IPs of one endpoint group); a list is made only to edit further.
    """

    __slots__ = ("_base", "_base_get", "_edits", "_singles")

    def __init__(self, base: FrozenMap[object, tuple[str, ...]]) -> None:
        self._base = base
        self._base_get = base.get
        self._edits: dict[object, list[str] | tuple[str, ...]] = {}
        self._singles: dict[str, tuple[str, ...]] = {}

    def _values(self, index_key: object) -> list[str]:
        values = self._edits.get(index_key)
        if values is None:
            values = self._edits[index_key] = list(self._base_get(index_key, _NO_KEYS))
        elif isinstance(values, tuple):
            values = self._edits[index_key] = list(values)
        return values

    def add(self, index_key: object, key: str) -> None:
        if index_key not in self._edits and self._base_get(index_key) is None:
            single = self._singles.get(key)
            if single is None:
                single = self._singles[key] = (key,)
            self._edits[index_key] = single
            return
        values = self._values(index_key)
        if key not in values:
            values.append(key)

    def remove(self, index_key: object, key: str) -> None:
        values = self._values(index_key)
        if key in values:
            values.remove(key)

    def build(self) -> FrozenMap[object, tuple[str, ...]]:
        sets = {
            k: v if isinstance(v, tuple) else tuple(sorted(v)) for k, v in self._edits.items() if v
        }
        deletes = [k for k, v in self._edits.items() if not v]
        return self._base.evolve(sets, deletes)


_INDEXES: Final = ("by_ip", "by_host", "by_name", "endpoints_of")


def _index_entries(record: Record) -> tuple[list[tuple[str, object]], str]:
    """(index name, index key) pairs a record contributes, and its kind."""
    kind = kind_of(record)
    entries: list[tuple[str, object]]
    if isinstance(record, Workload):
        entries = [("by_ip", ip) for ip in record.ips]
        if record.host_key:
            entries.append(("by_host", record.host_key))
    elif isinstance(record, Service):
        entries = [("by_ip", ip) for ip in record.cluster_ips]
        entries.append(("by_name", (record.namespace, record.name)))
    elif isinstance(record, Endpoints):
        entries = [("by_ip", ip) for endpoint in record.endpoints for ip in endpoint.addresses]
        entries.append(("endpoints_of", record.service_key))
    else:
        entries = []
    return entries, kind


def _addresses(endpoints: Endpoints) -> tuple[str, ...]:
    groups = endpoints.endpoints
    if len(groups) == 1:
        return groups[0].addresses
    return tuple(ip for endpoint in groups for ip in endpoint.addresses)


def _edit_ips(index: _MultiIndex, key: str, old: tuple[str, ...], new: tuple[str, ...]) -> None:
    """``key`` moved from the IPs ``old`` to ``new`` in ``by_ip``."""
    for ip in old:
        if ip not in new:
            index.remove(ip, key)
    for ip in new:
        if ip not in old:
            index.add(ip, key)


def _evolve(old: Snapshot, changed: _Changed, synced: dict[str, bool]) -> Snapshot:
    sets: dict[str, dict[str, Record]] = {kind: {} for kind in KINDS}
    deletes: dict[str, list[str]] = {kind: [] for kind in KINDS}
    indexes = {name: _MultiIndex(getattr(old, name)) for name in _INDEXES}
    by_ip = indexes["by_ip"]
    workload_sets, endpoint_sets = sets[WORKLOAD], sets[ENDPOINTS]
    for key, (record, previous) in changed.items():
        cls = type(record)
        if previous is not None and cls is type(previous):  # (record is not None: no None)
            # An update in place (a watch event): edit only the index entries that differ,
            # which for most updates (conditions, ports, labels) is none.
            if cls is Workload:  # the common case, settled without building the entries
                assert isinstance(previous, Workload) and isinstance(record, Workload)
                workload_sets[key] = record
                if previous.ips != record.ips:
                    _edit_ips(by_ip, key, previous.ips, record.ips)
                if previous.host_key != record.host_key:
                    if previous.host_key:
                        indexes["by_host"].remove(previous.host_key, key)
                    if record.host_key:
                        indexes["by_host"].add(record.host_key, key)
                continue
            if cls is Endpoints:
                assert isinstance(previous, Endpoints) and isinstance(record, Endpoints)
                endpoint_sets[key] = record
                groups, old_groups = record.endpoints, previous.endpoints
                if len(groups) == 1 and len(old_groups) == 1:
                    old_ips, new_ips = old_groups[0].addresses, groups[0].addresses
                else:
                    old_ips, new_ips = _addresses(previous), _addresses(record)
                if old_ips != new_ips:
                    _edit_ips(by_ip, key, old_ips, new_ips)
                if previous.service_key != record.service_key:
                    indexes["endpoints_of"].remove(previous.service_key, key)
                    indexes["endpoints_of"].add(record.service_key, key)
                continue
            assert record is not None
            old_entries, kind = _index_entries(previous)
            new_entries, _ = _index_entries(record)
            if old_entries != new_entries:
                kept = set(old_entries).intersection(new_entries)
                for name, index_key in old_entries:
                    if (name, index_key) not in kept:
                        indexes[name].remove(index_key, key)
                for name, index_key in new_entries:
                    if (name, index_key) not in kept:
                        indexes[name].add(index_key, key)
            sets[kind][key] = record
            continue
        if previous is not None:
            entries, kind = _index_entries(previous)
            for name, index_key in entries:
                indexes[name].remove(index_key, key)
            if record is None or kind_of(record) != kind:
                deletes[kind].append(key)
        if record is not None:
            entries, kind = _index_entries(record)
            for name, index_key in entries:
                indexes[name].add(index_key, key)
            sets[kind][key] = record
    maps = {
        _FIELD_OF_KIND[kind]: old.by_kind(kind).evolve(sets[kind], deletes[kind]) for kind in KINDS
    }
    built = {name: index.build() for name, index in indexes.items()}
    return Snapshot(
        version=old.version + 1,
        synced=MappingProxyType(dict(synced)),
        **maps,  # type: ignore[arg-type]
        **built,  # type: ignore[arg-type]
    )
