"""Rancher Cattle v2-beta resources -> state records, at the boundary.

Input is one resource as the Cattle API returns it (camelCase, ``id``, ``type``): host,
stack (``environment`` in older APIs), the service kinds, container. See
docs/cattle-v2-beta-notes.md for the field facts. A container becomes a Workload plus one
Endpoints record per service it belongs to, so no cross-resource join is needed here; the
one join left, a service's stack name, is filled by :func:`resolve_stack_names` once the
stacks are known.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from node_services.sources.errors import TranslateError, UnsupportedObject
from node_services.sources.fields import flag, integer, ip, mapping, sequence, text
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
    intern_str,
    label,
    make_labels,
)

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


def translate(obj: Mapping[str, Any], source: str) -> list[Record]:
    """The records one Cattle resource becomes ([] for a removed one)."""
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


_Translator = Callable[[Mapping[str, Any], str, str], list[Record]]
_TRANSLATORS: Final[dict[str, _Translator]] = {
    "host": _host,
    "stack": _stack,
    "environment": _stack,
    "container": _container,
    **dict.fromkeys(SERVICE_TYPES, _service),
}
