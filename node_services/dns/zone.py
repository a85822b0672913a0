"""The authoritative view: store records -> prebuilt wire answers, rebuilt incrementally.

Every in-zone name we answer is a *node*: ``nodes[lowercased wire name]`` maps a query type to
a prebuilt :class:`Answer` (the bytes that follow the question in a response), with key
``-1`` holding the answer for any other type (NODATA, or the CNAME of an ExternalName).
A name that is not a node is NXDOMAIN in its zone (one shared answer per zone), or not ours.

Records are grouped into *units* (a Kubernetes service with its endpoint slices and the pods
naming it as subdomain; a namespace; a pod; a Cattle service; a Cattle container; the static
names). A unit contributes (type, rdata) sets to names; a name's records are the union of its
units' contributions. A store change set maps each changed key to the units it touches
(before and after the change), those units are rebuilt, and only the names whose
contributions changed get new answers. Empty non-terminals (parents of real names) are
reference-counted so they answer NODATA, not NXDOMAIN (RFC 8020).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, TypeAlias

from node_services.dns import wire
from node_services.state.records import Endpoints, Record, Service, Stack, Workload
from node_services.state.store import ChangeSet, Snapshot

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = "1.1.0"
RANCHER_ZONE: Final = "rancher.internal"
DEFAULT_METADATA_IP: Final = "169.254.169.250"
K8S: Final = "k8s:"
CATTLE: Final = "cattle:"
ANY_TYPE: Final = -1
"""Key of a node's answer for every type that has no answer of its own."""

# The RRset an ANY query gets (RFC 8482: one RRset, the first of these the name has).
_ANY_PREFERENCE: Final = (wire.A, wire.AAAA, wire.CNAME, wire.SRV, wire.PTR, wire.TXT, wire.SOA)

Unit: TypeAlias = tuple[str, ...]
RData: TypeAlias = tuple[int, bytes]
RDatas: TypeAlias = tuple[RData, ...]
"""A name's records, sorted: a tuple (a frozenset costs four times the memory)."""
Contribution: TypeAlias = dict[bytes, RDatas]

_STATIC: Final[Unit] = ("static",)


@dataclass(frozen=True, slots=True)
class Answer:
    """A prebuilt response tail: everything after the question, plus header fields."""

    flags: int  # AA and rcode bits of the header
    ancount: int
    nscount: int
    arcount: int
    body: bytes
    ends: tuple[int, ...]  # end offset in body of each answer record (for truncation)
    chase: str = ""  # ExternalName target to resolve for address queries ("" = none)
    heads: tuple[bytes, ...] = ()
    """Header bytes 2-11 (flags and counts) for each client variant, indexed by
    RD | CD << 1 | EDNS << 2: a response is ID + heads[i] + the client's question + body."""


_ENDS: dict[tuple[int, ...], tuple[int, ...]] = {}
"""Interned short record-end tuples (most answers hold one or two records)."""
_HEADS: dict[tuple[int, int, int, int, int], tuple[bytes, ...]] = {}
"""Interned header variants: thousands of answers share a few (flags, counts) shapes."""


def make_answer(
    flags: int,
    ancount: int,
    nscount: int,
    arcount: int,
    body: bytes,
    ends: tuple[int, ...],
    *,
    ra: int,
    chase: str = "",
) -> Answer:
    shape = (flags, ancount, nscount, arcount, ra)
    heads = _HEADS.get(shape)
    if heads is None:
        heads = _HEADS[shape] = _make_heads(flags, ancount, nscount, arcount, ra)
    return Answer(flags, ancount, nscount, arcount, body, ends, chase, heads)


def _make_heads(flags: int, ancount: int, nscount: int, arcount: int, ra: int) -> tuple[bytes, ...]:
    return tuple(
        wire.HEAD.pack(
            wire.QR
            | flags
            | ra
            | (wire.RD if variant & 1 else 0)
            | (wire.CD if variant & 2 else 0),
            1,
            ancount,
            nscount,
            arcount + (1 if variant & 4 else 0),
        )
        for variant in range(8)
    )


@dataclass(frozen=True, slots=True)
class ZoneInfo:
    name: str
    wire: bytes
    authoritative: bool  # reverse zones: only the names we know; the rest is forwarded
    nodata: Answer
    nxdomain: Answer


def _negative(zone: str, zone_wire: bytes, rcode: int, ttl: int, serial: int, ra: int) -> Answer:
    soa = wire.rr(zone_wire, wire.SOA, ttl, wire.rdata_soa(zone, serial, ttl))
    return make_answer(wire.AA | rcode, 0, 1, 0, soa, (), ra=ra)


def dashed(ip: str) -> str:
    """The generated label of an address: 10-42-1-11, 2001-db8--1."""
    return ip.replace(".", "-").replace(":", "-")


def _undashed(label: str) -> str | None:
    """The address a dashed pod label names (:func:`dashed` reversed): ``1-2-3-4`` is
    1.2.3.4; any other label that reads as an IPv6 address with ``-`` for ``:`` is that
    (``2001-db8--5``: three dashes, yet not an IPv4 address); None for anything else."""
    if label.count("-") == 3:
        with contextlib.suppress(ValueError):
            return str(ipaddress.IPv4Address(label.replace("-", ".")))
    if "." in label or "%" in label:  # IPv4-in-IPv6 and scoped forms are not dashed labels
        return None
    try:
        return str(ipaddress.IPv6Address(label.replace("-", ":")))
    except ValueError:
        return None


def _address(ip: str) -> RData:
    if ":" in ip:
        return (wire.AAAA, wire.rdata_aaaa(ip))
    return (wire.A, wire.rdata_a(ip))


class _Builder:
    """Collects one unit's contributions: text names -> (type, rdata)."""

    __slots__ = ("names",)

    def __init__(self) -> None:
        self.names: dict[str, set[RData]] = {}

    def exists(self, name: str) -> None:
        self.names.setdefault(name.lower(), set())

    def add(self, name: str, rtype: int, rdata: bytes) -> None:
        self.names.setdefault(name.lower(), set()).add((rtype, rdata))

    def address(self, name: str, ip: str) -> None:
        self.names.setdefault(name.lower(), set()).add(_address(ip))

    def ptr(self, ip: str, target: str) -> None:
        self.add(wire.reverse_name(ip), wire.PTR, wire.encode_name(target))

    def contribution(self, unit: Unit) -> Contribution:
        out: Contribution = {}
        for name, rdatas in self.names.items():
            try:
                out[wire.encode_name(name)] = tuple(sorted(rdatas))
            except wire.NameError_ as exc:
                log.warning("dns: %s: skipping a name: %s", "/".join(unit), exc)
        return out


class Zone:
    """Prebuilt answers for the cluster zone, rancher.internal and known reverse names."""

    def __init__(
        self,
        *,
        cluster_domain: str = "cluster.local",
        ttl: int = 5,
        pod_records: str = "disabled",
        metadata_ip: str = DEFAULT_METADATA_IP,
        nameservers: tuple[str, ...] = (),
        forwarding: bool = False,
        serial: int | None = None,
    ) -> None:
        self.domain = cluster_domain.rstrip(".").lower()
        self.nameservers = nameservers
        """Addresses of ``ns.dns.<zone>``, the NS of the cluster zone's apex (its glue): the
        DNS listen addresses that are not wildcards."""
        self.ns_name = f"ns.dns.{self.domain}"
        self.ttl = ttl
        self.pod_records = pod_records
        self.metadata_ip = metadata_ip
        self.forwarding = forwarding
        self.ra = wire.RA if forwarding else 0
        self.serial = int(time.time()) if serial is None else serial
        self.ready = False
        self.version = 0
        self.nodes: dict[bytes, dict[int, Answer]] = {}
        self.zones: tuple[ZoneInfo, ...] = tuple(
            self._zone_info(name, auth)
            for name, auth in (
                (self.domain, True),
                (RANCHER_ZONE, True),
                ("in-addr.arpa", not forwarding),
                ("ip6.arpa", not forwarding),
            )
        )
        self._cluster = self.zones[0]
        self._pod_suffix = wire.encode_name("pod." + self.domain)
        self._unit_out: dict[Unit, Contribution] = {}
        self._name_units: dict[bytes, tuple[Unit, ...]] = {}
        self._ent_refs: dict[bytes, int] = {}
        self._exists: set[bytes] = set()
        self._key_units: dict[str, tuple[Unit, ...]] = {}
        self._subdomains: dict[tuple[str, str], set[str]] = {}
        self._pod_subdomain: dict[str, tuple[str, str]] = {}
        self._dependents: dict[str, set[Unit]] = {}

    def empty_copy(self) -> Zone:
        """A zone with this one's settings and serial and no names: to build a new view in a
        worker thread while this one keeps answering."""
        return Zone(
            cluster_domain=self.domain,
            ttl=self.ttl,
            pod_records=self.pod_records,
            metadata_ip=self.metadata_ip,
            nameservers=self.nameservers,
            forwarding=self.forwarding,
            serial=self.serial,
        )

    def _zone_info(self, name: str, authoritative: bool) -> ZoneInfo:
        zone_wire = wire.encode_name(name)
        return ZoneInfo(
            name,
            zone_wire,
            authoritative,
            _negative(name, zone_wire, wire.NOERROR, self.ttl, self.serial, self.ra),
            _negative(name, zone_wire, wire.NXDOMAIN, self.ttl, self.serial, self.ra),
        )

    # -- queries ---------------------------------------------------------------------------

    def zone_of(self, lname: bytes, offsets: Iterable[int]) -> ZoneInfo | None:
        """The zone (ours or a reverse zone) a lowercased wire name falls in, if any."""
        size = len(lname)
        for zone in self.zones:
            start = size - len(zone.wire)
            if start >= 0 and lname.endswith(zone.wire) and start in offsets:
                return zone
        return None

    def zone_for(self, lname: bytes) -> ZoneInfo | None:
        """Like :meth:`zone_of` for a name not yet checked: None also when the name is not a
        well-formed wire name ending exactly at its end."""
        for zone in self.zones:
            if lname.endswith(zone.wire):
                start = len(lname) - len(zone.wire)
                pos = 0
                while pos < start:
                    length = lname[pos]
                    if length > 63:
                        return None
                    pos += 1 + length
                if pos == start:
                    return zone
        return None

    def miss(self, lname: bytes, offsets: tuple[int, ...], qtype: int) -> Answer | None:
        """The answer for a name that is not a node: NXDOMAIN, a synthesized pod record, or
        None when the name is not ours to answer (forward it)."""
        zone = self.zone_of(lname, offsets)
        if zone is None or not zone.authoritative:
            return None
        if (
            zone is self._cluster
            and self.pod_records == "insecure"
            and len(offsets) == 3 + self.domain.count(".") + 1
            and lname.endswith(self._pod_suffix)
        ):
            synthesized = self._insecure_pod(lname, qtype)
            if synthesized is not None:
                return synthesized
        return zone.nxdomain

    def _insecure_pod(self, lname: bytes, qtype: int) -> Answer | None:
        """``a-b-c-d.<ns>.pod.<zone>`` for any well-formed address (CoreDNS "insecure")."""
        ip = _undashed(lname[1 : 1 + lname[0]].decode("ascii", "replace"))
        if ip is None:
            return None
        rtype, rdata = _address(ip)
        if qtype == rtype or qtype == wire.ANY:
            record = wire.rr(wire.QNAME_POINTER, rtype, self.ttl, rdata)
            return make_answer(wire.AA, 1, 0, 0, record, (len(record),), ra=self.ra)
        return self._cluster.nodata

    def has_name(self, lname: bytes) -> bool:
        """Whether a lowercased wire name is a name of the zone with records of its own (not
        an empty non-terminal, not a name synthesized at query time)."""
        return lname in self._exists

    def rdatas(self, name: str) -> RDatas:
        """The merged records of a name (for CNAME chasing and tests)."""
        try:
            key = wire.encode_name(name)
        except wire.NameError_:
            return ()
        return self._merged(key)

    # -- building --------------------------------------------------------------------------

    def apply(self, changes: ChangeSet) -> int:
        """Rebuild what ``changes`` touched (everything when ``changes.full``); returns the
        number of units rebuilt."""
        snapshot = changes.snapshot
        self.ready = snapshot.all_synced
        self.version = snapshot.version
        if changes.full:
            self._reset()
            keys: Iterable[str] = self._all_keys(snapshot)
        else:
            keys = changes.keys
        units: set[Unit] = {_STATIC} if changes.full else set()
        for key in keys:
            units.update(self._key_units.pop(key, ()))
            record = snapshot.get(key)
            self._index(key, record)
            new = self._units_of(record) if record is not None else ()
            if new:
                self._key_units[key] = new
            units.update(new)
        for unit in list(units):
            if unit[0] == "cattle":
                units |= self._dependents.get(unit[1], set())
        self._rebuild(units, snapshot)
        return len(units)

    def _reset(self) -> None:
        self.nodes.clear()
        self._unit_out.clear()
        self._name_units.clear()
        self._ent_refs.clear()
        self._exists.clear()
        self._key_units.clear()
        self._subdomains.clear()
        self._pod_subdomain.clear()
        self._dependents.clear()
        for zone in self.zones:
            if zone.authoritative:
                self.nodes[zone.wire] = {ANY_TYPE: zone.nodata}

    @staticmethod
    def _all_keys(snapshot: Snapshot) -> Iterator[str]:
        yield from snapshot.stacks
        yield from snapshot.services
        yield from snapshot.endpoints
        yield from snapshot.workloads

    def _index(self, key: str, record: Record | None) -> None:
        old = self._pod_subdomain.pop(key, None)
        if old is not None:
            members = self._subdomains.get(old)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._subdomains[old]
        if (
            isinstance(record, Workload)
            and record.subdomain
            and record.hostname
            and key.startswith(K8S)
        ):
            where = (record.namespace, record.subdomain)
            self._pod_subdomain[key] = where
            self._subdomains.setdefault(where, set()).add(key)

    def _units_of(self, record: Record) -> tuple[Unit, ...]:
        key = record.key
        if key.startswith(K8S):
            if isinstance(record, Service):
                return (("k8s", record.namespace, record.name),)
            if isinstance(record, Endpoints):
                return (("k8s", record.namespace, record.service),)
            if isinstance(record, Stack):
                return (("ns", record.name),)
            if isinstance(record, Workload):
                units: list[Unit] = []
                if self.pod_records == "verified" and not record.host_network:
                    units.append(("pod", key))
                if record.subdomain and record.hostname:
                    units.append(("k8s", record.namespace, record.subdomain))
                return tuple(units)
            return ()
        if key.startswith(CATTLE):
            if isinstance(record, Service):
                return (("cattle", key),)
            if isinstance(record, Endpoints):
                return (("cattle", record.service_key),)
            if isinstance(record, Workload):
                return (("ct", key), *(("cattle", service) for service in record.service_keys))
        return ()

    def _rebuild(self, units: Iterable[Unit], snapshot: Snapshot) -> None:
        touched: set[bytes] = set()
        for unit in units:
            try:
                new = self._build_unit(unit, snapshot)
            except Exception:  # a bad record must not stop the others
                log.exception("dns: cannot build names of %s", "/".join(unit))
                new = {}
            old = self._unit_out.pop(unit, {})
            if new:
                self._unit_out[unit] = new
            for name in old.keys() - new.keys():
                holders = self._name_units.get(name, ())
                if unit in holders:
                    rest = tuple(u for u in holders if u != unit)
                    if rest:
                        self._name_units[name] = rest
                    else:
                        del self._name_units[name]
                touched.add(name)
            for name, rdatas in new.items():
                if old.get(name) != rdatas:
                    touched.add(name)
                holders = self._name_units.get(name, ())
                if unit not in holders:
                    self._name_units[name] = (*holders, unit)
        for name in touched:
            self._refresh(name)

    def _merged(self, name: bytes) -> RDatas:
        units = self._name_units.get(name)
        if not units:
            return ()
        if len(units) == 1:
            return self._unit_out[units[0]][name]
        merged: set[RData] = set()
        for unit in units:
            merged.update(self._unit_out[unit][name])
        return tuple(sorted(merged))

    def _refresh(self, name: bytes) -> None:
        exists = name in self._name_units
        zone = self.zone_of(name, _label_offsets(name))
        if zone is None:  # only names inside our zones are built (see _Builder callers)
            return
        if exists != (name in self._exists):
            if exists:
                self._exists.add(name)
            else:
                self._exists.discard(name)
            if zone.authoritative:
                step = 1 if exists else -1
                for parent in _parents(name, zone.wire):
                    refs = self._ent_refs.get(parent, 0) + step
                    if refs > 0:
                        self._ent_refs[parent] = refs
                    else:
                        self._ent_refs.pop(parent, None)
                    if parent not in self._exists:
                        self._set_node(parent, zone, None)
        self._set_node(name, zone, self._merged(name) if exists else None)

    def _set_node(self, name: bytes, zone: ZoneInfo, rdatas: RDatas | None) -> None:
        if rdatas is not None:
            self.nodes[name] = self._node(name, zone, rdatas)
        elif (name == zone.wire and zone.authoritative) or self._ent_refs.get(name, 0) > 0:
            self.nodes[name] = {ANY_TYPE: zone.nodata}
        else:
            self.nodes.pop(name, None)

    def _node(self, name: bytes, zone: ZoneInfo, rdatas: RDatas) -> dict[int, Answer]:
        by_type: dict[int, list[bytes]] = {}
        for rtype, rdata in rdatas:
            by_type.setdefault(rtype, []).append(rdata)
        node: dict[int, Answer] = {ANY_TYPE: zone.nodata}
        cnames = by_type.get(wire.CNAME)
        if cnames:
            target = wire.decode_name(sorted(cnames)[0])
            plain = self._positive(wire.CNAME, sorted(cnames)[:1])
            node[wire.CNAME] = plain
            node[ANY_TYPE] = make_answer(
                plain.flags, plain.ancount, 0, 0, plain.body, plain.ends, ra=self.ra, chase=target
            )
            return node
        for rtype, values in by_type.items():
            node[rtype] = self._positive(rtype, sorted(values))
        if name == self._cluster.wire and wire.NS in node:
            node[wire.NS] = self._apex_ns(by_type[wire.NS])
        for rtype in _ANY_PREFERENCE:
            if rtype in node:
                node[wire.ANY] = node[rtype]
                break
        return node

    def _apex_ns(self, rdatas: list[bytes]) -> Answer:
        """The apex NS answer with its glue (A/AAAA of ns.dns.<zone>) in the additional
        section; truncation keeps the NS record and drops the glue."""
        body = bytearray()
        for rdata in sorted(rdatas):
            body += wire.rr(wire.QNAME_POINTER, wire.NS, self.ttl, rdata)
        ends = (len(body),)
        owner = wire.encode_name(self.ns_name)
        for ip in self.nameservers:
            rtype, rdata = _address(ip)
            body += wire.rr(owner, rtype, self.ttl, rdata)
        return make_answer(
            wire.AA, len(rdatas), 0, len(self.nameservers), bytes(body), ends, ra=self.ra
        )

    def _positive(self, rtype: int, rdatas: list[bytes]) -> Answer:
        body = bytearray()
        ends = []
        for rdata in rdatas:
            body += wire.rr(wire.QNAME_POINTER, rtype, self.ttl, rdata)
            ends.append(len(body))
        shared = tuple(ends)
        shared = _ENDS.setdefault(shared, shared) if len(shared) < 3 else shared
        return make_answer(wire.AA, len(rdatas), 0, 0, bytes(body), shared, ra=self.ra)

    # -- units -> names --------------------------------------------------------------------

    def _build_unit(self, unit: Unit, snapshot: Snapshot) -> Contribution:
        out = _Builder()
        kind = unit[0]
        if kind == "k8s":
            self._k8s_service(out, unit[1], unit[2], snapshot)
        elif kind == "ns":
            if snapshot.stacks.get(f"k8s:Namespace/{unit[1]}") is not None:
                out.exists(f"{unit[1]}.svc.{self.domain}")
        elif kind == "pod":
            self._pod(out, unit[1], snapshot)
        elif kind == "cattle":
            self._cattle_service(out, unit[1], snapshot)
        elif kind == "ct":
            self._cattle_container(out, unit[1], snapshot)
        elif kind == "static":
            self._static(out)
        return out.contribution(unit)

    def _static(self, out: _Builder) -> None:
        domain = self.domain
        out.add(domain, wire.SOA, wire.rdata_soa(domain, self.serial, self.ttl))
        # NS at the apex, as CoreDNS answers it: the SOA's MNAME, ns.dns.<zone>, whose
        # addresses are the DNS listen addresses (none for a wildcard listen: NODATA).
        out.add(domain, wire.NS, wire.encode_name(self.ns_name))
        out.exists(self.ns_name)
        for ip in self.nameservers:
            out.address(self.ns_name, ip)
        out.add(f"dns-version.{domain}", wire.TXT, wire.rdata_txt(SCHEMA_VERSION))
        out.exists(f"svc.{domain}")
        out.exists(f"pod.{domain}")
        out.add(RANCHER_ZONE, wire.SOA, wire.rdata_soa(RANCHER_ZONE, self.serial, self.ttl))
        out.address(f"rancher-metadata.{RANCHER_ZONE}", self.metadata_ip)

    def _k8s_service(self, out: _Builder, namespace: str, name: str, snapshot: Snapshot) -> None:
        service = snapshot.service(namespace, name, source_prefix=K8S)
        if service is None:
            return
        base = f"{name}.{namespace}.svc.{self.domain}"
        if service.type == "ExternalName":
            if service.external_name:
                out.add(base, wire.CNAME, wire.encode_name(service.external_name))
            return
        if not service.headless:
            for ip in service.cluster_ips:
                out.address(base, ip)
                out.ptr(ip, base)
            for port in service.ports:
                if port.name:
                    srv = f"_{port.name}._{port.protocol.lower()}.{base}"
                    out.add(srv, wire.SRV, wire.rdata_srv(0, 100, port.port, base))
            return
        # Headless: every ready endpoint (all of them with publishNotReadyAddresses).
        srv_targets: dict[str, list[tuple[int, str]]] = {}
        for group in snapshot.endpoints_for(service.key):
            if group.address_type == "FQDN":
                continue
            named = [p for p in group.ports if p.name]
            for endpoint in group.endpoints:
                if not (endpoint.ready or service.publish_not_ready):
                    continue
                for ip in endpoint.addresses:
                    host = f"{endpoint.hostname or dashed(ip)}.{base}"
                    out.address(base, ip)
                    out.address(host, ip)
                    out.ptr(ip, host)
                    for port in named:
                        srv = f"_{port.name}._{port.protocol.lower()}.{base}"
                        srv_targets.setdefault(srv, []).append((port.port, host))
        for srv, targets in srv_targets.items():
            unique = sorted(set(targets))
            weight = max(1, 100 // len(unique))
            for port_number, host in unique:
                out.add(srv, wire.SRV, wire.rdata_srv(0, weight, port_number, host))
        # Pods naming this service as their subdomain (hostname + subdomain).
        for key in sorted(self._subdomains.get((namespace, name), ())):
            pod = snapshot.workloads.get(key)
            if pod is None or not (pod.ready or service.publish_not_ready):
                continue
            for ip in pod.ips:
                out.address(f"{pod.hostname}.{base}", ip)

    def _pod(self, out: _Builder, key: str, snapshot: Snapshot) -> None:
        pod = snapshot.workloads.get(key)
        if pod is None or pod.host_network:
            return
        for ip in pod.ips:
            out.address(f"{dashed(ip)}.{pod.namespace}.pod.{self.domain}", ip)

    def _cattle_addresses(
        self, service: Service, snapshot: Snapshot, launch_config: str, depth: int = 0
    ) -> list[str]:
        """A Cattle service's addresses: its VIP, else its running healthy containers (of one
        launch config); external IPs; an alias's targets (union)."""
        if service.kind == "dnsService":
            addresses: list[str] = []
            for link in service.links:
                self._dependents.setdefault(link.target_key, set()).add(("cattle", service.key))
                target = snapshot.services.get(link.target_key)
                if target is not None and depth < 4 and not launch_config:
                    addresses.extend(self._cattle_addresses(target, snapshot, "", depth + 1))
            return addresses
        if service.kind == "externalService":
            return list(service.external_ips)
        if service.cluster_ips and not launch_config:
            return list(service.cluster_ips)
        addresses = []
        last: tuple[int, str, tuple[str, ...]] | None = None
        for group in snapshot.endpoints_for(service.key):
            for endpoint in group.endpoints:
                container = snapshot.workloads.get(endpoint.target_key)
                own = container.launch_config if container is not None else ""
                if own != launch_config:
                    continue
                if _serves(endpoint.ready, container):
                    addresses.extend(endpoint.addresses)
                elif not addresses:
                    order = (container.create_index, container.name) if container else (0, "")
                    if last is None or order > last[:2]:
                        last = (*order, endpoint.addresses)
        if not addresses and last is not None:
            # rancher-dns's fall-back: with no healthy running container, the service still
            # names one, the last of its containers (whatever its state or health).
            return list(last[2])
        return addresses

    def _cattle_service(self, out: _Builder, key: str, snapshot: Snapshot) -> None:
        service = snapshot.services.get(key)
        if service is None or not service.namespace:
            return
        base = f"{service.name}.{service.namespace}.{RANCHER_ZONE}"
        if service.kind == "externalService" and service.external_name:
            out.add(base, wire.CNAME, wire.encode_name(service.external_name))
            return
        addresses = self._cattle_addresses(service, snapshot, "")
        for ip in sorted(set(addresses)):
            out.address(base, ip)
        for sidekick in service.sidekicks:
            for ip in sorted(set(self._cattle_addresses(service, snapshot, sidekick))):
                out.address(f"{sidekick}.{base}", ip)

    def _cattle_container(self, out: _Builder, key: str, snapshot: Snapshot) -> None:
        container = snapshot.workloads.get(key)
        if container is None:
            return
        # Every container's name resolves whatever its state, as in rancher-dns (a stopped
        # container keeps its address); only a live one claims its address's PTR.
        live = container.state in ("running", "starting", "")
        host = f"{container.name}.{RANCHER_ZONE}"
        for ip in container.ips:
            out.address(host, ip)
            if live:
                out.ptr(ip, host)


_SERVING_STATES: Final = ("running", "starting")
_SERVING_HEALTH: Final = ("", "healthy", "updating-healthy")


def _serves(ready: bool, container: Workload | None) -> bool:
    """rancher-dns's record selection: a container that is running or starting and healthy
    (or has no health check); the endpoint's readiness when the container is unknown."""
    if container is None:
        return ready
    return container.state in _SERVING_STATES and container.health_state in _SERVING_HEALTH


def _label_offsets(name: bytes) -> tuple[int, ...]:
    offsets = []
    pos = 0
    while name[pos]:
        offsets.append(pos)
        pos += 1 + name[pos]
    return tuple(offsets)


def _parents(name: bytes, zone_wire: bytes) -> Iterator[bytes]:
    """The proper suffixes of ``name`` down to (excluding) the zone apex."""
    pos = 0
    stop = len(name) - len(zone_wire)
    while True:
        pos += 1 + name[pos]
        if pos >= stop:
            return
        yield name[pos:]
