"""Rancher Cattle v2-beta resources -> state records, at the boundary.

Input is one resource as the Cattle API returns it (camelCase, ``id``, ``type``): host,
stack (``environment`` in older APIs), the service kinds, container, and network, subnet and
project. See docs/cattle-v2-beta-notes.md for the field facts. A container becomes a Workload
plus one Endpoints record per service it belongs to, so no cross-resource join is needed
there. Two joins are left for a post-pass once the whole set is known (:func:`resolve`):

- a service's stack name (:func:`resolve_stack_names`);
- the hosts' pod CIDRs (:func:`resolve_networks`): Cattle hosts carry no subnet. Rancher 1.x's
  managed network is one flat subnet shared by every host (Cattle assigns each container its
  address from it), so every Cattle host gets the default network's subnet. Networks, subnets
  and projects are therefore translated into :data:`Fact` values, not store records, which
  only this post-pass reads and drops.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from node_services.sources.errors import TranslateError, UnsupportedObject
from node_services.sources.fields import cidr, flag, integer, ip, mapping, sequence, text
from node_services.state.records import (
    Endpoint,
    Endpoints,
    Host,
    Port,
    Record,
    Service,
    ServiceLink,
    Stack,
    Workload,
    WorkloadLink,
    intern_str,
    label,
    make_labels,
)

log = logging.getLogger(__name__)

PREFIX: Final = "cattle:"
STACK_NAME_LABEL: Final = "io.rancher.stack.name"
LAUNCH_CONFIG_LABEL: Final = "io.rancher.service.launch.config"
PRIMARY_LAUNCH_CONFIG: Final = "io.rancher.service.primary.launch.config"
SERVICE_TYPES: Final = (
    "service",
    "externalService",
    "dnsService",
    "loadBalancerService",
    "kubernetesService",
)
GONE_STATES: Final = ("removed", "purged", "purging")
# Health states in which a running container serves traffic (Rancher DNS rules).
SERVING_HEALTH: Final = ("", "healthy", "updating-healthy")
# Network states Cattle counts when it picks a project's default network (active or becoming so).
USABLE_NETWORK_STATES: Final = ("", "active", "activating", "updating-active")
# Network kinds that are never the managed network: Docker's own modes (Cattle 1.x kinds start
# with "docker"; another Cattle line names them host/none/container) and host-only networks.
BUILTIN_NETWORK_KINDS: Final = frozenset({"host", "none", "container", "hostOnlyNetwork"})


@dataclass(frozen=True, slots=True)
class CattleSubnet:
    """A Cattle ``subnet`` resource, or one of a network's embedded ``subnets``: not a store
    record, only read by :func:`resolve_networks`."""

    key: str  # cattle:subnet/<id>; "" for an embedded subnet without an id
    source: str
    network_key: str
    cidr: str  # networkAddress (+ cidrSize), canonical
    start_address: str = ""  # Cattle's allocation pool within cidr ("" = not given)
    end_address: str = ""
    gateway: str = ""


@dataclass(frozen=True, slots=True)
class CattleNetwork:
    """A Cattle ``network`` resource: not a store record, only read by :func:`resolve_networks`."""

    key: str
    source: str
    name: str
    kind: str = ""  # "cni" for a network driver's network; dockerBridge, dockerHost, ... else
    state: str = ""
    is_default: bool = False  # isDefault, when the snapshot says so (not a v2-beta field)
    subnets: tuple[CattleSubnet, ...] = ()  # embedded ``subnets``
    bridge_subnets: tuple[str, ...] = ()  # metadata.cniConfig.<file>.bridgeSubnet, by file name


@dataclass(frozen=True, slots=True)
class CattleProject:
    """A Cattle ``project`` (environment): only its ``defaultNetworkId`` is used."""

    key: str
    source: str
    default_network_key: str


Fact: TypeAlias = CattleNetwork | CattleSubnet | CattleProject
"""What network, subnet and project resources become: input of :func:`resolve_networks`."""

Translated: TypeAlias = Record | Fact


def key(resource_type: str, resource_id: str) -> str:
    """Record key of a Cattle resource; every service kind shares ``service``."""
    if resource_type in SERVICE_TYPES:
        resource_type = "service"
    elif resource_type == "environment":
        resource_type = "stack"
    return f"{PREFIX}{resource_type}/{resource_id}"


def resource_ref(obj: Mapping[str, Any]) -> str:
    """``type id (name)`` for messages."""
    name = obj.get("name")
    ref = f"{obj.get('type', 'resource')} {obj.get('id', '?')}"
    return f"{ref} ({name})" if isinstance(name, str) and name else ref


def translate(obj: Mapping[str, Any], source: str) -> Sequence[Translated]:
    """The records (and network facts) one Cattle resource becomes ([] for a removed one).

    Facts are for :func:`resolve`, which turns a whole set into store records."""
    resource_type = obj.get("type")
    translator = _TRANSLATORS.get(resource_type) if isinstance(resource_type, str) else None
    ref = resource_ref(obj)
    if translator is None:
        raise UnsupportedObject(ref, f"type {resource_type!r} is not used by node-services")
    text(ref, "id", obj.get("id"), required=True)
    if obj.get("state") in GONE_STATES or obj.get("removed"):
        return []
    return translator(obj, source, ref)


def _labels(ref: str, path: str, value: Any) -> Any:
    return make_labels(mapping(ref, path, value))


_PORT_RE: Final = re.compile(
    r"^(?:(?P<ip>\d+\.\d+\.\d+\.\d+|\[[0-9a-fA-F:]+\]):)?(?:(?P<public>\d+):)?(?P<private>\d+)"
    r"(?:/(?P<proto>tcp|udp|sctp))?$",
    re.IGNORECASE,
)


def _ports(ref: str, path: str, raw: Any) -> tuple[Port, ...]:
    """Cattle port specs: ``"8080:80/tcp"``, ``"80/udp"``, ``"0.0.0.0:8080:80"``."""
    ports = []
    for i, item in enumerate(sequence(ref, path, raw)):
        match = _PORT_RE.match(str(item)) if isinstance(item, str | int) else None
        if match is None:
            raise TranslateError(ref, f"{path}[{i}]: {item!r} is not a port spec like 8080:80/tcp")
        private = int(match["private"])
        public = int(match["public"]) if match["public"] else 0
        if private > 65535 or public > 65535:
            raise TranslateError(ref, f"{path}[{i}]: {item!r}: port out of range")
        ports.append(
            Port(
                name="",
                port=private,
                protocol=intern_str((match["proto"] or "tcp").upper()),
                public_port=public,
            )
        )
    return tuple(ports)


def _host(obj: Mapping[str, Any], source: str, ref: str) -> list[Record]:
    hostname = text(ref, "hostname", obj.get("hostname"))
    name = text(ref, "name", obj.get("name")) or hostname
    if not name:
        raise TranslateError(ref, "name and hostname: missing")
    agent_ip = obj.get("agentIpAddress")
    memory_mb = integer(ref, "memory", obj.get("memory"))
    return [
        Host(
            key=key("host", str(obj["id"])),
            source=source,
            name=intern_str(name),
            uuid=text(ref, "uuid", obj.get("uuid")),
            hostname=hostname or name,
            addresses=(ip(ref, "agentIpAddress", agent_ip),) if agent_ip else (),
            public_ip=ip(ref, "agentIpAddress", agent_ip) if agent_ip else "",
            labels=_labels(ref, "labels", obj.get("labels")),
            state=text(ref, "state", obj.get("state"), intern=True),
            memory=memory_mb * 1024 * 1024,
            milli_cpu=integer(ref, "milliCpu", obj.get("milliCpu")),
        )
    ]


def _stack(obj: Mapping[str, Any], source: str, ref: str) -> list[Record]:
    return [
        Stack(
            key=key("stack", str(obj["id"])),
            source=source,
            name=intern_str(text(ref, "name", obj.get("name"), required=True)),
            uuid=text(ref, "uuid", obj.get("uuid")),
            state=text(ref, "state", obj.get("state"), intern=True),
            system=flag(ref, "system", obj.get("system")),
        )
    ]


def _service(obj: Mapping[str, Any], source: str, ref: str) -> list[Record]:
    kind = str(obj["type"])
    stack_id = text(ref, "stackId", obj.get("stackId") or obj.get("environmentId"), required=True)
    launch = mapping(ref, "launchConfig", obj.get("launchConfig"))
    vip = obj.get("vip")
    cluster_ips = (ip(ref, "vip", vip),) if vip else ()
    external_name = ""
    external_ips: tuple[str, ...] = ()
    service_type = "ClusterIP"
    if kind == "externalService":
        external_name = text(ref, "hostname", obj.get("hostname")).rstrip(".").lower()
        external_ips = tuple(
            ip(ref, f"externalIpAddresses[{i}]", value)
            for i, value in enumerate(
                sequence(ref, "externalIpAddresses", obj.get("externalIpAddresses"))
            )
        )
        if external_name:
            service_type = "ExternalName"
        elif not external_ips:
            raise TranslateError(ref, "an external service needs hostname or externalIpAddresses")
    links = tuple(
        ServiceLink(
            target_key=key("service", text(ref, f"linkedServices[{alias}]", target, required=True)),
            alias=intern_str(str(alias)),
        )
        for alias, target in sorted(
            mapping(ref, "linkedServices", obj.get("linkedServices")).items()
        )
    )
    sidekicks = tuple(
        intern_str(text(ref, f"secondaryLaunchConfigs[{i}].name", item.get("name"), required=True))
        for i, item in enumerate(
            mapping(ref, f"secondaryLaunchConfigs[{i}]", raw)
            for i, raw in enumerate(
                sequence(ref, "secondaryLaunchConfigs", obj.get("secondaryLaunchConfigs"))
            )
        )
    )
    metadata = mapping(ref, "metadata", obj.get("metadata"))
    token = obj.get("token")
    if token is None:  # Cattle keeps the service token in its data fields
        data_fields = mapping(
            ref, "data.fields", mapping(ref, "data", obj.get("data")).get("fields")
        )
        token = data_fields.get("token")
    return [
        Service(
            key=key("service", str(obj["id"])),
            source=source,
            namespace="",  # the stack's name: see resolve_stack_names
            name=intern_str(text(ref, "name", obj.get("name"), required=True)),
            stack_key=intern_str(key("stack", stack_id)),
            uuid=text(ref, "uuid", obj.get("uuid")),
            type=service_type,
            kind=intern_str(kind),
            cluster_ips=cluster_ips,
            headless=not cluster_ips and kind != "externalService",
            external_name=external_name,
            external_ips=external_ips,
            ports=_ports(ref, "launchConfig.ports", launch.get("ports")),
            labels=_labels(ref, "launchConfig.labels", launch.get("labels")),
            links=links,
            sidekicks=sidekicks,
            scale=integer(ref, "scale", obj.get("scale")),
            state=text(ref, "state", obj.get("state"), intern=True),
            health_state=text(ref, "healthState", obj.get("healthState"), intern=True),
            token=text(ref, "token", token),
            metadata_json=json.dumps(metadata, sort_keys=True, separators=(",", ":"))
            if metadata
            else "",
            fqdn=text(ref, "fqdn", obj.get("fqdn")),
        )
    ]


def _container(obj: Mapping[str, Any], source: str, ref: str) -> list[Record]:
    container_id = str(obj["id"])
    name = text(ref, "name", obj.get("name"), required=True)
    labels = _labels(ref, "labels", obj.get("labels"))
    primary_ip = obj.get("primaryIpAddress")
    ips = (ip(ref, "primaryIpAddress", primary_ip),) if primary_ip else ()
    host_id = text(ref, "hostId", obj.get("hostId"))
    stack_id = text(ref, "stackId", obj.get("stackId"))
    service_ids = [
        text(ref, f"serviceIds[{i}]", value, required=True)
        for i, value in enumerate(sequence(ref, "serviceIds", obj.get("serviceIds")))
    ]
    if not service_ids and obj.get("serviceId"):
        service_ids = [text(ref, "serviceId", obj.get("serviceId"))]
    state = text(ref, "state", obj.get("state"), intern=True)
    health = text(ref, "healthState", obj.get("healthState"), intern=True)
    launch_config = label(labels, LAUNCH_CONFIG_LABEL)
    if launch_config == PRIMARY_LAUNCH_CONFIG:
        launch_config = ""
    suffix = name.rsplit("-", 1)[-1] if "-" in name else ""
    ready = state == "running" and health in SERVING_HEALTH
    workload = Workload(
        key=key("container", container_id),
        source=source,
        namespace=label(labels, STACK_NAME_LABEL),
        name=name,
        stack_key=intern_str(key("stack", stack_id)) if stack_id else "",
        uuid=text(ref, "uuid", obj.get("uuid")),
        ips=ips,
        host_key=intern_str(key("host", host_id)) if host_id else "",
        hostname=text(ref, "hostname", obj.get("hostname")),
        labels=labels,
        state=state,
        ready=ready,
        health_state=health,
        service_keys=tuple(intern_str(key("service", sid)) for sid in service_ids),
        ports=_ports(ref, "ports", obj.get("ports")),
        create_index=integer(ref, "createIndex", obj.get("createIndex")),
        service_index=suffix if suffix.isdigit() else "",
        external_id=text(ref, "externalId", obj.get("externalId")),
        dns=tuple(text(ref, "dns", v) for v in sequence(ref, "dns", obj.get("dns"))),
        dns_search=tuple(
            text(ref, "dnsSearch", v) for v in sequence(ref, "dnsSearch", obj.get("dnsSearch"))
        ),
        launch_config=intern_str(launch_config),
        links=tuple(
            WorkloadLink(
                alias=intern_str(str(alias)),
                target_key=key(
                    "container", text(ref, f"instanceLinks[{alias}]", target, required=True)
                ),
            )
            for alias, target in sorted(
                mapping(ref, "instanceLinks", obj.get("instanceLinks")).items()
            )
        ),
    )
    records: list[Record] = [workload]
    if ips:
        endpoint = Endpoint(
            addresses=ips,
            ready=ready,
            serving=ready,
            terminating=state in ("stopping", "removing"),
            hostname=name,
            target_key=workload.key,
        )
        for service_id in service_ids:
            service_key = intern_str(key("service", service_id))
            records.append(
                Endpoints(
                    key=f"{PREFIX}endpoint/{service_id}/{container_id}",
                    source=source,
                    namespace=workload.namespace,
                    service="",  # named by service_key; the name needs the service itself
                    service_key=service_key,
                    address_type="IPv6" if ":" in ips[0] else "IPv4",
                    ports=workload.ports,
                    endpoints=(endpoint,),
                )
            )
    return records


def _subnet(
    ref: str, path: str, obj: Mapping[str, Any], source: str, subnet_key: str, network_key: str
) -> CattleSubnet:
    """``networkAddress`` is a CIDR (``10.42.0.0/16``, as Rancher's network driver templates
    write it) or an address with ``cidrSize``."""
    address = text(ref, f"{path}networkAddress", obj.get("networkAddress"), required=True)
    size = obj.get("cidrSize")
    if "/" in address:
        network = cidr(ref, f"{path}networkAddress", address)
        if size not in (None, "") and integer(ref, f"{path}cidrSize", size) != int(
            network.rsplit("/", 1)[1]
        ):
            raise TranslateError(
                ref, f"{path}cidrSize: {size!r} contradicts networkAddress {address!r}"
            )
    elif size in (None, ""):
        raise TranslateError(
            ref, f"{path}cidrSize: missing (networkAddress {address!r} has no prefix length)"
        )
    else:
        network = cidr(
            ref, f"{path}networkAddress", f"{address}/{integer(ref, f'{path}cidrSize', size)}"
        )
    inside = ipaddress.ip_network(network)
    bounds: dict[str, str] = {}
    for field in ("startAddress", "endAddress", "gateway"):
        value = obj.get(field)
        if value in (None, ""):
            bounds[field] = ""
            continue
        bounds[field] = ip(ref, f"{path}{field}", value)
        if ipaddress.ip_address(bounds[field]) not in inside:
            raise TranslateError(ref, f"{path}{field}: {value!r} is outside {network}")
    return CattleSubnet(
        key=subnet_key,
        source=source,
        network_key=network_key,
        cidr=network,
        start_address=bounds["startAddress"],
        end_address=bounds["endAddress"],
        gateway=bounds["gateway"],
    )


def _subnet_resource(obj: Mapping[str, Any], source: str, ref: str) -> list[Translated]:
    network_id = text(ref, "networkId", obj.get("networkId"), required=True)
    return [
        _subnet(ref, "", obj, source, key("subnet", str(obj["id"])), key("network", network_id))
    ]


def _network(obj: Mapping[str, Any], source: str, ref: str) -> list[Translated]:
    network_key = key("network", str(obj["id"]))
    subnets = []
    for i, raw in enumerate(sequence(ref, "subnets", obj.get("subnets"))):
        item = mapping(ref, f"subnets[{i}]", raw)
        item_id = text(ref, f"subnets[{i}].id", item.get("id"))
        subnets.append(
            _subnet(
                ref,
                f"subnets[{i}].",
                item,
                source,
                key("subnet", item_id) if item_id else "",
                network_key,
            )
        )
    metadata = mapping(ref, "metadata", obj.get("metadata"))
    cni_config = mapping(ref, "metadata.cniConfig", metadata.get("cniConfig"))
    bridge_subnets = []
    for name in sorted(cni_config):
        conf = mapping(ref, f"metadata.cniConfig[{name!r}]", cni_config[name])
        if conf.get("bridgeSubnet"):
            bridge_subnets.append(
                cidr(ref, f"metadata.cniConfig[{name!r}].bridgeSubnet", conf["bridgeSubnet"])
            )
    return [
        CattleNetwork(
            key=network_key,
            source=source,
            name=text(ref, "name", obj.get("name")),
            kind=text(ref, "kind", obj.get("kind"), intern=True),
            state=text(ref, "state", obj.get("state"), intern=True),
            is_default=flag(ref, "isDefault", obj.get("isDefault")),
            subnets=tuple(subnets),
            bridge_subnets=tuple(bridge_subnets),
        )
    ]


def _project(obj: Mapping[str, Any], source: str, ref: str) -> list[Translated]:
    network_id = text(ref, "defaultNetworkId", obj.get("defaultNetworkId"))
    if not network_id:
        return []
    return [
        CattleProject(
            key=key("project", str(obj["id"])),
            source=source,
            default_network_key=key("network", network_id),
        )
    ]


def _default_network(
    networks: Sequence[CattleNetwork], projects: Sequence[CattleProject]
) -> CattleNetwork | None:
    """The network whose subnet Cattle hosts' containers live in.

    The project's ``defaultNetworkId`` when a project is known; else the one network marked
    ``isDefault``; else Cattle's own choice (NetworkProcessManager.setDefaultNetwork): the one
    usable network that is not a Docker one (``docker*`` kinds, :data:`BUILTIN_NETWORK_KINDS`)
    nor ``hostOnlyNetwork``.
    Several candidates and nothing to tell them apart: none (logged), never a guess.
    """
    by_key = {network.key: network for network in networks}
    named = {project.default_network_key for project in projects}
    if named:
        found = [by_key[k] for k in sorted(named) if k in by_key]
        if len(found) == 1:
            return found[0]
        log.warning(
            "cattle: the project's default network %s is %s; Cattle hosts get no pod CIDRs",
            ", ".join(sorted(named)),
            "ambiguous" if found else "not among the networks",
        )
        return None
    marked = [network for network in networks if network.is_default]
    if len(marked) == 1:
        return marked[0]
    candidates = marked or [
        network
        for network in networks
        if network.state in USABLE_NETWORK_STATES
        and not network.kind.startswith("docker")
        and network.kind not in BUILTIN_NETWORK_KINDS
    ]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        log.warning(
            "cattle: several networks could be the default (%s) and no project names one; "
            "Cattle hosts get no pod CIDRs",
            ", ".join(f"{n.key} ({n.name})" for n in candidates),
        )
    return None


def network_cidrs(network: CattleNetwork, subnets: Sequence[CattleSubnet]) -> tuple[str, ...]:
    """A network's container CIDRs, at most one per family (the IPAM plugin hands out one
    address per CIDR): its ``subnet`` resources, else its embedded ``subnets``, else the
    ``bridgeSubnet`` of its CNI config."""
    cidrs = [s.cidr for s in subnets] or [s.cidr for s in network.subnets]
    if not cidrs:
        cidrs = list(network.bridge_subnets)
    chosen: dict[bool, str] = {}
    for value in cidrs:
        chosen.setdefault(":" in value, value)
    return tuple(chosen[family] for family in (False, True) if family in chosen)


def resolve_networks(items: Iterable[Translated]) -> list[Record]:
    """The store records among ``items``, Cattle hosts given the default network's subnet.

    Every Cattle host without pod CIDRs gets those of the default network (see
    :func:`_default_network`, :func:`network_cidrs`); the network, subnet and project facts
    are dropped. Without a usable network, hosts stay as they are.
    """
    records: list[Record] = []
    networks: list[CattleNetwork] = []
    subnets: dict[str, list[CattleSubnet]] = {}
    projects: list[CattleProject] = []
    for item in items:
        if isinstance(item, CattleNetwork):
            networks.append(item)
        elif isinstance(item, CattleSubnet):
            subnets.setdefault(item.network_key, []).append(item)
        elif isinstance(item, CattleProject):
            projects.append(item)
        else:
            records.append(item)
    if not networks:
        return records
    network = _default_network(networks, projects)
    if network is None:
        return records
    cidrs = network_cidrs(network, subnets.get(network.key, ()))
    if not cidrs:
        log.warning(
            "cattle: default network %s (%s) has no subnet (subnet resources, subnets, or "
            "metadata.cniConfig bridgeSubnet); Cattle hosts get no pod CIDRs",
            network.key,
            network.name,
        )
        return records
    return [
        dataclasses.replace(record, pod_cidrs=cidrs)
        if isinstance(record, Host) and record.key.startswith(PREFIX) and not record.pod_cidrs
        else record
        for record in records
    ]


def resolve(items: Iterable[Translated]) -> list[Record]:
    """The post-pass over a whole set of translated Cattle resources (a snapshot file, a
    relist): :func:`resolve_networks`, then :func:`resolve_stack_names`."""
    return resolve_stack_names(resolve_networks(items))


def resolve_stack_names(records: Iterable[Record]) -> list[Record]:
    """Fill the stack (namespace) and service names that Cattle gives only by id.

    Uses the stacks and services among ``records``; others stay as they are.
    """
    records = list(records)
    stacks = {r.key: r.name for r in records if isinstance(r, Stack)}
    services = {r.key: r for r in records if isinstance(r, Service)}
    resolved: list[Record] = []
    for record in records:
        if isinstance(record, Service | Workload) and record.stack_key in stacks:
            name = stacks[record.stack_key]
            if record.namespace != name:
                record = dataclasses.replace(record, namespace=name)
        elif isinstance(record, Endpoints) and record.key.startswith(PREFIX):
            service = services.get(record.service_key)
            if service is not None:
                name = stacks.get(service.stack_key, record.namespace)
                if (record.namespace, record.service) != (name, service.name):
                    record = dataclasses.replace(record, namespace=name, service=service.name)
        resolved.append(record)
    return resolved


_Translator = Callable[[Mapping[str, Any], str, str], Sequence[Translated]]
_TRANSLATORS: Final[dict[str, _Translator]] = {
    "host": _host,
    "stack": _stack,
    "environment": _stack,
    "container": _container,
    "network": _network,
    "subnet": _subnet_resource,
    "project": _project,
    **dict.fromkeys(SERVICE_TYPES, _service),
}
