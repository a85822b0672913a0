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

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar

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
    bind_ip: str = ""  # Cattle "127.0.0.1:9443:443/tcp" publishes on that host address only


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
    wireguard_public_key: str = ""  # node-services.io/wireguard-public-key (annotation / label)
    agent_state: str = ""  # Cattle agentState ("active", "reconnecting")
    local_storage_mb: int | None = None  # Cattle localStorageMb (None: not reported)
    # Cattle: the managed network its containers use, in rancher-metadata's shape (canonical
    # JSON, "" = none); Cattle networks are no record kind of their own
    network_json: str = ""


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
class LaunchConfig:
    """A Cattle secondary launch config (a sidekick): its own labels, ports and health check."""

    name: str
    labels: Labels = NO_LABELS
    ports: tuple[Port, ...] = ()
    expose: tuple[Port, ...] = ()
    health_check_json: str = ""  # canonical JSON ("" = none)


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
    create_index: int | None = None  # Cattle createIndex (None: not set)
    expose: tuple[Port, ...] = ()  # Cattle launchConfig.expose: ports open to the network only
    health_check_json: str = ""  # Cattle launchConfig.healthCheck, canonical JSON ("" = none)
    lb_config_json: str = ""  # Cattle lbConfig in rancher-metadata's shape, canonical JSON
    launch_configs: tuple[LaunchConfig, ...] = ()  # Cattle secondaryLaunchConfigs (sidekicks)


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
    start_count: int | None = None  # Cattle startCount (None: not set)
    system: bool = False  # Cattle system container
    health_check_json: str = ""  # Cattle healthCheck, canonical JSON ("" = none)
    primary_mac_address: str = ""
    memory_reservation: int | None = None  # Cattle memoryReservation (None: not set)
    milli_cpu_reservation: int | None = None
    network_uuid: str = ""  # uuid of the Cattle network of its primary address
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


# -- fast construction ----------------------------------------------------------------------------
#
# A frozen dataclass's __init__ stores each field with object.__setattr__, a call per field: a
# 33-field Workload costs ~5 us to make, and the live sources make one per event. Each record
# class below gets an equivalent __init__ that stores its fields with plain attribute stores,
# on a "twin": a class with the same __slots__ (so the same memory layout), which the instance
# is switched to for the stores and switched back from (``__class__`` assignment between
# layout-compatible classes). The result is an ordinary instance of the record class: frozen
# afterwards as before, equality, hash, repr, pickling and dataclasses.fields unchanged.
# :func:`replace` is ``dataclasses.replace`` by the same means, without calling __init__.

_R = TypeVar("_R")
_set_attr: Final = object.__setattr__
_TWINS: Final[dict[type, type]] = {}
_REPLACERS: Final[dict[tuple[type, tuple[str, ...]], Callable[..., Any]]] = {}


def _twin(cls: type) -> type | None:
    """A plain class with ``cls``'s slots, or None when ``cls`` is not a frozen, slotted
    dataclass whose fields are all plain init fields with plain (or no) defaults."""
    twin = _TWINS.get(cls)
    if twin is not None:
        return twin
    params = getattr(cls, "__dataclass_params__", None)
    slots = cls.__dict__.get("__slots__")
    if params is None or not params.frozen or not isinstance(slots, tuple):
        return None
    fields = dataclasses.fields(cls)
    if (
        slots != tuple(f.name for f in fields)
        or hasattr(cls, "__post_init__")
        or cls.__bases__ != (object,)
        or any(not f.init or f.default_factory is not dataclasses.MISSING for f in fields)
        or any(f.name.startswith("_ns_") or f.name in ("self", "record", "new") for f in fields)
    ):  # (the generated functions' own names must not be fields: Service has a ``type``)
        return None
    twin = _TWINS[cls] = type(f"_{cls.__name__}Twin", (), {"__slots__": slots})
    return twin


def fast_init(cls: type[_R]) -> type[_R]:
    """Class decorator: a frozen, slotted dataclass (outside this module) made the way the
    records are (see above); raises TypeError for any other class."""
    _speed_up(cls)
    return cls


def _speed_up(cls: type) -> None:
    """Give ``cls`` the twin-based __init__ (same signature and defaults as the dataclass's)."""
    twin = _twin(cls)
    if twin is None:
        raise TypeError(f"{cls.__name__}: not a plain frozen, slotted dataclass")
    fields = dataclasses.fields(cls)
    params = ", ".join(
        f.name if f.default is dataclasses.MISSING else f"{f.name}=_ns_d_{f.name}" for f in fields
    )
    names = ", ".join(f.name for f in fields)
    body = "".join(f"    self.{f.name} = {f.name}\n" for f in fields)
    source = (
        f"def __init__(self, {params}):\n"
        "    if _ns_type(self) is not _ns_cls:\n"  # a subclass: its own layout, the dataclass's way
        f"        _ns_init(self, {names})\n"
        "        return\n"
        "    _ns_set(self, '__class__', _ns_twin)\n"
        f"{body}"
        "    _ns_set(self, '__class__', _ns_cls)\n"
    )
    namespace: dict[str, Any] = {
        "_ns_cls": cls,
        "_ns_twin": twin,
        "_ns_set": _set_attr,
        "_ns_type": type,
        "_ns_init": cls.__init__,  # type: ignore[misc]
        **{f"_ns_d_{f.name}": f.default for f in fields if f.default is not dataclasses.MISSING},
    }
    exec(source, namespace)  # generated from the field names only
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__doc__ = cls.__init__.__doc__  # type: ignore[misc]
    setattr(cls, "__init__", init)  # noqa: B010 - mypy must not see a method assignment
    # __eq__ as the dataclass's (a tuple of the fields against the other's, each pair equal
    # when identical or ==), field by field: no two tuples built, and it stops at the first
    # field that differs (an event's record differs from the last in its first fields).
    compare = " and ".join(
        f"(self.{f.name} is other.{f.name} or self.{f.name} == other.{f.name})" for f in fields
    )
    source = (
        "def __eq__(self, other):\n"
        "    if self is other:\n"
        "        return True\n"
        "    if other.__class__ is not self.__class__:\n"
        "        return NotImplemented\n"
        f"    return {compare}\n"
    )
    namespace = {}
    exec(source, namespace)  # generated from the field names only
    eq = namespace["__eq__"]
    eq.__qualname__ = f"{cls.__qualname__}.__eq__"
    eq.__module__ = cls.__module__
    setattr(cls, "__eq__", eq)  # noqa: B010


def replacer(cls: type[_R], names: tuple[str, ...]) -> Callable[..., _R]:
    """A function ``(record, **changes) -> record`` for records of ``cls`` whose changes are
    exactly the keyword arguments ``names``: what :func:`replace` calls, for a hot path to
    keep."""
    known = _REPLACERS.get((cls, names))
    if known is not None:
        return known
    twin = _twin(cls)
    fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [name for name in names if name not in fields]
    if unknown:
        raise TypeError(f"{cls.__name__}: no field {unknown[0]!r} to replace")
    if twin is None:

        def fallback(record: _R, /, **changes: Any) -> _R:
            return dataclasses.replace(record, **changes)  # type: ignore[type-var]

        _REPLACERS[(cls, names)] = fallback
        return fallback
    keywords = f", *, {', '.join(names)}" if names else ""
    body = "".join(
        f"    new.{name} = {name if name in names else 'record.' + name}\n" for name in fields
    )
    source = (
        f"def replace(record, /{keywords}):\n"
        "    new = _ns_new(_ns_twin)\n"
        f"{body}"
        "    _ns_set(new, '__class__', _ns_cls)\n"
        "    return new\n"
    )
    namespace: dict[str, Any] = {
        "_ns_cls": cls,
        "_ns_twin": twin,
        "_ns_set": _set_attr,
        "_ns_new": object.__new__,
    }
    exec(source, namespace)  # generated from the field names only
    function: Callable[..., _R] = namespace["replace"]
    function.__qualname__ = f"replace_{cls.__name__}"
    _REPLACERS[(cls, names)] = function
    return function


def replace(record: _R, /, **changes: Any) -> _R:
    """``dataclasses.replace(record, **changes)`` for a record, at a fraction of its cost (no
    __init__ call: the unchanged fields are copied as they are)."""
    function = _REPLACERS.get((type(record), tuple(changes)))
    if function is None:
        function = replacer(type(record), tuple(changes))
    new: _R = function(record, **changes)
    return new


for _cls in (
    Port,
    Host,
    Stack,
    ServiceLink,
    LaunchConfig,
    Service,
    Endpoint,
    Endpoints,
    WorkloadLink,
    Workload,
    Deleted,
):
    _speed_up(_cls)
del _cls
