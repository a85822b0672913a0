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
import marshal
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar

from node_services.sources.errors import TranslateError, UnsupportedObject
from node_services.sources.fields import (
    _IPV4,
    cidr,
    detach,
    flag,
    integer,
    ip,
    mapping,
    sequence,
    text,
)
from node_services.state.records import (
    Endpoint,
    Endpoints,
    Host,
    Labels,
    LaunchConfig,
    Port,
    Record,
    Service,
    ServiceLink,
    Stack,
    Workload,
    WorkloadLink,
    fast_init,
    intern_str,
    label,
    make_labels,
    replace,
    replacer,
)

log = logging.getLogger(__name__)

PREFIX: Final = "cattle:"
STACK_NAME_LABEL: Final = "io.rancher.stack.name"
LAUNCH_CONFIG_LABEL: Final = "io.rancher.service.launch.config"
PRIMARY_LAUNCH_CONFIG: Final = "io.rancher.service.primary.launch.config"
WIREGUARD_KEY_LABEL: Final = "node-services.io/wireguard-public-key"
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
    uuid: str = ""
    shown_json: str = ""  # the network as rancher-metadata shows it, but is_default


@dataclass(frozen=True, slots=True)
class CattleProject:
    """A Cattle ``project`` (environment): only its ``defaultNetworkId`` is used."""

    key: str
    source: str
    default_network_key: str


@dataclass(frozen=True, slots=True)
class CattleCertificate:
    """A Cattle ``certificate``: only its name is used, by :func:`resolve_lb_configs`."""

    key: str
    source: str
    name: str


Fact: TypeAlias = CattleNetwork | CattleSubnet | CattleProject | CattleCertificate
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


def translate(
    obj: Mapping[str, Any], source: str, memo: ContainerMemo | None = None
) -> Sequence[Translated]:
    """The records (and network facts) one Cattle resource becomes ([] for a removed one).

    Facts are for :func:`resolve`, which turns a whole set into store records. ``memo``: the
    live source's :class:`ContainerMemo` (the result is the same with or without it)."""
    items = translate_change(obj, source, memo, lazy=False)
    assert not isinstance(items, Volatile)
    return items


def translate_change(
    obj: Mapping[str, Any], source: str, memo: ContainerMemo | None, *, lazy: bool = True
) -> Sequence[Translated] | Volatile:
    """:func:`translate`, or (``lazy``) a :class:`Volatile` for a container whose memo entry
    differs from it in the volatile fields only: the live source's mirror, which holds the
    records of that entry, makes the new ones itself (``Volatile.records()`` when it cannot)."""
    resource_type = obj.get("type")
    if memo is not None and resource_type == "container":
        resource_id = obj.get("id")
        if (
            type(resource_id) is str
            and resource_id
            and obj.get("state") not in GONE_STATES
            and not obj.get("removed")
        ):  # the live source's common case, settled first: the ref is made on demand
            return _container(obj, source, "", memo, lazy)
    translator = _TRANSLATORS.get(resource_type) if isinstance(resource_type, str) else None
    ref = resource_ref(obj)
    if translator is None:
        raise UnsupportedObject(ref, f"type {resource_type!r} is not used by node-services")
    text(ref, "id", obj.get("id"), required=True)
    if obj.get("state") in GONE_STATES or obj.get("removed"):
        if memo is not None and resource_type == "container":
            memo.discard(f"{PREFIX}container/{obj['id']}")
        return []
    if memo is not None and resource_type == "container":
        return _container(obj, source, ref, memo, lazy)
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
                bind_ip=intern_str(match["ip"] or ""),
            )
        )
    return tuple(ports)


def _optional_int(ref: str, path: str, value: Any) -> int | None:
    """An integer Cattle may leave unset (null): None then."""
    return None if value is None else integer(ref, path, value)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":")) if value is not None else ""


# healthCheck -> rancher-metadata's health_check: these fields, snake_case (the rest dropped)
_HEALTH_CHECK_FIELDS: Final = (
    ("healthyThreshold", "healthy_threshold"),
    ("interval", "interval"),
    ("port", "port"),
    ("requestLine", "request_line"),
    ("responseTimeout", "response_timeout"),
    ("unhealthyThreshold", "unhealthy_threshold"),
)


def _health_check(ref: str, path: str, raw: Any) -> str:
    """A health check as canonical JSON in rancher-metadata's shape ("" = none)."""
    if raw is None:
        return ""
    check = mapping(ref, path, raw)
    return _canonical({theirs: check.get(ours) for ours, theirs in _HEALTH_CHECK_FIELDS})


CERTIFICATE_PREFIX: Final = f"{PREFIX}certificate/"
_STICKINESS_FIELDS: Final = ("cookie", "domain", "indirect", "mode", "name", "nocache", "postonly")
_PORT_RULE_FIELDS: Final = (
    ("backendName", "backend_name"),
    ("hostname", "hostname"),
    ("path", "path"),
    ("priority", "priority"),
    ("protocol", "protocol"),
    ("selector", "selector"),
    ("sourcePort", "source_port"),
    ("targetPort", "target_port"),
)


def _lb_config(ref: str, raw: Any) -> str:
    """``lbConfig`` in rancher-metadata's shape, canonical JSON ("" = none). Certificates and
    port rule services are given by key here (``cattle:certificate/<id>``,
    ``cattle:service/<id>``): :func:`resolve_lb_configs` names them."""
    if raw is None:
        return ""
    config = mapping(ref, "lbConfig", raw)
    rules = []
    for i, item in enumerate(sequence(ref, "lbConfig.portRules", config.get("portRules"))):
        rule = mapping(ref, f"lbConfig.portRules[{i}]", item)
        out: dict[str, Any] = {theirs: rule.get(ours) for ours, theirs in _PORT_RULE_FIELDS}
        for field in ("environment", "region"):
            value = rule.get(field)
            out[field] = value.lower() if isinstance(value, str) else value
        service_id = rule.get("serviceId")
        out["service"] = key("service", str(service_id)) if service_id else None
        weight = rule.get("weight")
        out["weight"] = 1 if weight is None else weight
        rules.append(out)
    sticky = config.get("stickinessPolicy")
    stickiness = (
        {k: mapping(ref, "lbConfig.stickinessPolicy", sticky).get(k) for k in _STICKINESS_FIELDS}
        if sticky is not None
        else None
    )
    default_cert = config.get("defaultCertificateId")
    return _canonical(
        {
            "certs": [
                key("certificate", str(c))
                for c in sequence(ref, "lbConfig.certificateIds", config.get("certificateIds"))
            ],
            "config": config.get("config"),
            "default_cert": key("certificate", str(default_cert)) if default_cert else None,
            "port_rules": rules,
            "stickiness_policy": stickiness,
        }
    )


def _host(obj: Mapping[str, Any], source: str, ref: str) -> list[Record]:
    hostname = text(ref, "hostname", obj.get("hostname"))
    name = text(ref, "name", obj.get("name")) or hostname
    if not name:
        raise TranslateError(ref, "name and hostname: missing")
    agent_ip = obj.get("agentIpAddress")
    memory_mb = integer(ref, "memory", obj.get("memory"))
    labels = _labels(ref, "labels", obj.get("labels"))
    return [
        Host(
            key=key("host", str(obj["id"])),
            source=source,
            name=intern_str(name),
            uuid=text(ref, "uuid", obj.get("uuid")),
            hostname=hostname or name,
            addresses=(ip(ref, "agentIpAddress", agent_ip),) if agent_ip else (),
            public_ip=ip(ref, "agentIpAddress", agent_ip) if agent_ip else "",
            labels=labels,
            state=text(ref, "state", obj.get("state"), intern=True),
            memory=memory_mb * 1024 * 1024,
            milli_cpu=integer(ref, "milliCpu", obj.get("milliCpu")),
            # a host label, as Cattle has no annotations (set with the agent's CATTLE_HOST_LABELS)
            wireguard_public_key=label(labels, WIREGUARD_KEY_LABEL),
            agent_state=text(ref, "agentState", obj.get("agentState"), intern=True),
            local_storage_mb=_optional_int(ref, "localStorageMb", obj.get("localStorageMb")),
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
    launch_configs = []
    for i, raw in enumerate(
        sequence(ref, "secondaryLaunchConfigs", obj.get("secondaryLaunchConfigs"))
    ):
        item = mapping(ref, f"secondaryLaunchConfigs[{i}]", raw)
        at = f"secondaryLaunchConfigs[{i}]"
        launch_configs.append(
            LaunchConfig(
                name=intern_str(text(ref, f"{at}.name", item.get("name"), required=True)),
                labels=_labels(ref, f"{at}.labels", item.get("labels")),
                ports=_ports(ref, f"{at}.ports", item.get("ports")),
                expose=_ports(ref, f"{at}.expose", item.get("expose")),
                health_check_json=_health_check(ref, f"{at}.healthCheck", item.get("healthCheck")),
            )
        )
    sidekicks = tuple(config.name for config in launch_configs)
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
            create_index=_optional_int(ref, "createIndex", obj.get("createIndex")),
            expose=_ports(ref, "launchConfig.expose", launch.get("expose")),
            health_check_json=_health_check(
                ref, "launchConfig.healthCheck", launch.get("healthCheck")
            ),
            lb_config_json=_lb_config(ref, obj.get("lbConfig")),
            launch_configs=tuple(launch_configs),
        )
    ]


def _str(ref: str, path: str, value: Any) -> str:
    """:func:`text` with the common case (a string) settled here: events are hot."""
    return "".join((value, "")) if type(value) is str else text(ref, path, value)


_LABEL_CACHE: Final[dict[str, Labels]] = {}
_LABEL_CACHE_SIZE: Final = 1 << 16


def _container_labels(ref: str, resource_key: str, value: Any) -> Labels:
    """``_labels(ref, "labels", value)``. A container's labels rarely change between its
    events, and sorting and interning them is a good part of its translation: its last labels
    are kept (by resource key, bounded) and given again when ``value`` equals them (a JSON
    value equal to a dict of strings is that dict of strings: the same labels)."""
    cached = _LABEL_CACHE.get(resource_key)
    if cached is not None and type(value) is dict and dict(cached) == value:
        return cached
    labels = make_labels(mapping(ref, "labels", value))
    if len(_LABEL_CACHE) >= _LABEL_CACHE_SIZE:
        _LABEL_CACHE.clear()
    _LABEL_CACHE[resource_key] = labels
    return labels


def _texts(ref: str, path: str, raw: Any) -> tuple[str, ...]:
    """``tuple(text(ref, path, v) for v in sequence(ref, path, raw))``, strings settled here."""
    if type(raw) is list and all(type(v) is str for v in raw):
        return tuple(["".join((v, "")) for v in raw])
    return tuple(text(ref, path, v) for v in sequence(ref, path, raw))


_PORT_CACHE: Final[dict[str, Port]] = {}
_PORT_CACHE_SIZE: Final = 4096


def _container_ports(ref: str, raw: Any) -> tuple[Port, ...]:
    """:func:`_ports` of a container's ``ports``; port specs repeat across containers, so the
    (frozen) Port of a string spec is kept and shared."""
    if type(raw) is not list or not all(type(item) is str for item in raw):
        return _ports(ref, "ports", raw)
    ports = [_PORT_CACHE.get(item) for item in raw]
    if None not in ports:
        return tuple(ports)  # type: ignore[arg-type]
    parsed = _ports(ref, "ports", raw)
    if len(_PORT_CACHE) + len(parsed) > _PORT_CACHE_SIZE:
        _PORT_CACHE.clear()
    for item, port in zip(raw, parsed, strict=True):
        _PORT_CACHE[intern_str(item)] = port
    return parsed


def _optional_int_fast(ref: str, path: str, value: Any) -> int | None:
    if value is None:
        return None
    return value + 0 if type(value) is int else _optional_int(ref, path, value)


_CONTAINER_FIELDS: Final = (
    "name",
    "labels",
    "hostId",
    "stackId",
    "serviceIds",
    "serviceId",
    "primaryNetworkId",
    "instanceLinks",
    "createIndex",
    "system",
    "healthCheck",
    "uuid",
    "hostname",
    "ports",
    "externalId",
    "dns",
    "dnsSearch",
    "startCount",
    "primaryMacAddress",
    "memoryReservation",
    "milliCpuReservation",
)
"""The fields a container's translation reads besides ``id``, ``type`` and the volatile ones
(``primaryIpAddress``, ``state``, ``healthState``): what :class:`ContainerMemo` compares."""
_SERVICE_PREFIX: Final = f"{PREFIX}service/"
_R = TypeVar("_R", bound=Record)


def replace_record(record: _R, **changes: Any) -> _R:
    """``dataclasses.replace`` for a record, at a fraction of its cost (:func:`records.replace`)."""
    return replace(record, **changes)


_VOLATILE: Final = replacer(Workload, ("ips", "state", "ready", "health_state"))
"""A container's Workload with new volatile fields (the memo's hit)."""


@fast_init
@dataclass(frozen=True, slots=True)
class Volatile:
    """A container that differs from ``base`` (the records of its memo entry) in the fields
    that change while it lives only: its address, state and health. The endpoint groups are
    those of ``base`` (for an address in the same family, or none as none before)."""

    base: Sequence[Translated]
    ips: tuple[str, ...]
    state: str
    health_state: str
    ready: bool

    def records(self) -> list[Record]:
        """The container's records: ``base`` with these fields."""
        return moved(self.base, self)


def moved(records: Sequence[Translated], change: Volatile | Workload) -> list[Record]:
    """``records`` (a container's Workload, then its endpoint groups, as :func:`translate`
    or the mirror's resolution made them from ``change.base``) with the volatile fields of
    ``change`` (a Volatile, or a Workload that holds them). A group whose endpoint is
    unchanged is kept as it is."""
    workload = records[0]
    assert isinstance(workload, Workload)
    workload = _VOLATILE(
        workload,
        ips=change.ips,
        state=change.state,
        ready=change.ready,
        health_state=change.health_state,
    )
    out: list[Record] = [workload]
    if len(records) > 1:
        endpoint = _endpoint(workload)
        for group in records[1:]:
            assert isinstance(group, Endpoints)
            if group.endpoints != (endpoint,):
                group = _ENDPOINTS_OF(group, endpoints=(endpoint,))
            out.append(group)
    return out


def _endpoint(workload: Workload) -> Endpoint:
    """The endpoint a container with an address is in each of its services' groups."""
    return Endpoint(
        addresses=workload.ips,
        ready=workload.ready,
        serving=workload.ready,
        terminating=workload.state in ("stopping", "removing"),
        hostname=workload.name,
        target_key=workload.key,
    )


def _keeps_groups(base: Sequence[Record], ips: tuple[str, ...]) -> bool:
    """Whether a container with the records ``base`` and the address ``ips`` now has the
    same endpoint groups (one per service with an address, in the address's family)."""
    if len(base) == 1:
        workload = base[0]
        return not ips or (isinstance(workload, Workload) and not workload.service_keys)
    if not ips:
        return False
    family = "IPv6" if ":" in ips[0] else "IPv4"
    for group in base[1:]:
        if type(group) is not Endpoints or group.address_type != family:
            return False
    return True


class ContainerMemo:
    """The last full translation of each container, given again for an event that changed none
    of the fields it reads but the volatile ones (address, state, health: re-read every time;
    an entry keeps those of the translation it holds, the live source's mirror the current).

    A container event is a full object, and most of them change one or two fields; parsing the
    other twenty is most of a translation. The fields are compared exactly: by their
    ``marshal`` form (which, unlike ``==``, tells ``1`` from ``1.0`` and ``true``), kept whole
    (a few hundred bytes a container; comparing two costs less than digesting one); an object
    marshal cannot write is translated without the memo. Bounded: it is cleared when it holds
    ``max_entries`` containers or ``max_bytes`` of those forms (and by the source at each
    relist).
    """

    __slots__ = ("_bytes", "_entries", "max_bytes", "max_entries")

    def __init__(self, max_entries: int = 1 << 18, max_bytes: int = 64 << 20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: dict[str, tuple[bytes, tuple[Record, ...]]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Bytes of the marshal forms held."""
        return self._bytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def discard(self, workload_key: str) -> None:
        known = self._entries.pop(workload_key, None)
        if known is not None:
            self._bytes -= len(known[0])

    @staticmethod
    def signature(obj: Mapping[str, Any]) -> bytes | None:
        """The marshal form of the fields a container's translation reads (None: not one
        marshal can write): equal forms are equal values of the same JSON types. Version 0:
        later ones mark objects held twice (dict keys a list's page shares across its
        objects), so that equal values from a page and from an event would differ."""
        try:
            return marshal.dumps(tuple(map(obj.get, _CONTAINER_FIELDS)), 0)
        except ValueError:  # not a JSON value (or nested beyond marshal's limit)
            return None

    def get(self, workload_key: str, signature: bytes) -> tuple[Record, ...] | None:
        known = self._entries.get(workload_key)
        return known[1] if known is not None and known[0] == signature else None

    def put(self, workload_key: str, signature: bytes, records: Sequence[Record]) -> None:
        known = self._entries.get(workload_key)
        if known is not None:
            self._bytes -= len(known[0])
        elif len(self._entries) >= self.max_entries:
            self.clear()
        if self._bytes + len(signature) > self.max_bytes:
            self.clear()
        self._entries[workload_key] = (signature, tuple(records))
        self._bytes += len(signature)


def _container(
    obj: Mapping[str, Any],
    source: str,
    ref: str,
    memo: ContainerMemo | None = None,
    lazy: bool = False,
) -> list[Record] | Volatile:
    # Each field read as the generic readers do (text, integer, ...), with their common case
    # inlined: this runs for every container event. The volatile fields first: a memo hit
    # reads only them.
    # ``ref`` may be "": made from ``obj`` when a message needs it.
    get = obj.get
    container_id = str(obj["id"])
    workload_key = f"{PREFIX}container/{container_id}"
    primary_ip = get("primaryIpAddress")
    if type(primary_ip) is str and _IPV4.fullmatch(primary_ip):
        ips: tuple[str, ...] = (detach(primary_ip),)
    else:
        ips = (ip(ref or resource_ref(obj), "primaryIpAddress", primary_ip),) if primary_ip else ()
    state = get("state")
    if type(state) is str:
        state = sys.intern(state)
    else:
        state = text(ref or resource_ref(obj), "state", state, intern=True)
    health = get("healthState")
    if type(health) is str:
        health = sys.intern(health)
    else:
        health = text(ref or resource_ref(obj), "healthState", health, intern=True)
    ready = state == "running" and health in SERVING_HEALTH
    if memo is None:
        workload = _container_workload(obj, source, ref, workload_key, ips, state, health, ready)
        return _container_records(workload, container_id)
    signature = memo.signature(obj)
    known = memo.get(workload_key, signature) if signature is not None else None
    last = known[0] if known is not None else None
    if isinstance(last, Workload) and last.source == source:
        assert known is not None
        if _keeps_groups(known, ips):
            if not lazy and (last.ips, last.state, last.health_state) == (ips, state, health):
                return list(known)
            change = Volatile(known, ips, state, health, ready)
            return change if lazy else change.records()
        # endpoint groups come or go: made again, the memo's entry with them
        workload = _VOLATILE(last, ips=ips, state=state, ready=ready, health_state=health)
        records = _container_records(workload, container_id)
    else:
        ref = ref or resource_ref(obj)
        workload = _container_workload(obj, source, ref, workload_key, ips, state, health, ready)
        records = _container_records(workload, container_id)
    if signature is not None:
        memo.put(workload_key, signature, records)
    return records


def _container_full(obj: Mapping[str, Any], source: str, ref: str) -> list[Record]:
    """A container's records, without a memo."""
    records = _container(obj, source, ref)
    assert isinstance(records, list)
    return records


def _container_workload(
    obj: Mapping[str, Any],
    source: str,
    ref: str,
    workload_key: str,
    ips: tuple[str, ...],
    state: str,
    health: str,
    ready: bool,
) -> Workload:
    """A container's Workload; reads only :data:`_CONTAINER_FIELDS` of ``obj``."""
    get = obj.get
    name = get("name")
    if type(name) is str and name:
        name = "".join((name, ""))
    else:
        name = text(ref, "name", name, required=True)
    labels = _container_labels(ref, workload_key, get("labels"))
    host_id = _str(ref, "hostId", get("hostId"))
    stack_id = _str(ref, "stackId", get("stackId"))
    raw_service_ids = get("serviceIds")
    if type(raw_service_ids) is list and all(type(v) is str and v for v in raw_service_ids):
        service_ids = ["".join((v, "")) for v in raw_service_ids]
    else:
        service_ids = [
            text(ref, f"serviceIds[{i}]", value, required=True)
            for i, value in enumerate(sequence(ref, "serviceIds", raw_service_ids))
        ]
    if not service_ids and get("serviceId"):
        service_ids = [text(ref, "serviceId", get("serviceId"))]
    launch_config = label(labels, LAUNCH_CONFIG_LABEL)
    if launch_config == PRIMARY_LAUNCH_CONFIG:
        launch_config = ""
    suffix = name.rsplit("-", 1)[-1] if "-" in name else ""
    network_id = _str(ref, "primaryNetworkId", get("primaryNetworkId"))
    raw_links = get("instanceLinks")
    links = (
        tuple(
            WorkloadLink(
                alias=intern_str(str(alias)),
                target_key=key(
                    "container", text(ref, f"instanceLinks[{alias}]", target, required=True)
                ),
            )
            for alias, target in sorted(mapping(ref, "instanceLinks", raw_links).items())
        )
        if raw_links is not None and not (type(raw_links) is dict and not raw_links)
        else ()
    )
    create_index = get("createIndex")
    system = get("system")
    health_check = get("healthCheck")
    return Workload(
        key=workload_key,
        source=source,
        namespace=label(labels, STACK_NAME_LABEL),
        name=name,
        stack_key=sys.intern(f"{PREFIX}stack/{stack_id}") if stack_id else "",
        uuid=_str(ref, "uuid", get("uuid")),
        ips=ips,
        host_key=sys.intern(f"{PREFIX}host/{host_id}") if host_id else "",
        hostname=_str(ref, "hostname", get("hostname")),
        labels=labels,
        state=state,
        ready=ready,
        health_state=health,
        service_keys=tuple([sys.intern(f"{_SERVICE_PREFIX}{sid}") for sid in service_ids]),
        ports=_container_ports(ref, get("ports")),
        create_index=create_index + 0
        if type(create_index) is int
        else integer(ref, "createIndex", create_index),
        service_index=suffix if suffix.isdigit() else "",
        external_id=_str(ref, "externalId", get("externalId")),
        dns=_texts(ref, "dns", get("dns")),
        dns_search=_texts(ref, "dnsSearch", get("dnsSearch")),
        launch_config=intern_str(launch_config),
        start_count=_optional_int_fast(ref, "startCount", get("startCount")),
        system=False if system is None else flag(ref, "system", system),
        health_check_json=""
        if health_check is None
        else _health_check(ref, "healthCheck", health_check),
        primary_mac_address=_str(ref, "primaryMacAddress", get("primaryMacAddress")),
        memory_reservation=_optional_int_fast(ref, "memoryReservation", get("memoryReservation")),
        milli_cpu_reservation=_optional_int_fast(
            ref, "milliCpuReservation", get("milliCpuReservation")
        ),
        # the network's key until resolve_networks puts its uuid here
        network_uuid=sys.intern(f"{PREFIX}network/{network_id}") if network_id else "",
        links=links,
    )


_ENDPOINTS_OF: Final = replacer(Endpoints, ("endpoints",))


def _container_records(workload: Workload, container_id: str) -> list[Record]:
    """The Workload and, when it has an address, one Endpoints per service it belongs to."""
    records: list[Record] = [workload]
    ips = workload.ips
    if ips:
        endpoint = _endpoint(workload)
        address_type = "IPv6" if ":" in ips[0] else "IPv4"
        for service_key in workload.service_keys:
            service_id = service_key[len(_SERVICE_PREFIX) :]
            records.append(
                Endpoints(
                    key=f"{PREFIX}endpoint/{service_id}/{container_id}",
                    source=workload.source,
                    namespace=workload.namespace,
                    service="",  # named by service_key; the name needs the service itself
                    service_key=service_key,
                    address_type=address_type,
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
            uuid=text(ref, "uuid", obj.get("uuid")),
            shown_json=_canonical(
                {
                    "default_policy_action": obj.get("defaultPolicyAction"),
                    "host_ports": obj.get("hostPorts"),
                    "metadata": metadata,
                    "name": obj.get("name"),
                    "policy": obj.get("policy"),
                    "uuid": obj.get("uuid"),
                }
            ),
        )
    ]


def _certificate(obj: Mapping[str, Any], source: str, ref: str) -> list[Translated]:
    return [
        CattleCertificate(
            key=key("certificate", str(obj["id"])),
            source=source,
            name=text(ref, "name", obj.get("name")),
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
        elif isinstance(item, CattleCertificate):
            continue  # read by resolve_lb_configs
        else:
            records.append(item)
    records = _resolve_network_uuids(records, networks)
    if not networks:
        return records
    network = _default_network(networks, projects)
    if network is None:
        return records
    if network.shown_json:
        shown = _canonical({**json.loads(network.shown_json), "is_default": True})
        records = [
            dataclasses.replace(record, network_json=shown)
            if isinstance(record, Host) and record.key.startswith(PREFIX)
            else record
            for record in records
        ]
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


def _resolve_network_uuids(
    records: list[Record], networks: Sequence[CattleNetwork]
) -> list[Record]:
    """Containers name their network by key until here: put its uuid instead ("" unknown)."""
    uuids = {network.key: network.uuid for network in networks}
    resolved: list[Record] = []
    for record in records:
        if (
            isinstance(record, Workload)
            and record.network_uuid.startswith(PREFIX)
            and record.key.startswith(PREFIX)
        ):
            record = dataclasses.replace(record, network_uuid=uuids.get(record.network_uuid, ""))
        resolved.append(record)
    return resolved


def resolve(items: Iterable[Translated]) -> list[Record]:
    """The post-pass over a whole set of translated Cattle resources (a snapshot file, a
    relist): :func:`resolve_networks`, :func:`resolve_stack_names`, then
    :func:`resolve_lb_configs`."""
    items = list(items)
    certificates = [item for item in items if isinstance(item, CattleCertificate)]
    return resolve_lb_configs(resolve_stack_names(resolve_networks(items)), certificates)


def _named(value: str, names: Mapping[str, str]) -> bool:
    return not value.startswith(PREFIX) or value in names


def _name(value: str, names: Mapping[str, str]) -> str | None:
    """The name of a key (None when unknown); a name (resolved before) stays."""
    return names.get(value) if value.startswith(PREFIX) else value


def resolve_lb_configs(
    records: Iterable[Record], certificates: Sequence[CattleCertificate]
) -> list[Record]:
    """Name the certificates (by their name) and port rule services (``<stack>/<service>``)
    that a load balancer's ``lb_config`` gives by key; unknown ones become null."""
    records = list(records)
    names = {c.key: c.name for c in certificates}
    stacks = {r.key: r.name for r in records if isinstance(r, Stack)}
    services = {
        r.key: f"{stacks.get(r.stack_key, r.namespace)}/{r.name}"
        for r in records
        if isinstance(r, Service)
    }
    resolved: list[Record] = []
    for record in records:
        if isinstance(record, Service) and record.lb_config_json:
            config = json.loads(record.lb_config_json)
            config["certs"] = [_name(c, names) for c in config["certs"] if _named(c, names)]
            if config["default_cert"] is not None:
                config["default_cert"] = _name(config["default_cert"], names)
            for rule in config["port_rules"]:
                if rule["service"] is not None:
                    rule["service"] = _name(rule["service"], services)
            record = dataclasses.replace(record, lb_config_json=_canonical(config))
        resolved.append(record)
    return resolved


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
    "container": _container_full,
    "network": _network,
    "subnet": _subnet_resource,
    "project": _project,
    "certificate": _certificate,
    **dict.fromkeys(SERVICE_TYPES, _service),
}


def host_pod_cidrs(facts: Iterable[Translated]) -> tuple[str, ...]:
    """The pod CIDRs :func:`resolve_networks` gives every Cattle host without any, from the
    network, subnet and project facts among ``facts`` (other items are ignored); () when no
    default network or subnet is known. For a live source that resolves hosts one by one."""
    networks: list[CattleNetwork] = []
    subnets: dict[str, list[CattleSubnet]] = {}
    projects: list[CattleProject] = []
    for item in facts:
        if isinstance(item, CattleNetwork):
            networks.append(item)
        elif isinstance(item, CattleSubnet):
            subnets.setdefault(item.network_key, []).append(item)
        elif isinstance(item, CattleProject):
            projects.append(item)
    network = _default_network(networks, projects) if networks else None
    if network is None:
        return ()
    return network_cidrs(network, subnets.get(network.key, ()))
