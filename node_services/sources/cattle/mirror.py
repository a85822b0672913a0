"""The live Cattle source's view of the project: translated resources, resolved one by one.

:func:`~node_services.sources.cattle.translate.resolve` is a post-pass over a whole set (a
snapshot file, a relist). A change event touches one resource, so the mirror keeps every
resource's translated items (records and network facts) with the indexes the post-pass needs,
and on a change re-resolves only what depends on it:

- the resource's own records;
- a stack whose name changed: its services and containers, and the endpoint groups of its
  services (their namespace is the stack's name);
- a service whose name or stack changed: the endpoint groups naming it;
- a network, subnet or project fact: every Cattle host, when the default pod CIDRs changed.

:meth:`Mirror.reset` and :meth:`Mirror.update` give exactly the records ``resolve`` would give
for the same set (tests/sources/test_cattle_mirror.py checks it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from node_services.sources.cattle import translate
from node_services.sources.cattle.translate import (
    CattleNetwork,
    CattleProject,
    CattleSubnet,
    Translated,
)
from node_services.state.records import (
    Change,
    Deleted,
    Endpoints,
    Host,
    Record,
    Service,
    Stack,
    Workload,
)

_FACTS = (CattleNetwork, CattleSubnet, CattleProject)
_JOINED = (Stack, Service, *_FACTS)
"""What other resources' records depend on (names, pod CIDRs)."""


class Mirror:
    """Resource key (``translate.key(type, id)``) -> translated items, and the records
    published for it."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._items: dict[str, tuple[Translated, ...]] = {}
        self._records: dict[str, tuple[Record, ...]] = {}
        self._stack_names: dict[str, str] = {}
        self._services: dict[str, Service] = {}  # unresolved, by key
        self._in_stack: dict[str, set[str]] = {}  # stack key -> service/container resources
        self._of_service: dict[str, set[str]] = {}  # service key -> containers with endpoints
        self._hosts: set[str] = set()
        self._fact_resources: set[str] = set()
        self._cidrs: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, resource_key: object) -> bool:
        return resource_key in self._items

    @property
    def pod_cidrs(self) -> tuple[str, ...]:
        return self._cidrs

    def records(self) -> list[Record]:
        return [record for records in self._records.values() for record in records]

    # -- whole set ------------------------------------------------------------------------------

    def reset(self, items: Mapping[str, Sequence[Translated]]) -> list[Record]:
        """Make ``items`` the whole content (a relist); the records to ``replace`` with."""
        self._clear()
        for resource_key, translated in items.items():
            if translated:
                self._items[resource_key] = tuple(translated)
                self._index(resource_key, self._items[resource_key])
        self._cidrs = self._compute_cidrs()
        for resource_key, translated in self._items.items():
            resolved = tuple(self._resolve(item) for item in translated if not _is_fact(item))
            if resolved:
                self._records[resource_key] = resolved
        return self.records()

    # -- changes --------------------------------------------------------------------------------

    def update(self, changes: Mapping[str, Sequence[Translated] | None]) -> list[Change]:
        """Apply new items per resource (empty or None: the resource is gone); the store
        changes (upserts and deletions) that follow, as one batch."""
        dirty: set[str] = set()
        facts_changed = False
        for resource_key, translated in changes.items():
            old = self._items.get(resource_key, ())
            new = tuple(translated or ())
            if not any(isinstance(item, _JOINED) for item in (*old, *new)):
                # the common case (a container, a host): nothing else depends on it
                self._unindex(resource_key, old)
                if new:
                    self._items[resource_key] = new
                    self._index(resource_key, new)
                else:
                    self._items.pop(resource_key, None)
                dirty.add(resource_key)
                continue
            old_stacks = _stack_names(old)
            old_services = _service_ids(old)
            self._unindex(resource_key, old)
            if new:
                self._items[resource_key] = new
                self._index(resource_key, new)
            else:
                self._items.pop(resource_key, None)
            dirty.add(resource_key)
            new_stacks = _stack_names(new)
            for stack_key in old_stacks.keys() | new_stacks.keys():
                if old_stacks.get(stack_key) != new_stacks.get(stack_key):
                    members = self._in_stack.get(stack_key, set())
                    dirty |= members
                    for member in members:
                        for item in self._items.get(member, ()):
                            if isinstance(item, Service):
                                dirty |= self._of_service.get(item.key, set())
            new_services = _service_ids(new)
            for service_key in old_services.keys() | new_services.keys():
                if old_services.get(service_key) != new_services.get(service_key):
                    dirty |= self._of_service.get(service_key, set())
            if any(_is_fact(item) for item in (*old, *new)):
                facts_changed = True
        if facts_changed:
            cidrs = self._compute_cidrs()
            if cidrs != self._cidrs:
                self._cidrs = cidrs
                dirty |= self._hosts
        out: list[Change] = []
        for resource_key in dirty:
            old_records = self._records.get(resource_key, ())
            new_records = tuple(
                self._resolve(item)
                for item in self._items.get(resource_key, ())
                if not _is_fact(item)
            )
            if new_records:
                self._records[resource_key] = new_records
            else:
                self._records.pop(resource_key, None)
            before = {record.key: record for record in old_records}
            kept = {record.key for record in new_records}
            out.extend(Deleted(key) for key in before if key not in kept)
            out.extend(record for record in new_records if before.get(record.key) != record)
        return out

    # -- indexes --------------------------------------------------------------------------------

    def _index(self, resource_key: str, items: Iterable[Translated]) -> None:
        for item in items:
            if isinstance(item, Stack):
                self._stack_names[item.key] = item.name
            elif isinstance(item, Service):
                self._services[item.key] = item
                self._in_stack.setdefault(item.stack_key, set()).add(resource_key)
            elif isinstance(item, Workload):
                if item.stack_key:
                    self._in_stack.setdefault(item.stack_key, set()).add(resource_key)
            elif isinstance(item, Endpoints):
                self._of_service.setdefault(item.service_key, set()).add(resource_key)
            elif isinstance(item, Host):
                self._hosts.add(resource_key)
            elif _is_fact(item):
                self._fact_resources.add(resource_key)

    def _unindex(self, resource_key: str, items: Iterable[Translated]) -> None:
        for item in items:
            if isinstance(item, Stack):
                self._stack_names.pop(item.key, None)
            elif isinstance(item, Service):
                self._services.pop(item.key, None)
                _discard(self._in_stack, item.stack_key, resource_key)
            elif isinstance(item, Workload):
                _discard(self._in_stack, item.stack_key, resource_key)
            elif isinstance(item, Endpoints):
                _discard(self._of_service, item.service_key, resource_key)
            elif isinstance(item, Host):
                self._hosts.discard(resource_key)
            elif _is_fact(item):
                self._fact_resources.discard(resource_key)

    def _compute_cidrs(self) -> tuple[str, ...]:
        return translate.host_pod_cidrs(
            item for key in sorted(self._fact_resources) for item in self._items.get(key, ())
        )

    # -- resolution (as translate.resolve_networks and resolve_stack_names do it) ---------------

    def _resolve(self, record: Translated) -> Record:
        assert not _is_fact(record)
        if isinstance(record, Host):
            if record.key.startswith(translate.PREFIX) and not record.pod_cidrs and self._cidrs:
                return dataclasses.replace(record, pod_cidrs=self._cidrs)
            return record
        if isinstance(record, Service | Workload):
            name = self._stack_names.get(record.stack_key)
            if name is not None and record.namespace != name:
                return dataclasses.replace(record, namespace=name)
            return record
        if isinstance(record, Endpoints) and record.key.startswith(translate.PREFIX):
            service = self._services.get(record.service_key)
            if service is not None:
                name = self._stack_names.get(service.stack_key, record.namespace)
                if (record.namespace, record.service) != (name, service.name):
                    return dataclasses.replace(record, namespace=name, service=service.name)
        return record  # type: ignore[return-value]


def _is_fact(item: Translated) -> bool:
    return isinstance(item, _FACTS)


def _stack_names(items: Iterable[Translated]) -> dict[str, str]:
    return {item.key: item.name for item in items if isinstance(item, Stack)}


def _service_ids(items: Iterable[Translated]) -> dict[str, tuple[str, str]]:
    return {item.key: (item.name, item.stack_key) for item in items if isinstance(item, Service)}


def _discard(index: dict[str, set[str]], key: str, member: str) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(member)
        if not members:
            del index[key]
