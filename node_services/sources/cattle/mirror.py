"""The live Cattle source's view of the project: translated resources, resolved one by one.

:func:`~node_services.sources.cattle.translate.resolve` is a post-pass over a whole set (a
snapshot file, a relist). A change event touches one resource, so the mirror keeps every
resource's translated items (records and facts) with the indexes the post-pass needs, and on a
change re-resolves only what depends on it:

- the resource's own records;
- a stack whose name changed: its services and containers, the endpoint groups of its services
  (their namespace is the stack's name) and the load balancers whose port rules name them;
- a service whose name or stack changed (or that came or went): the endpoint groups naming it
  and the load balancers whose port rules name it (``<stack>/<service>``);
- a network, subnet or project fact: every Cattle host when what the default network gives a
  host (``network_json``, pod CIDRs) changed, and the containers on a network whose uuid changed;
- a certificate fact: the load balancers whose ``lbConfig`` names it.

Each record is resolved in :func:`translate.resolve`'s order (networks, stack names, lb
configs), by translate's own functions where they work on a part of the set.
:meth:`Mirror.reset` and :meth:`Mirror.update` give exactly the records ``resolve`` would give
for the same set (tests/sources/test_cattle_mirror.py checks it).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Mapping, Sequence

from node_services.sources.cattle import translate
from node_services.sources.cattle.translate import (
    CattleCertificate,
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
    replacer,
)

_NETWORK_FACTS = (CattleNetwork, CattleSubnet, CattleProject)
_FACTS = (*_NETWORK_FACTS, CattleCertificate)
_JOINED = (Stack, Service, *_FACTS)
"""What other resources' records depend on (names, the default network, network uuids)."""

_replace = translate.replace_record
_name_endpoints = replacer(Endpoints, ("namespace", "service"))


_PROBE = Host(key=f"{translate.PREFIX}host/mirror-probe", source="", name="mirror-probe")
"""A Cattle host without pod CIDRs or network: what resolve_networks makes of it is what it
gives every Cattle host."""


class Mirror:
    """Resource key (``translate.key(type, id)``) -> translated items, and the records
    published for it."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._items: dict[str, tuple[Translated, ...]] = {}
        self._records: dict[str, tuple[Record, ...]] = {}
        # containers whose items are older than their records in the volatile fields (_move)
        self._stale: set[str] = set()
        self._stack_names: dict[str, str] = {}
        self._services: dict[str, Service] = {}  # unresolved, by key
        self._certificates: dict[str, CattleCertificate] = {}
        self._in_stack: dict[str, set[str]] = {}  # stack key -> service/container resources
        self._of_service: dict[str, set[str]] = {}  # service key -> containers with endpoints
        self._lb_service: dict[str, set[str]] = {}  # service key -> lb naming it in a port rule
        self._lb_cert: dict[str, set[str]] = {}  # certificate key -> lb naming it
        self._on_network: dict[str, set[str]] = {}  # network key -> containers on it
        self._hosts: set[str] = set()
        self._network_resources: set[str] = set()  # resources with network/subnet/project facts
        self._networks: tuple[CattleNetwork, ...] = ()
        self._uuids: dict[str, str] = {}  # network key -> uuid
        self._default: Host = _PROBE  # _PROBE as resolve_networks leaves it

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, resource_key: object) -> bool:
        return resource_key in self._items

    @property
    def pod_cidrs(self) -> tuple[str, ...]:
        """The pod CIDRs every Cattle host without any gets (() = none)."""
        return self._default.pod_cidrs

    @property
    def network_json(self) -> str:
        """The default network every Cattle host shows ("" = none)."""
        return self._default.network_json

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
        self._compute_networks()
        for resource_key, translated in self._items.items():
            resolved = self._resolve(translated)
            if resolved:
                self._records[resource_key] = resolved
        return self.records()

    # -- changes --------------------------------------------------------------------------------

    def update(
        self, changes: Mapping[str, Sequence[Translated] | translate.Volatile | None]
    ) -> list[Change]:
        """Apply new items per resource (empty or None: the resource is gone; a
        :class:`translate.Volatile`: a container's new address, state or health); the store
        changes (upserts and deletions) that follow, as one batch."""
        dirty: set[str] = set()
        volatile: dict[str, translate.Volatile] = {}
        networks_changed = False
        for resource_key, translated in changes.items():
            old = self._items.get(resource_key, ())
            if isinstance(translated, translate.Volatile):
                # The memo's records become the items (stale in the volatile fields, which
                # the records get: see _move); mostly they are the items held already.
                volatile[resource_key] = translated
                if _same_items(old, translated.base):
                    continue
                translated = translated.base
            new = tuple(translated or ())
            if new and _same_index(old, new):
                # the common case (a container, a host: nothing else depends on it) and an
                # event that moved none of its index entries
                self._items[resource_key] = new
                self._stale.discard(resource_key)
                dirty.add(resource_key)
                continue
            if not (_joined(old) or _joined(new)):  # nothing else depends on it
                self._replace(resource_key, old, new)
                dirty.add(resource_key)
                continue
            old_stacks = _stack_names(old)
            old_services = _service_ids(old)
            old_certificates = _certificate_names(old)
            self._replace(resource_key, old, new)
            dirty.add(resource_key)
            new_stacks = _stack_names(new)
            for stack_key in _differing(old_stacks, new_stacks):
                members = self._in_stack.get(stack_key, set())
                dirty |= members
                for member in members:
                    for item in self._items.get(member, ()):
                        if isinstance(item, Service):
                            dirty |= self._of_service.get(item.key, set())
                            dirty |= self._lb_service.get(item.key, set())
            for service_key in _differing(old_services, _service_ids(new)):
                dirty |= self._of_service.get(service_key, set())
                dirty |= self._lb_service.get(service_key, set())
            for certificate_key in _differing(old_certificates, _certificate_names(new)):
                dirty |= self._lb_cert.get(certificate_key, set())
            if any(isinstance(item, _NETWORK_FACTS) for item in (*old, *new)):
                networks_changed = True
        if networks_changed:
            default, uuids = self._default, self._uuids
            self._compute_networks()
            if self._default != default:
                dirty |= self._hosts
            for network_key in _differing(uuids, self._uuids):
                dirty |= self._on_network.get(network_key, set())
        out: list[Change] = []
        for resource_key, change in volatile.items():
            if resource_key not in dirty and not self._move(resource_key, change, out):
                dirty.add(resource_key)
        for resource_key in dirty:
            old_records = self._records.get(resource_key, ())
            new_records = self._resolve(self._items.get(resource_key, ()))
            moving: translate.Volatile | Record | None = volatile.get(resource_key)
            if moving is None and resource_key in self._stale and old_records:
                moving = old_records[0]  # its Workload: the fields its records hold now
            if isinstance(moving, translate.Volatile | Workload) and new_records:
                new_records = tuple(translate.moved(new_records, moving))
                self._stale.add(resource_key)
            if new_records:
                self._records[resource_key] = new_records
            else:
                self._records.pop(resource_key, None)
            if len(old_records) == len(new_records) and all(
                map(_same_key, old_records, new_records)
            ):  # the same records (an event's usual result): compared pairwise
                for held, record in zip(old_records, new_records, strict=True):
                    if held is not record and held != record:
                        out.append(record)
                continue
            before = {record.key: record for record in old_records}
            kept = {record.key for record in new_records}
            out.extend(Deleted(key) for key in before if key not in kept)
            for record in new_records:
                previous = before.get(record.key)
                if previous is not record and previous != record:
                    out.append(record)
        return out

    def _move(self, resource_key: str, change: translate.Volatile, out: list[Change]) -> bool:
        """A container's new volatile fields, onto the records held for it (resolved from its
        items, ``change.base``): resolution reads none of those fields (it sets network uuids
        and stack and service names), so it would give the same records. The items are left
        as they are, stale in those fields: when the container is resolved again (a name or
        network it reads changed), its records get them back from ``moved``. False (nothing
        done) when the records held are not a container's (resolved again instead)."""
        held = self._records.get(resource_key, ())
        workload = held[0] if held else None
        if type(workload) is not Workload or len(held) != len(change.base):
            return False
        assert isinstance(workload, Workload)
        self._stale.add(resource_key)
        if (workload.ips, workload.state, workload.health_state) == (
            change.ips,
            change.state,
            change.health_state,
        ):  # (ready follows from state and health)
            return True
        records = translate.moved(held, change)
        out.extend(new for new, old in zip(records, held, strict=True) if new is not old)
        self._records[resource_key] = tuple(records)
        return True

    def _replace(
        self, resource_key: str, old: Sequence[Translated], new: tuple[Translated, ...]
    ) -> None:
        self._stale.discard(resource_key)
        self._unindex(resource_key, old)
        if new:
            self._items[resource_key] = new
            self._index(resource_key, new)
        else:
            self._items.pop(resource_key, None)

    # -- indexes --------------------------------------------------------------------------------

    def _index(self, resource_key: str, items: Iterable[Translated]) -> None:
        for item in items:
            if isinstance(item, Stack):
                self._stack_names[item.key] = item.name
            elif isinstance(item, Service):
                self._services[item.key] = item
                self._in_stack.setdefault(item.stack_key, set()).add(resource_key)
                services, certificates = _lb_references(item)
                for target in services:
                    self._lb_service.setdefault(target, set()).add(resource_key)
                for certificate in certificates:
                    self._lb_cert.setdefault(certificate, set()).add(resource_key)
            elif isinstance(item, Workload):
                if item.stack_key:
                    self._in_stack.setdefault(item.stack_key, set()).add(resource_key)
                if item.network_uuid.startswith(translate.PREFIX):
                    self._on_network.setdefault(item.network_uuid, set()).add(resource_key)
            elif isinstance(item, Endpoints):
                self._of_service.setdefault(item.service_key, set()).add(resource_key)
            elif isinstance(item, Host):
                self._hosts.add(resource_key)
            elif isinstance(item, CattleCertificate):
                self._certificates[item.key] = item
            elif isinstance(item, _NETWORK_FACTS):
                self._network_resources.add(resource_key)

    def _unindex(self, resource_key: str, items: Iterable[Translated]) -> None:
        for item in items:
            if isinstance(item, Stack):
                self._stack_names.pop(item.key, None)
            elif isinstance(item, Service):
                self._services.pop(item.key, None)
                _discard(self._in_stack, item.stack_key, resource_key)
                services, certificates = _lb_references(item)
                for target in services:
                    _discard(self._lb_service, target, resource_key)
                for certificate in certificates:
                    _discard(self._lb_cert, certificate, resource_key)
            elif isinstance(item, Workload):
                _discard(self._in_stack, item.stack_key, resource_key)
                _discard(self._on_network, item.network_uuid, resource_key)
            elif isinstance(item, Endpoints):
                _discard(self._of_service, item.service_key, resource_key)
            elif isinstance(item, Host):
                self._hosts.discard(resource_key)
            elif isinstance(item, CattleCertificate):
                self._certificates.pop(item.key, None)
            elif isinstance(item, _NETWORK_FACTS):
                self._network_resources.discard(resource_key)

    def _compute_networks(self) -> None:
        """What the network facts give: the default network's part of every Cattle host (by
        ``resolve_networks`` on the facts and :data:`_PROBE`) and the network uuids."""
        facts = [
            item
            for key in sorted(self._network_resources)
            for item in self._items.get(key, ())
            if isinstance(item, _NETWORK_FACTS)
        ]
        (probe,) = translate.resolve_networks([*facts, _PROBE])
        assert isinstance(probe, Host)
        self._default = probe
        self._networks = tuple(item for item in facts if isinstance(item, CattleNetwork))
        self._uuids = {network.key: network.uuid for network in self._networks}

    # -- resolution (as translate.resolve does it: networks, stack names, lb configs) -----------

    def _resolve(self, items: Iterable[Translated]) -> tuple[Record, ...]:
        resolved: list[Record] = []
        for record in items:  # each step changes only its own kinds of record
            cls = type(record)
            if cls is Workload:
                assert isinstance(record, Workload)
                # _resolve_network_uuids, then resolve_stack_names, on one workload
                if record.network_uuid.startswith(translate.PREFIX) and record.key.startswith(
                    translate.PREFIX
                ):
                    uuid = self._uuids.get(record.network_uuid, "")
                    record = _replace(record, network_uuid=uuid)
                name = self._stack_names.get(record.stack_key)
                if name is not None and record.namespace != name:
                    record = _replace(record, namespace=name)
            elif cls is Endpoints:
                assert isinstance(record, Endpoints)
                # resolve_stack_names on one endpoint group (_resolve_names, inline)
                service = self._services.get(record.service_key)
                if service is not None and record.key.startswith(translate.PREFIX):
                    name = self._stack_names.get(service.stack_key, record.namespace)
                    if record.namespace != name or record.service != service.name:
                        record = _name_endpoints(record, namespace=name, service=service.name)
            elif cls is Service:
                record = self._resolve_lb_config(self._resolve_names(record))  # type: ignore[arg-type]
            elif cls is Host:
                record = self._resolve_host(record)  # type: ignore[arg-type]
            elif isinstance(record, _FACTS):
                continue
            resolved.append(record)
        return tuple(resolved)

    def _resolve_host(self, record: Record) -> Record:
        """What resolve_networks does to a Cattle host, as it did to :data:`_PROBE`."""
        if not isinstance(record, Host) or not record.key.startswith(translate.PREFIX):
            return record
        if self._default.network_json:
            record = _replace(record, network_json=self._default.network_json)
        if self._default.pod_cidrs and not record.pod_cidrs:
            record = _replace(record, pod_cidrs=self._default.pod_cidrs)
        return record

    def _resolve_names(self, record: Record) -> Record:
        """What resolve_stack_names does to one record."""
        if isinstance(record, Service | Workload):
            name = self._stack_names.get(record.stack_key)
            if name is not None and record.namespace != name:
                return _replace(record, namespace=name)
            return record
        if isinstance(record, Endpoints) and record.key.startswith(translate.PREFIX):
            service = self._services.get(record.service_key)
            if service is not None:
                name = self._stack_names.get(service.stack_key, record.namespace)
                if (record.namespace, record.service) != (name, service.name):
                    return _replace(record, namespace=name, service=service.name)
        return record

    def _resolve_lb_config(self, record: Record) -> Record:
        """resolve_lb_configs on a load balancer with the services (their names resolved) and
        certificates its lbConfig names: all it reads of the whole set."""
        if not isinstance(record, Service) or not record.lb_config_json:
            return record
        services, certificates = _lb_references(record)
        (resolved,) = [
            r
            for r in translate.resolve_lb_configs(
                [
                    record,
                    *(
                        self._resolve_names(self._services[k])
                        for k in sorted(services)
                        if k in self._services and k != record.key
                    ),
                ],
                [self._certificates[k] for k in sorted(certificates) if k in self._certificates],
            )
            if r.key == record.key
        ]
        return resolved


_JOINED_TYPES = frozenset(_JOINED)


def _joined(items: Iterable[Translated]) -> bool:
    """Whether an item is one other resources' records depend on."""
    return not _JOINED_TYPES.isdisjoint(map(type, items))


def _same_items(a: Sequence[Translated], b: Sequence[Translated]) -> bool:
    """Whether ``a`` and ``b`` hold the same objects, in the same order."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _same_key(a: Record, b: Record) -> bool:
    return a.key == b.key


def _same_index(old: Sequence[Translated], new: Sequence[Translated]) -> bool:
    """Whether ``new`` holds the items of ``old`` with the same index entries (the same keys,
    types, and the fields :meth:`Mirror._index` reads): no index needs an edit. Only for the
    kinds that no other resource's records depend on (workloads, endpoint groups, hosts):
    False for any other."""
    if len(old) != len(new):
        return False
    for a, b in zip(old, new, strict=True):
        cls = type(a)
        if cls is not type(b) or a.key != b.key:
            return False
        if cls is Workload:
            assert isinstance(a, Workload) and isinstance(b, Workload)
            if a.stack_key != b.stack_key or a.network_uuid != b.network_uuid:
                return False
        elif cls is Endpoints:
            assert isinstance(a, Endpoints) and isinstance(b, Endpoints)
            if a.service_key != b.service_key:
                return False
        elif cls is not Host:
            return False
    return True


def _lb_references(service: Service) -> tuple[set[str], set[str]]:
    """The service keys (port rules) and certificate keys an unresolved ``lb_config_json``
    names."""
    if not service.lb_config_json:
        return set(), set()
    config = json.loads(service.lb_config_json)
    services = {rule["service"] for rule in config["port_rules"] if rule["service"] is not None}
    certificates = set(config["certs"])
    if config["default_cert"] is not None:
        certificates.add(config["default_cert"])
    return services, certificates


def _stack_names(items: Iterable[Translated]) -> dict[str, str]:
    return {item.key: item.name for item in items if isinstance(item, Stack)}


def _service_ids(items: Iterable[Translated]) -> dict[str, tuple[str, str]]:
    return {item.key: (item.name, item.stack_key) for item in items if isinstance(item, Service)}


def _certificate_names(items: Iterable[Translated]) -> dict[str, str]:
    return {item.key: item.name for item in items if isinstance(item, CattleCertificate)}


def _differing(old: Mapping[str, object], new: Mapping[str, object]) -> set[str]:
    """The keys whose value came, went or changed."""
    return {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}


def _discard(index: dict[str, set[str]], key: str, member: str) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(member)
        if not members:
            del index[key]
