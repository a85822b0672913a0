"""The records of the shared state cache: slim, frozen, slotted, source-neutral.

Sources translate Kubernetes and Cattle API objects into these at the boundary; nothing else
enters the store. Strings that repeat across records (namespaces, node names, label keys,
protocols) are interned by the translators through :func:`intern_str`, so 100,000 endpoints
share one copy of each.

Keys are stable, unique strings naming the origin object:
``k8s:<Kind>/<namespace>/<name>`` (``k8s:<Kind>/<name>`` when cluster-scoped) and
``cattle:<type>/<id>``. A record refers to another by its key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Final, TypeAlias

# Kinds of record, as used in keys of Snapshot.by_kind and in metrics.
HOST: Final = "host"
STACK: Final = "stack"
SERVICE: Final = "service"
ENDPOINTS: Final = "endpoints"
WORKLOAD: Final = "workload"
KINDS: Final = (HOST, STACK, SERVICE, ENDPOINTS, WORKLOAD)

Labels: TypeAlias = tuple[tuple[str, str], ...]
"""Labels or annotations as sorted (key, value) pairs: immutable and cheap to compare."""

NO_LABELS: Final[Labels] = ()


def intern_str(value: str) -> str:
    """Intern a string that is likely to repeat across many records."""
    return sys.intern(value)


def make_labels(mapping: object) -> Labels:
    """Sorted, interned (key, value) pairs from a mapping of strings; non-strings are str()-ed."""
    if not isinstance(mapping, dict) or not mapping:
        return NO_LABELS
    return tuple(sorted((intern_str(str(k)), intern_str(str(v))) for k, v in mapping.items()))


def label(labels: Labels, name: str, default: str = "") -> str:
    """The value of one label, or ``default``."""
    for key, value in labels:
        if key == name:
            return value
    return default


@dataclass(frozen=True, slots=True)
class Port:
    """A service or endpoint port. ``name`` is "" when unnamed."""

    name: str
    port: int
    protocol: str = "TCP"  # TCP | UDP | SCTP
    target_port: str = ""  # number or named port, as text; "" when unset
    node_port: int = 0
    public_port: int = 0  # Cattle "8080:80/tcp" publishes 80 on the host as 8080
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class Host:
    """A node: Kubernetes Node or Cattle host."""

    key: str
    source: str
    name: str
    uuid: str = ""
    hostname: str = ""
    addresses: tuple[str, ...] = ()  # InternalIP(s) first / Cattle agentIpAddress
    external_addresses: tuple[str, ...] = ()
    pod_cidrs: tuple[str, ...] = ()  # both families, in order
    vtep_mac: str = ""  # annotation node-services.io/vtep-mac
    public_ip: str = ""  # annotation node-services.io/public-ip, else the first address
    labels: Labels = NO_LABELS
    state: str = ""  # Cattle host state ("active"), Kubernetes Ready condition ("ready"/"notready")
    memory: int = 0  # bytes
    milli_cpu: int = 0


@dataclass(frozen=True, slots=True)
class Stack:
    """A Kubernetes Namespace or a Cattle stack."""

    key: str
    source: str
    name: str
    uuid: str = ""
    labels: Labels = NO_LABELS
    state: str = ""
    system: bool = False


@dataclass(frozen=True, slots=True)
class ServiceLink:
    """A link from one service to another: Cattle service links and alias (dns) services."""

    target_key: str  # key of the linked service
    alias: str = ""  # name the link is known by, "" for the target's own name


@dataclass(frozen=True, slots=True)
class Service:
    """A Kubernetes Service or a Cattle service of any kind."""

    key: str
    source: str
    namespace: str  # namespace / stack name
    name: str
    stack_key: str = ""
    uuid: str = ""
    # Kubernetes type: ClusterIP | NodePort | LoadBalancer | ExternalName; Cattle services map
    # to ClusterIP (with a VIP), or ExternalName for external services that name a hostname.
    type: str = "ClusterIP"
    # Rancher kind: kubernetesService | service | externalService | dnsService |
    # loadBalancerService
    kind: str = "kubernetesService"
    cluster_ips: tuple[str, ...] = ()  # both families; empty when headless or ExternalName
    headless: bool = False
    external_name: str = ""  # ExternalName target / Cattle external service hostname
    external_ips: tuple[str, ...] = ()  # Cattle externalIpAddresses / Kubernetes externalIPs
    ports: tuple[Port, ...] = ()
    publish_not_ready: bool = False
    selector: Labels = NO_LABELS
    labels: Labels = NO_LABELS
    links: tuple[ServiceLink, ...] = ()
    sidekicks: tuple[str, ...] = ()  # Cattle secondary launch config names
    scale: int = 0
    state: str = ""
    health_state: str = ""
    token: str = ""  # secret: shown only to the service's own workloads
    metadata_json: str = ""  # Cattle free-form service metadata, canonical JSON ("" = none)
    fqdn: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend of a service: an EndpointSlice endpoint or a Cattle service's container."""

    addresses: tuple[str, ...]
    ready: bool = True  # EndpointSlice "ready: null" counts as ready
    serving: bool = True
    terminating: bool = False
    hostname: str = ""
    node_name: str = ""
    target_key: str = ""  # key of the Workload behind it, "" when unknown
    zone: str = ""


@dataclass(frozen=True, slots=True)
class Endpoints:
    """A group of endpoints of one service: one EndpointSlice, or one Cattle container link."""

    key: str
    source: str
    namespace: str
    service: str  # service name
    service_key: str
    address_type: str = "IPv4"  # IPv4 | IPv6 | FQDN
    ports: tuple[Port, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkloadLink:
    """A Cattle container link: the linking container knows `target_key`'s workload as `alias`."""

    alias: str
    target_key: str


@dataclass(frozen=True, slots=True)
class Workload:
    """A Pod or a Cattle container."""

    key: str
    source: str
    namespace: str  # namespace / stack name
    name: str
    stack_key: str = ""
    uuid: str = ""
    ips: tuple[str, ...] = ()  # primary first; both families
    host_key: str = ""  # key of the Host it runs on, "" when unscheduled
    node_name: str = ""
    hostname: str = ""  # pod spec.hostname / container hostname
    subdomain: str = ""
    host_network: bool = False
    labels: Labels = NO_LABELS
    state: str = ""  # pod phase lowercased / Cattle container state
    ready: bool = False
    health_state: str = ""
    service_keys: tuple[str, ...] = ()  # Cattle serviceIds (Kubernetes: empty, use selectors)
    ports: tuple[Port, ...] = ()
    create_index: int = 0
    service_index: str = ""
    external_id: str = ""
    dns: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    launch_config: str = ""  # Cattle sidekick launch config name ("" = primary)
    links: tuple[WorkloadLink, ...] = ()


Record: TypeAlias = Host | Stack | Service | Endpoints | Workload

KIND_OF: Final[dict[type, str]] = {
    Host: HOST,
    Stack: STACK,
    Service: SERVICE,
    Endpoints: ENDPOINTS,
    Workload: WORKLOAD,
}


def kind_of(record: Record) -> str:
    """The kind name of a record (``host``, ``stack``, ...)."""
    return KIND_OF[type(record)]


@dataclass(frozen=True, slots=True)
class Deleted:
    """A change that removes the record with this key."""

    key: str


Change: TypeAlias = Record | Deleted
