"""Store snapshot -> the rancher-metadata answer tree, per API version. Pure: no I/O.

The tree is plain JSON-like data (dicts, lists, str, int, bool, None) in rancher-metadata's
shape and snake_case names, so the renderers and the path walk need to know nothing of
records. Kubernetes objects appear as Rancher 1.x showed them: Namespace -> stack,
Service -> service (``kind: kubernetesService``, ``vip`` = clusterIP), Pod -> container,
Node -> host. Cattle services with sidekicks yield one service entry per launch config
(``primary_service_name`` names the primary), as Cattle's metadata did.

Version differences follow rancher-metadata's generator:

- ``2015-07-25``: ``services[].containers`` and ``stacks[].services`` are lists of names;
  container ports without a host IP get the host's agent IP.
- ``2015-12-19``: those lists hold the full objects; ports as in 2015-07-25.
- ``2016-07-29`` (``latest``): full objects; container, service, stack names (and link keys,
  sidekick names) lowercased; ports without a host IP get ``0.0.0.0``; hosts lose ``hostId``.

Secrets: a service's ``token`` is ``null`` everywhere but under the owning workload's
``self/service`` (:meth:`Tree.self_for`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from node_services.metadata.render import NIL_LIST
from node_services.state.records import Host, Port, Service, Stack, Workload
from node_services.state.store import Snapshot

log = logging.getLogger(__name__)
_warned_same_name: set[tuple[str, ...]] = set()

V1: Final = "2015-07-25"
V2: Final = "2015-12-19"
V3: Final = "2016-07-29"
LATEST: Final = "latest"
API_VERSIONS: Final = (V1, V2, V3)
"""The versions served, oldest first; ``latest`` is an alias of the last."""

Node: TypeAlias = Any
"""A tree value: dict[str, Node] | list[Node] | str | int | bool | None."""

_CATTLE: Final = "cattle:"
_MIB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Environment:
    """The environment fields shown at the top of the tree (Rancher's project)."""

    name: str = "Default"
    uuid: str = ""
    region_name: str = "local"


def resolve_version(name: str) -> str | None:
    """The API version a path segment names (``latest`` -> the newest), or None."""
    if name == LATEST:
        return V3
    return name if name in API_VERSIONS else None


@dataclass(eq=False)
class Tree:
    """The answers of one API version for one snapshot. Built once, then only read."""

    api_version: str
    snapshot_version: int
    root: dict[str, Node]
    """The default answers: what a caller that is no known workload sees."""
    _containers: dict[str, dict[str, Node]]
    _self_parts: dict[str, tuple[Node, Node, Node, str]]
    _selves: dict[str, dict[str, Node]] = field(default_factory=dict)
    _roots: dict[str, dict[str, Node]] = field(default_factory=dict)
    responses: dict[object, object] = field(default_factory=dict)
    """Rendered answers, filled by the server (bounded there)."""

    def self_for(self, workload_key: str | None) -> dict[str, Node]:
        """The ``self`` map of a workload (None: the node's default ``self``)."""
        if workload_key is None or workload_key not in self._containers:
            return self.root["self"]  # type: ignore[no-any-return]
        cached = self._selves.get(workload_key)
        if cached is None:
            container = self._containers[workload_key]
            stack, service, host, token = self._self_parts[workload_key]
            cached = {"container": container}
            if stack is not None:
                cached["stack"] = stack
            if service is not None:
                # the owner alone sees its service's token
                cached["service"] = {**service, "token": token or None}
            if host is not None:
                cached["host"] = host
            self._selves[workload_key] = cached
        return cached

    def root_for(self, workload_key: str | None) -> dict[str, Node]:
        """The whole tree as the caller sees it: the default answers with its ``self``."""
        if workload_key is None or workload_key not in self._containers:
            return self.root
        cached = self._roots.get(workload_key)
        if cached is None:
            cached = {**self.root, "self": self.self_for(workload_key)}
            self._roots[workload_key] = cached
        return cached


def _warn_same_name(snapshot: Snapshot, node_name: str) -> None:
    """Say once (per set of hosts) that two sources name this node: which one ``self/host``
    shows, and why (the rule of :meth:`~node_services.state.store.Snapshot.host_named`)."""
    hosts = snapshot.hosts_named(node_name)
    keys = tuple(h.key for h in hosts)
    if len(hosts) > 1 and keys not in _warned_same_name:
        _warned_same_name.add(keys)
        log.warning(
            "node %s is named by %d hosts (%s): self/host shows %s (hosts with pod CIDRs win, "
            "then Kubernetes Nodes, then the lowest key); give each node one host",
            node_name,
            len(hosts),
            ", ".join(keys),
            keys[0],
        )


def build_tree(
    snapshot: Snapshot, api_version: str, *, environment: Environment, node_name: str
) -> Tree:
    """The answer tree of ``api_version`` (one of :data:`API_VERSIONS`) for ``snapshot``."""
    return _Builder(snapshot, api_version, environment, node_name).build()


# -- building ------------------------------------------------------------------------------


def _labels(pairs: Iterable[tuple[str, str]]) -> dict[str, Node]:
    return dict(pairs)


def _cattle_id_number(key: str) -> int | None:
    """1 for ``cattle:host/1h1`` (Cattle ids are 1 + type letters + number)."""
    match = re.search(r"/1[a-z]+(\d+)$", key)
    return int(match.group(1)) if match else None


def _json(text: str) -> Node:
    """A canonical JSON field of a record ("" = null)."""
    return json.loads(text) if text else None


def _port_spec(port: Port) -> str:
    """A Cattle port as Cattle writes it: ``[bind ip:][public:]private/proto``."""
    spec = f"{port.port}/{port.protocol.lower()}"
    if port.public_port:
        spec = f"{port.public_port}:{spec}"
    if port.bind_ip:
        spec = f"{port.bind_ip}:{spec}"
    return spec


@dataclass(frozen=True, slots=True)
class _Entry:
    """One service entry of the tree: a service, or one sidekick launch config of it."""

    service: Service
    launch_config: str  # "" = the primary

    @property
    def name(self) -> str:
        return self.launch_config or self.service.name


class _Builder:
    def __init__(
        self, snapshot: Snapshot, api_version: str, environment: Environment, node_name: str
    ) -> None:
        if api_version not in API_VERSIONS:
            raise ValueError(f"unknown metadata API version {api_version!r}")
        self.snapshot = snapshot
        self.version = api_version
        self.lower = api_version == V3
        self.env = environment
        self.node_name = node_name

    def _name(self, name: str) -> str:
        return name.lower() if self.lower else name

    def build(self) -> Tree:
        snapshot = self.snapshot
        hosts = sorted(snapshot.hosts.values(), key=lambda h: (h.name, h.key))
        host_objs = {h.key: self._host(h) for h in hosts}
        stacks = sorted(snapshot.stacks.values(), key=lambda s: (s.name, s.key))

        # Which workloads belong to which service: Cattle lists the services of a container;
        # Kubernetes says it through EndpointSlice targets.
        members: dict[str, list[str]] = {}
        for group in snapshot.endpoints.values():
            for endpoint in group.endpoints:
                if endpoint.target_key:
                    members.setdefault(group.service_key, []).append(endpoint.target_key)
        for workload in snapshot.workloads.values():
            for service_key in workload.service_keys:
                members.setdefault(service_key, []).append(workload.key)

        entries: list[_Entry] = []
        entry_of: dict[tuple[str, str], _Entry] = {}
        for service in sorted(snapshot.services.values(), key=lambda s: (s.namespace, s.name)):
            for launch in ("", *service.sidekicks):
                entry = _Entry(service, launch)
                entries.append(entry)
                entry_of[(service.key, launch)] = entry

        # workload key -> its service entries, in entry order
        entries_of_workload: dict[str, list[_Entry]] = {}
        entry_members: dict[_Entry, list[Workload]] = {entry: [] for entry in entries}
        for service_key, workload_keys in members.items():
            for workload_key in dict.fromkeys(workload_keys):
                member = snapshot.workloads.get(workload_key)
                if member is None:
                    continue
                owner = entry_of.get((service_key, member.launch_config)) or entry_of.get(
                    (service_key, "")
                )
                if owner is None:
                    continue
                entry_members[owner].append(member)
                entries_of_workload.setdefault(workload_key, []).append(owner)
        order = {entry: i for i, entry in enumerate(entries)}
        for owners in entries_of_workload.values():
            owners.sort(key=order.__getitem__)

        def first_entry(workload: Workload) -> _Entry | None:
            owners = entries_of_workload.get(workload.key)
            return owners[0] if owners else None

        containers: dict[str, dict[str, Node]] = {}
        self_parts: dict[str, tuple[Node, Node, Node, str]] = {}
        workloads = sorted(snapshot.workloads.values(), key=lambda w: (w.namespace, w.name, w.key))
        for workload in workloads:
            host = snapshot.hosts.get(workload.host_key) if workload.host_key else None
            containers[workload.key] = self._container(workload, first_entry(workload), host)

        service_objs: dict[_Entry, dict[str, Node]] = {}
        for entry in entries:
            ordered = sorted(entry_members[entry], key=lambda w: (w.create_index, w.name, w.key))
            service_objs[entry] = self._service(entry, [containers[w.key] for w in ordered])

        stack_objs: dict[str, dict[str, Node]] = {}
        for stack in stacks:
            own = [service_objs[e] for e in entries if e.service.stack_key == stack.key]
            stack_objs[stack.key] = self._stack(stack, own)

        for workload in workloads:
            owner = first_entry(workload)
            stack_key = owner.service.stack_key if owner is not None else workload.stack_key
            self_parts[workload.key] = (
                stack_objs.get(stack_key),
                service_objs[owner] if owner is not None else None,
                host_objs.get(workload.host_key),
                owner.service.token if owner is not None else "",
            )

        this_host = snapshot.host_named(self.node_name) if self.node_name else None
        if this_host is not None:
            _warn_same_name(snapshot, self.node_name)
        default_self: dict[str, Node] = {}
        if this_host is not None:
            default_self["host"] = host_objs[this_host.key]
        env = self.env
        root: dict[str, Node] = {
            "containers": list(containers.values()),
            "hosts": list(host_objs.values()),
            "name": env.name,
            "networks": self._networks(hosts),
            "region_name": env.region_name,
            "self": default_self,
            "services": list(service_objs.values()),
            "stacks": list(stack_objs.values()),
            "uuid": env.uuid,
            "version": str(snapshot.version),
        }
        if self.lower:
            # rancher-metadata fills it only in its subscribe mode (2016-07-29 and latest);
            # the older versions have no such key
            root["environments"] = NIL_LIST
        return Tree(
            api_version=self.version,
            snapshot_version=snapshot.version,
            root=root,
            _containers=containers,
            _self_parts=self_parts,
        )

    # -- objects ---------------------------------------------------------------------------

    def _host(self, host: Host) -> dict[str, Node]:
        cattle = host.key.startswith(_CATTLE)
        obj: dict[str, Node] = {
            "agent_ip": host.addresses[0] if host.addresses else "",
            "environment_uuid": self.env.uuid,
            "hostname": host.hostname or host.name,
            "labels": _labels(host.labels),
        }
        if cattle:
            obj["agent_state"] = host.agent_state or None
            obj["local_storage_mb"] = host.local_storage_mb
        if host.memory or cattle:
            obj["memory"] = host.memory // _MIB  # Rancher showed MiB
        obj["metadata_kind"] = "host"
        if host.milli_cpu or cattle:
            obj["milli_cpu"] = host.milli_cpu
        obj["name"] = host.name
        obj["state"] = host.state
        obj["uuid"] = host.uuid
        if not self.lower and host.key.startswith(_CATTLE):
            number = _cattle_id_number(host.key)
            if number is not None:
                obj["hostId"] = number
        return obj

    def _networks(self, hosts: list[Host]) -> list[Node]:
        """The Cattle networks the hosts' containers use (each once, by uuid)."""
        networks: dict[str, dict[str, Node]] = {}
        for host in hosts:
            if host.network_json and host.network_json not in networks:
                network = json.loads(host.network_json)
                network.update(environment_uuid=self.env.uuid, metadata_kind="network")
                networks[host.network_json] = network
        return list(networks.values())

    def _stack(self, stack: Stack, services: list[dict[str, Node]]) -> dict[str, Node]:
        return {
            "environment_name": self.env.name,
            "environment_uuid": self.env.uuid,
            "metadata_kind": "stack",
            "name": self._name(stack.name),
            "services": [s["name"] for s in services] if self.version == V1 else services,
            "system": stack.system,
            "uuid": stack.uuid,
        }

    def _ports(self, workload: Workload, host: Host | None) -> list[Node]:
        ports = [_port_spec(port) for port in workload.ports]
        if not workload.key.startswith(_CATTLE):
            return list(ports)  # pod container ports are not published on the host
        # ports bound to an address stay as they are; the others get the host's address
        # (2015-*) or 0.0.0.0 (2016-07-29)
        host_ip = host.addresses[0] if host is not None and host.addresses else ""
        any_ip = "0.0.0.0" if self.lower else host_ip
        return [
            spec if port.bind_ip else f"{any_ip}:{spec}"
            for port, spec in zip(workload.ports, ports, strict=True)
        ]

    def _container(
        self, workload: Workload, entry: _Entry | None, host: Host | None
    ) -> dict[str, Node]:
        stack = self.snapshot.stacks.get(
            entry.service.stack_key if entry is not None else workload.stack_key
        )
        cattle = workload.key.startswith(_CATTLE)
        health: str | None = workload.health_state
        if not health:
            # Cattle leaves it null without a health check
            health = None if cattle else "healthy" if workload.ready else "unhealthy"
        if not cattle:  # a pod: the fields Rancher 1.x showed for Kubernetes pods
            obj: dict[str, Node] = {
                "create_index": workload.create_index,
                "dns": list(workload.dns),
                "dns_search": list(workload.dns_search),
                "environment_uuid": self.env.uuid,
                "external_id": workload.external_id,
                "health_state": health,
                "host_uuid": host.uuid if host is not None else "",
                "ips": list(workload.ips),
                "labels": _labels(workload.labels),
                "links": {},
                "metadata_kind": "container",
                "name": self._name(workload.name),
                "network_uuid": "",
                "ports": self._ports(workload, host),
                "primary_ip": workload.ips[0] if workload.ips else "",
                "service_index": workload.service_index,
            }
            if entry is not None:
                obj["service_name"] = self._name(entry.name)
                obj["service_uuid"] = entry.service.uuid
            if stack is not None or workload.namespace:
                name = stack.name if stack is not None else workload.namespace
                obj["stack_name"] = self._name(name)
                obj["stack_uuid"] = stack.uuid if stack is not None else ""
            obj["state"] = workload.state
            obj["uuid"] = workload.uuid
            return obj
        standalone = entry is None  # Cattle: null service fields
        obj = {
            "create_index": None if standalone else workload.create_index,
            "dns": list(workload.dns),
            "dns_search": list(workload.dns_search),
            "environment_uuid": self.env.uuid,
            "external_id": workload.external_id,
            "health_check": _json(workload.health_check_json),
            "health_check_hosts": [],  # not in the v2-beta resources
            "health_state": health,
            "host_uuid": host.uuid if host is not None else "",
            "hostname": workload.hostname or None,
            "ips": list(workload.ips),
            "labels": _labels(workload.labels),
            "links": self._container_links(workload),
            "memory_reservation": workload.memory_reservation,
            "metadata_kind": "container",
            "milli_cpu_reservation": workload.milli_cpu_reservation,
            "name": self._name(workload.name),
            "network_from_container_uuid": None,
            # a network key is left there by a translation not yet resolved: unknown
            "network_uuid": ""
            if workload.network_uuid.startswith(_CATTLE)
            else workload.network_uuid,
            "ports": self._ports(workload, host),
            "primary_ip": workload.ips[0] if workload.ips else "",
            "primary_mac_address": workload.primary_mac_address or None,
            "service_index": None if standalone else workload.service_index,
        }
        if entry is not None:
            obj["service_name"] = self._name(entry.name)
            obj["service_uuid"] = entry.service.uuid
        else:
            obj["service_name"] = None
        if stack is not None or workload.namespace:
            obj["stack_name"] = self._name(stack.name if stack is not None else workload.namespace)
            obj["stack_uuid"] = stack.uuid if stack is not None else ""
        else:
            obj["stack_name"] = obj["stack_uuid"] = None
        obj["start_count"] = workload.start_count
        obj["state"] = workload.state
        obj["system"] = workload.system
        obj["uuid"] = workload.uuid
        return obj

    def _container_links(self, workload: Workload) -> dict[str, Node]:
        """Container links: alias -> the target container's uuid (rancher-metadata's)."""
        links: dict[str, Node] = {}
        for link in workload.links:
            target = self.snapshot.workloads.get(link.target_key)
            if target is not None:
                links[link.alias] = target.uuid
        return links

    def _links(self, service: Service) -> dict[str, Node]:
        links: dict[str, Node] = {}
        for link in service.links:
            target = self.snapshot.services.get(link.target_key)
            if target is None:
                continue
            key = f"{target.namespace}/{target.name}"
            # an unaliased link to another stack is keyed "<stack>/<service>": its value is
            # the target's name, as Cattle's serviceLink
            value = link.alias if link.alias and "/" not in link.alias else target.name
            links[key.lower() if self.lower else key] = value
        return links

    def _service(self, entry: _Entry, containers: list[dict[str, Node]]) -> dict[str, Node]:
        service = entry.service
        stack = self.snapshot.stacks.get(service.stack_key)
        if service.kind == "kubernetesService":
            return self._kubernetes_service(entry, containers, stack)
        launch = next((c for c in service.launch_configs if c.name == entry.launch_config), None)
        if entry.launch_config and launch is not None:
            labels, ports, expose = launch.labels, launch.ports, launch.expose
            health_check = launch.health_check_json
        elif entry.launch_config:
            labels, ports, expose, health_check = (), (), (), ""
        else:
            labels, ports, expose = service.labels, service.ports, service.expose
            health_check = service.health_check_json
        # external and alias services have no launch config: Cattle writes nulls
        launched = service.kind not in ("externalService", "dnsService")
        return {
            "containers": [c["name"] for c in containers] if self.version == V1 else containers,
            "create_index": service.create_index if launched else None,
            "environment_uuid": self.env.uuid,
            "expose": [_port_spec(p) for p in expose],
            "external_ips": list(service.external_ips),
            "fqdn": service.fqdn or None,
            "health_check": _json(health_check),
            "hostname": service.external_name or None
            if service.kind == "externalService"
            else None,
            "kind": service.kind,
            "labels": _labels(labels),
            "lb_config": _json(service.lb_config_json),
            "links": self._links(service),
            "metadata": _json(service.metadata_json) or {},
            "metadata_kind": "service",
            "name": self._name(entry.name),
            "ports": [_port_spec(p) for p in ports],
            "primary_service_name": self._name(service.name),
            "scale": service.scale if launched else None,
            "sidekicks": [self._name(s) for s in service.sidekicks],
            "stack_name": self._name(service.namespace),
            "stack_uuid": stack.uuid if stack is not None else "",
            "state": service.state,
            "system": stack.system if stack is not None else False,
            "token": None,
            "uuid": service.uuid,
            "vip": service.cluster_ips[0] if service.cluster_ips else None,
        }

    def _kubernetes_service(
        self, entry: _Entry, containers: list[dict[str, Node]], stack: Stack | None
    ) -> dict[str, Node]:
        """A Kubernetes Service as Rancher 1.x showed it (``kind: kubernetesService``)."""
        service = entry.service
        ports = [
            f"{port.port}:{port.target_port or port.port}/{port.protocol.lower()}"
            for port in service.ports
        ]
        metadata: Node = json.loads(service.metadata_json) if service.metadata_json else {}
        return {
            "containers": [c["name"] for c in containers] if self.version == V1 else containers,
            "environment_uuid": self.env.uuid,
            "external_ips": list(service.external_ips),
            "fqdn": service.fqdn,
            "health_state": service.health_state,
            "hostname": service.external_name,
            "kind": service.kind,
            "labels": _labels(service.labels),
            "links": self._links(service),
            "metadata": metadata,
            "metadata_kind": "service",
            "name": self._name(entry.name),
            "ports": ports,
            "primary_service_name": self._name(service.name),
            "scale": service.scale,
            "sidekicks": [],
            "stack_name": self._name(service.namespace),
            "stack_uuid": stack.uuid if stack is not None else "",
            "state": service.state,
            "system": stack.system if stack is not None else False,
            "token": None,
            "uuid": service.uuid,
            "vip": service.cluster_ips[0] if service.cluster_ips else "",
        }


# -- reading -------------------------------------------------------------------------------

_INDEX_RE: Final = re.compile(r"^[+-]?[0-9]+$")
_MAGIC_KEYS: Final = ("name", "uuid")


def walk(node: Node, path: list[str]) -> tuple[bool, Node]:
    """Follow ``path`` from ``node`` as rancher-metadata does: a map key, a list index, or a
    list element whose ``name`` or ``uuid`` equals the segment. (found, value)."""
    for key in path:
        if isinstance(node, dict):
            if key not in node:
                return False, None
            node = node[key]
        elif isinstance(node, list):
            if _INDEX_RE.match(key):
                index = int(key)
                if not 0 <= index < len(node):
                    return False, None
                node = node[index]
            else:
                for child in node:
                    if isinstance(child, dict) and any(child.get(k) == key for k in _MAGIC_KEYS):
                        node = child
                        break
                else:
                    return False, None
        else:
            return False, None
    return True, node


def lookup(node: Node, path: list[str]) -> tuple[bool, Node]:
    """:func:`walk`, retried with the whole path lowercased when it finds nothing."""
    found, value = walk(node, path)
    if found:
        return found, value
    lowered = [segment.lower() for segment in path]
    if lowered != path:
        return walk(node, lowered)
    return False, None
