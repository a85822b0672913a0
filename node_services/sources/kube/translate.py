"""Kubernetes API objects -> state records, at the boundary.

Input is one object as the API (or ``kubectl get -o yaml``) returns it: Namespace, Node,
Service, EndpointSlice (discovery.k8s.io/v1) or Pod. Output is the records it becomes. A
malformed object raises :class:`TranslateError` naming it; another kind raises
:class:`UnsupportedObject`. Used by the snapshot source and the list/watch source alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from node_services.sources.errors import TranslateError, UnsupportedObject
from node_services.sources.fields import (
    cidr,
    detach,
    detached_labels,
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
    Port,
    Record,
    Service,
    Stack,
    Workload,
    intern_str,
    label,
)

PREFIX: Final = "k8s:"
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
VTEP_MAC_ANNOTATION: Final = "node-services.io/vtep-mac"
WIREGUARD_KEY_ANNOTATION: Final = "node-services.io/wireguard-public-key"
PUBLIC_IP_ANNOTATION: Final = "node-services.io/public-ip"


def key(kind: str, namespace: str, name: str) -> str:
    """Record key of a Kubernetes object (``namespace`` "" when cluster-scoped)."""
    return f"{PREFIX}{kind}/{namespace}/{name}" if namespace else f"{PREFIX}{kind}/{name}"


def object_ref(obj: Mapping[str, Any]) -> str:
    """``Kind namespace/name`` for messages, as far as the object allows."""
    kind = obj.get("kind") if isinstance(obj.get("kind"), str) else "object"
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return str(kind)
    name = meta.get("name") if isinstance(meta.get("name"), str) else "?"
    namespace = meta.get("namespace")
    return f"{kind} {namespace}/{name}" if isinstance(namespace, str) else f"{kind} {name}"


def translate(obj: Mapping[str, Any], source: str) -> list[Record]:
    """The records one Kubernetes object becomes."""
    kind = obj.get("kind")
    translator = _TRANSLATORS.get(kind) if isinstance(kind, str) else None
    if translator is None:
        raise UnsupportedObject(object_ref(obj), f"kind {kind!r} is not used by node-services")
    api_version = obj.get("apiVersion")
    wanted = _API_VERSIONS[kind]  # type: ignore[index]
    if api_version is not None and api_version != wanted:
        raise UnsupportedObject(object_ref(obj), f"apiVersion {api_version!r}; expected {wanted}")
    return translator(obj, source)


def _meta(obj: Mapping[str, Any], *, namespaced: bool) -> tuple[str, str, str, Mapping[str, Any]]:
    ref = object_ref(obj)
    meta = mapping(ref, "metadata", obj.get("metadata"))
    name = text(ref, "metadata.name", meta.get("name"), required=True)
    namespace = ""
    if namespaced:
        namespace = text(ref, "metadata.namespace", meta.get("namespace"), intern=True)
        namespace = namespace or "default"
    return ref, namespace, name, meta


_PORTS_CACHE: dict[tuple[Any, ...], tuple[Port, ...]] = {}
_PORTS_CACHE_SIZE: Final = 4096


def _ports(ref: str, path: str, raw: Any, *, port_key: str = "port") -> tuple[Port, ...]:
    """Ports of a Service, EndpointSlice or container. Most objects repeat a handful of port
    lists, so valid results are cached by content: a watch event skips re-validating them, and
    records share one tuple."""
    cache_key: tuple[Any, ...] | None = None
    # Only lists of flat str/int mappings are cached: equal keys then mean equal types too
    # (True == 1 and 1.0 == 1 would otherwise share an entry and skip a type check).
    if type(raw) is list and all(
        type(item) is dict and all(type(v) is str or type(v) is int for v in item.values())
        for item in raw
    ):
        cache_key = (port_key, *(tuple(item.items()) for item in raw))
        cached = _PORTS_CACHE.get(cache_key)
        if cached is not None:
            return cached
    ports = _checked_ports(ref, path, raw, port_key)
    if cache_key is not None:
        if len(_PORTS_CACHE) >= _PORTS_CACHE_SIZE:
            _PORTS_CACHE.clear()
        # The key outlives the parsed document: keep copies, not the parser's strings and ints,
        # or the cache pins the parser's memory (see fields.detach).
        stored_key = (
            port_key,
            *(
                tuple((detach(k), detach(v) if type(v) is str else v + 0) for k, v in item.items())
                for item in raw
            ),
        )
        _PORTS_CACHE[stored_key] = ports
    return ports


def _checked_ports(ref: str, path: str, raw: Any, port_key: str) -> tuple[Port, ...]:
    ports = []
    for i, item in enumerate(sequence(ref, path, raw)):
        where = f"{path}[{i}]"
        entry = mapping(ref, where, item)
        number = integer(ref, f"{where}.{port_key}", entry.get(port_key))
        if not 0 <= number <= 65535:
            raise TranslateError(ref, f"{where}.{port_key}: {number} is out of range")
        protocol = text(ref, f"{where}.protocol", entry.get("protocol"), intern=True) or "TCP"
        if protocol not in ("TCP", "UDP", "SCTP"):
            raise TranslateError(ref, f"{where}.protocol: {protocol!r} is not TCP, UDP or SCTP")
        ports.append(
            Port(
                name=text(ref, f"{where}.name", entry.get("name"), intern=True),
                port=number,
                protocol=protocol,
                target_port=text(ref, f"{where}.targetPort", entry.get("targetPort")),
                node_port=integer(ref, f"{where}.nodePort", entry.get("nodePort")),
                app_protocol=text(ref, f"{where}.appProtocol", entry.get("appProtocol")),
            )
        )
    return _shared_ports(tuple(ports))


_SHARED_PORTS: Final[dict[tuple[Port, ...], tuple[Port, ...]]] = {}
_SHARED_PORTS_MAX: Final = 4096


def _shared_ports(ports: tuple[Port, ...]) -> tuple[Port, ...]:
    """One object for equal port lists: services and slices mostly repeat a few.

    The table is bounded: when full it starts over (sharing is only a saving, never needed).
    """
    if not ports:
        return ports
    shared = _SHARED_PORTS.get(ports)
    if shared is None:
        if len(_SHARED_PORTS) >= _SHARED_PORTS_MAX:
            _SHARED_PORTS.clear()
        shared = _SHARED_PORTS[ports] = ports
    return shared


def _namespace(obj: Mapping[str, Any], source: str) -> list[Record]:
    ref, _, name, meta = _meta(obj, namespaced=False)
    status = mapping(ref, "status", obj.get("status"))
    return [
        Stack(
            key=key("Namespace", "", name),
            source=source,
            name=intern_str(name),
            uuid=text(ref, "metadata.uid", meta.get("uid")),
            labels=detached_labels(meta.get("labels")),
            state=text(ref, "status.phase", status.get("phase")).lower(),
            system=name.startswith("kube-"),
        )
    ]


def _quantity(ref: str, path: str, value: Any, *, milli: bool = False) -> int:
    """A resource quantity ("2", "500m", "2048Ki", "4Gi") as an integer (milli-units if asked)."""
    if value is None:
        return 0
    raw = text(ref, path, value)
    suffixes = {
        "Ki": 1024,
        "Mi": 1024**2,
        "Gi": 1024**3,
        "Ti": 1024**4,
        "k": 1000,
        "M": 1000**2,
        "G": 1000**3,
        "T": 1000**4,
    }
    try:
        if raw.endswith("m"):
            units = float(raw[:-1]) / 1000
        else:
            for suffix, factor in suffixes.items():
                if raw.endswith(suffix):
                    units = float(raw[: -len(suffix)]) * factor
                    break
            else:
                units = float(raw)
    except ValueError:
        raise TranslateError(ref, f"{path}: {raw!r} is not a quantity") from None
    if not 0 <= units <= _QUANTITY_MAX:  # also false for "nan"; refuses "inf", "-1", "1e400"
        raise TranslateError(ref, f"{path}: {raw!r} is not a quantity between 0 and 2^63")
    return int(units * 1000) if milli else int(units)


_QUANTITY_MAX: Final = float(1 << 63) / 1000  # in milli-units it still fits an int64


def _node(obj: Mapping[str, Any], source: str) -> list[Record]:
    ref, _, name, meta = _meta(obj, namespaced=False)
    spec = mapping(ref, "spec", obj.get("spec"))
    status = mapping(ref, "status", obj.get("status"))
    internal: list[str] = []
    external: list[str] = []
    hostname = ""
    for i, item in enumerate(sequence(ref, "status.addresses", status.get("addresses"))):
        entry = mapping(ref, f"status.addresses[{i}]", item)
        kind = entry.get("type")
        where = f"status.addresses[{i}].address"
        if kind == "InternalIP":
            internal.append(ip(ref, where, entry.get("address")))
        elif kind == "ExternalIP":
            external.append(ip(ref, where, entry.get("address")))
        elif kind == "Hostname":
            hostname = text(ref, where, entry.get("address"))
    cidrs = sequence(ref, "spec.podCIDRs", spec.get("podCIDRs"))
    if not cidrs and spec.get("podCIDR"):
        cidrs = [spec.get("podCIDR")]
    annotations = detached_labels(meta.get("annotations"))
    public_ip = label(annotations, PUBLIC_IP_ANNOTATION)
    if public_ip:
        public_ip = ip(ref, f"metadata.annotations[{PUBLIC_IP_ANNOTATION}]", public_ip)
    state = ""
    for item in sequence(ref, "status.conditions", status.get("conditions")):
        if isinstance(item, Mapping) and item.get("type") == "Ready":
            state = "ready" if item.get("status") == "True" else "notready"
    capacity = mapping(ref, "status.capacity", status.get("capacity"))
    return [
        Host(
            key=key("Node", "", name),
            source=source,
            name=intern_str(name),
            uuid=text(ref, "metadata.uid", meta.get("uid")),
            hostname=hostname or name,
            addresses=tuple(internal),
            external_addresses=tuple(external),
            pod_cidrs=tuple(
                cidr(ref, f"spec.podCIDRs[{i}]", value) for i, value in enumerate(cidrs)
            ),
            vtep_mac=label(annotations, VTEP_MAC_ANNOTATION).lower(),
            public_ip=public_ip or (internal[0] if internal else ""),
            labels=detached_labels(meta.get("labels")),
            state=state,
            memory=_quantity(ref, "status.capacity.memory", capacity.get("memory")),
            milli_cpu=_quantity(ref, "status.capacity.cpu", capacity.get("cpu"), milli=True),
            wireguard_public_key=label(annotations, WIREGUARD_KEY_ANNOTATION),
        )
    ]


def _service(obj: Mapping[str, Any], source: str) -> list[Record]:
    ref, namespace, name, meta = _meta(obj, namespaced=True)
    spec = mapping(ref, "spec", obj.get("spec"))
    service_type = text(ref, "spec.type", spec.get("type"), intern=True) or "ClusterIP"
    if service_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise TranslateError(ref, f"spec.type: unknown type {service_type!r}")
    raw_ips = sequence(ref, "spec.clusterIPs", spec.get("clusterIPs"))
    ips_field = "spec.clusterIPs[{}]"
    if not raw_ips and spec.get("clusterIP"):
        raw_ips = [spec.get("clusterIP")]
        ips_field = "spec.clusterIP"  # name the field the file has (older objects)
    headless = service_type != "ExternalName" and raw_ips[:1] == ["None"]
    cluster_ips: tuple[str, ...] = ()
    if service_type != "ExternalName" and not headless:
        cluster_ips = tuple(ip(ref, ips_field.format(i), value) for i, value in enumerate(raw_ips))
    external_name = ""
    if service_type == "ExternalName":
        external_name = text(ref, "spec.externalName", spec.get("externalName"), required=True)
        external_name = external_name.rstrip(".").lower()
    return [
        Service(
            key=key("Service", namespace, name),
            source=source,
            namespace=namespace,
            name=intern_str(name),
            stack_key=intern_str(key("Namespace", "", namespace)),
            uuid=text(ref, "metadata.uid", meta.get("uid")),
            type=service_type,
            kind="kubernetesService",
            cluster_ips=cluster_ips,
            headless=headless,
            external_name=external_name,
            external_ips=tuple(
                ip(ref, f"spec.externalIPs[{i}]", value)
                for i, value in enumerate(
                    sequence(ref, "spec.externalIPs", spec.get("externalIPs"))
                )
            ),
            ports=_ports(ref, "spec.ports", spec.get("ports")),
            publish_not_ready=flag(
                ref, "spec.publishNotReadyAddresses", spec.get("publishNotReadyAddresses")
            ),
            selector=detached_labels(spec.get("selector")),
            labels=detached_labels(meta.get("labels")),
        )
    ]


def _endpoint_slice(obj: Mapping[str, Any], source: str) -> list[Record]:
    ref, namespace, name, meta = _meta(obj, namespaced=True)
    labels = detached_labels(meta.get("labels"))
    service = label(labels, SERVICE_NAME_LABEL)
    if not service:
        # A slice not owned by a Service (custom controllers) names nothing DNS can serve.
        raise UnsupportedObject(ref, f"no {SERVICE_NAME_LABEL} label")
    address_type = text(ref, "addressType", obj.get("addressType"), required=True, intern=True)
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise TranslateError(ref, f"addressType: unknown type {address_type!r}")
    endpoints = []
    for i, item in enumerate(sequence(ref, "endpoints", obj.get("endpoints"))):
        try:
            endpoints.append(_endpoint(ref, item, address_type, namespace))
        except TranslateError as exc:  # the paths below are relative: name the endpoint
            raise TranslateError(ref, f"endpoints[{i}]{exc.reason}") from None
    return [
        Endpoints(
            key=key("EndpointSlice", namespace, name),
            source=source,
            namespace=namespace,
            service=intern_str(service),
            service_key=intern_str(key("Service", namespace, service)),
            address_type=address_type,
            ports=_ports(ref, "ports", obj.get("ports")),
            endpoints=tuple(endpoints),
        )
    ]


def _endpoint(ref: str, item: Any, address_type: str, namespace: str) -> Endpoint:
    """One EndpointSlice endpoint. Field paths are relative to it (``.conditions.ready``), so
    no path text is built unless a field is bad; the caller prefixes ``endpoints[i]``."""
    entry = mapping(ref, "", item)
    raw_addresses = sequence(ref, ".addresses", entry.get("addresses"))
    if not raw_addresses:
        raise TranslateError(ref, ".addresses: at least one address is required")
    read = text if address_type == "FQDN" else ip
    try:
        addresses = tuple(read(ref, ".addresses[]", a) for a in raw_addresses)
    except TranslateError:  # again, naming the bad one
        addresses = tuple(read(ref, f".addresses[{j}]", a) for j, a in enumerate(raw_addresses))
    conditions = mapping(ref, ".conditions", entry.get("conditions"))
    # Per the EndpointSlice API, an unset "ready" means ready; "serving" defaults to ready.
    ready = flag(ref, ".conditions.ready", conditions.get("ready"), default=True)
    target = mapping(ref, ".targetRef", entry.get("targetRef"))
    target_key = ""
    if target.get("kind") == "Pod" and target.get("name"):
        target_namespace = text(ref, ".targetRef.namespace", target.get("namespace"))
        target_key = key(
            "Pod",
            target_namespace or namespace,
            text(ref, ".targetRef.name", target.get("name")),
        )
    return Endpoint(
        addresses=addresses,
        ready=ready,
        serving=flag(ref, ".conditions.serving", conditions.get("serving"), default=ready),
        terminating=flag(ref, ".conditions.terminating", conditions.get("terminating")),
        hostname=text(ref, ".hostname", entry.get("hostname")),
        node_name=text(ref, ".nodeName", entry.get("nodeName"), intern=True),
        target_key=target_key,
        zone=text(ref, ".zone", entry.get("zone"), intern=True),
    )


def _pod(obj: Mapping[str, Any], source: str) -> list[Record]:
    ref, namespace, name, meta = _meta(obj, namespaced=True)
    spec = mapping(ref, "spec", obj.get("spec"))
    status = mapping(ref, "status", obj.get("status"))
    ips = [
        ip(ref, f"status.podIPs[{i}].ip", mapping(ref, f"status.podIPs[{i}]", item).get("ip"))
        for i, item in enumerate(sequence(ref, "status.podIPs", status.get("podIPs")))
    ]
    if not ips and status.get("podIP"):
        ips = [ip(ref, "status.podIP", status.get("podIP"))]
    node_name = text(ref, "spec.nodeName", spec.get("nodeName"), intern=True)
    ready = False
    for item in sequence(ref, "status.conditions", status.get("conditions")):
        if isinstance(item, Mapping) and item.get("type") == "Ready":
            ready = item.get("status") == "True"
    ports: list[Port] = []
    for i, container in enumerate(sequence(ref, "spec.containers", spec.get("containers"))):
        where = f"spec.containers[{i}].ports"
        raw = mapping(ref, f"spec.containers[{i}]", container).get("ports")
        ports.extend(_ports(ref, where, raw, port_key="containerPort"))
    return [
        Workload(
            key=key("Pod", namespace, name),
            source=source,
            namespace=namespace,
            name=name,
            stack_key=intern_str(key("Namespace", "", namespace)),
            uuid=text(ref, "metadata.uid", meta.get("uid")),
            ips=tuple(ips),
            host_key=intern_str(key("Node", "", node_name)) if node_name else "",
            node_name=node_name,
            hostname=text(ref, "spec.hostname", spec.get("hostname")),
            subdomain=text(ref, "spec.subdomain", spec.get("subdomain"), intern=True),
            host_network=flag(ref, "spec.hostNetwork", spec.get("hostNetwork")),
            labels=detached_labels(meta.get("labels")),
            state=text(ref, "status.phase", status.get("phase"), intern=True).lower(),
            ready=ready,
            ports=tuple(ports),
        )
    ]


_TRANSLATORS: Final[dict[str, Callable[[Mapping[str, Any], str], list[Record]]]] = {
    "Namespace": _namespace,
    "Node": _node,
    "Service": _service,
    "EndpointSlice": _endpoint_slice,
    "Pod": _pod,
}

_API_VERSIONS: Final = {
    "Namespace": "v1",
    "Node": "v1",
    "Service": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
    "Pod": "v1",
}

KINDS: Final = tuple(_TRANSLATORS)
