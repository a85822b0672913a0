"""A deterministic, cluster-sized snapshot as ``kubectl get -o yaml`` / ``-o json`` print it.

:func:`generate` builds Namespaces, Nodes, Pods, Services and one EndpointSlice per Service
(with ``endpoints_per_slice`` endpoints each) as plain dicts shaped like real API objects
(fields kubectl prints, keys sorted as kubectl sorts them), and writes them as
multi-document YAML (``---`` between objects) and as a ``kind: List`` JSON document.

Addressing: node ``n`` owns pod CIDR ``10.(100+n).0.0/16``; endpoint ``e`` runs on node
``e % nodes`` at ``10.(100+n).(k // 256).(k % 256)`` with ``k = e // nodes``; services get
ClusterIPs in ``10.43.0.0/16``. The first ``pods`` endpoints are backed by the generated Pods
(same name, IP and node); the rest name Pods that are not in the file, as a slice of a larger
cluster would.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 20240514
_EPOCH = "2024-05-14T09:"  # timestamps are _EPOCH + "MM:SSZ"


@dataclass(frozen=True, slots=True)
class Sizes:
    namespaces: int = 100
    nodes: int = 10
    services: int = 10_000
    endpoints_per_slice: int = 10
    pods: int = 1_000

    @property
    def endpoints(self) -> int:
        return self.services * self.endpoints_per_slice

    def expected_records(self) -> dict[str, int]:
        """Records the store should hold after loading the file, by kind."""
        return {
            "host": self.nodes,
            "stack": self.namespaces,
            "service": self.services,
            "endpoints": self.services,
            "workload": self.pods,
        }

    def describe(self) -> str:
        return (
            f"{self.services:,} Services + {self.services:,} EndpointSlices "
            f"({self.endpoints:,} endpoints) + {self.pods:,} Pods + "
            f"{self.namespaces:,} Namespaces + {self.nodes:,} Nodes"
        )


FULL = Sizes()
QUICK = Sizes(namespaces=10, nodes=3, services=1_000, endpoints_per_slice=10, pods=100)


class _Gen:
    """Deterministic ids and counters."""

    def __init__(self) -> None:
        self.rng = random.Random(SEED)
        self.resource_version = 40_000

    def uid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def rv(self) -> str:
        self.resource_version += 1
        return str(self.resource_version)

    def suffix(self, n: int = 5) -> str:
        return "".join(self.rng.choices("bcdfghjklmnpqrstvwxz2456789", k=n))

    def stamp(self) -> str:
        return f"{_EPOCH}{self.rng.randrange(60):02d}:{self.rng.randrange(60):02d}Z"


def namespace_name(i: int) -> str:
    return {0: "default", 1: "kube-system"}.get(i, f"team-{i:03d}")


def node_name(n: int) -> str:
    return f"node-{n:02d}"


def service_name(s: int) -> str:
    return f"svc-{s:05d}"


def endpoint_ip(e: int, sizes: Sizes) -> str:
    n, k = e % sizes.nodes, e // sizes.nodes
    if k >= 65_536 or sizes.nodes > 150:
        raise ValueError("too many endpoints per node for the generator's addressing")
    return f"10.{100 + n}.{k // 256}.{k % 256}"


def _conditions(e: int) -> dict[str, bool]:
    """Mostly ready; 1 in 20 terminating (still serving), 1 in 20 not ready."""
    r = e % 20
    if r == 0:
        return {"ready": False, "serving": False, "terminating": False}
    if r == 1:
        return {"ready": False, "serving": True, "terminating": True}
    return {"ready": True, "serving": True, "terminating": False}


def _namespace(g: _Gen, i: int) -> dict[str, Any]:
    name = namespace_name(i)
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "creationTimestamp": g.stamp(),
            "labels": {"kubernetes.io/metadata.name": name},
            "name": name,
            "resourceVersion": g.rv(),
            "uid": g.uid(),
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def _node(g: _Gen, n: int) -> dict[str, Any]:
    name = node_name(n)
    zone = f"zone-{n % 3}"
    internal_ip = f"192.168.10.{11 + n}"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "annotations": {
                "node-services.io/public-ip": internal_ip,
                "node-services.io/vtep-mac": f"0a:58:0a:{100 + n:02x}:00:01",
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
            "creationTimestamp": g.stamp(),
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "topology.kubernetes.io/zone": zone,
            },
            "name": name,
            "resourceVersion": g.rv(),
            "uid": g.uid(),
        },
        "spec": {
            "podCIDR": f"10.{100 + n}.0.0/16",
            "podCIDRs": [f"10.{100 + n}.0.0/16"],
            "providerID": f"k3s://{name}",
        },
        "status": {
            "addresses": [
                {"address": internal_ip, "type": "InternalIP"},
                {"address": name, "type": "Hostname"},
            ],
            "allocatable": {"cpu": "4", "memory": "8131480Ki", "pods": "110"},
            "capacity": {"cpu": "4", "memory": "8131480Ki", "pods": "110"},
            "conditions": [
                {
                    "lastHeartbeatTime": g.stamp(),
                    "lastTransitionTime": g.stamp(),
                    "message": "kubelet has sufficient memory available",
                    "reason": "KubeletHasSufficientMemory",
                    "status": "False",
                    "type": "MemoryPressure",
                },
                {
                    "lastHeartbeatTime": g.stamp(),
                    "lastTransitionTime": g.stamp(),
                    "message": "kubelet is posting ready status",
                    "reason": "KubeletReady",
                    "status": "True",
                    "type": "Ready",
                },
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": g.uid(),
                "containerRuntimeVersion": "containerd://1.7.15-k3s1",
                "kernelVersion": "6.1.0-21-amd64",
                "kubeProxyVersion": "v1.29.4+k3s1",
                "kubeletVersion": "v1.29.4+k3s1",
                "operatingSystem": "linux",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
            },
        },
    }


def _service_ports(s: int) -> list[dict[str, Any]]:
    ports: list[dict[str, Any]] = [
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}
    ]
    if s % 3 == 0:
        ports.append({"name": "metrics", "port": 9090, "protocol": "TCP", "targetPort": 9090})
    return ports


def _headless(s: int) -> bool:
    return s % 10 == 5


def _service(g: _Gen, s: int, sizes: Sizes) -> dict[str, Any]:
    name = service_name(s)
    headless = _headless(s)
    node_port = s % 20 == 7
    cluster_ip = "None" if headless else f"10.43.{(s + 1) // 256}.{(s + 1) % 256}"
    ports = _service_ports(s)
    if node_port:
        for i, port in enumerate(ports):
            port["nodePort"] = 30000 + (s * 2 + i) % 2768
    spec: dict[str, Any] = {
        "clusterIP": cluster_ip,
        "clusterIPs": [cluster_ip],
        "internalTrafficPolicy": "Cluster",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "ports": ports,
        "selector": {"app": name},
        "sessionAffinity": "None",
        "type": "NodePort" if node_port else "ClusterIP",
    }
    if node_port:
        spec["externalTrafficPolicy"] = "Cluster"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "creationTimestamp": g.stamp(),
            "labels": {"app": name, "tier": ("web", "api", "db", "cache")[s % 4]},
            "name": name,
            "namespace": namespace_name(s % sizes.namespaces),
            "resourceVersion": g.rv(),
            "uid": g.uid(),
        },
        "spec": spec,
        "status": {"loadBalancer": {}},
    }


def _pod_name(s: int, j: int, template: str) -> str:
    return f"{service_name(s)}-{j}" if _headless(s) else f"{service_name(s)}-{template}-{j:03d}"


def _endpoint_slice(
    g: _Gen, s: int, sizes: Sizes, service_uid: str, template: str
) -> dict[str, Any]:
    name = service_name(s)
    namespace = namespace_name(s % sizes.namespaces)
    labels = {
        "app": name,
        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
        "kubernetes.io/service-name": name,
    }
    if _headless(s):
        labels["service.kubernetes.io/headless"] = ""
    endpoints = []
    for j in range(sizes.endpoints_per_slice):
        e = s * sizes.endpoints_per_slice + j
        n = e % sizes.nodes
        endpoint: dict[str, Any] = {
            "addresses": [endpoint_ip(e, sizes)],
            "conditions": _conditions(e),
        }
        if _headless(s):
            endpoint["hostname"] = _pod_name(s, j, template)
        endpoint["nodeName"] = node_name(n)
        endpoint["targetRef"] = {
            "kind": "Pod",
            "name": _pod_name(s, j, template),
            "namespace": namespace,
            "uid": g.uid(),
        }
        endpoint["zone"] = f"zone-{n % 3}"
        endpoints.append(endpoint)
    ports = [
        {"name": p["name"], "port": p["targetPort"], "protocol": p["protocol"]}
        for p in _service_ports(s)
    ]
    return {
        "addressType": "IPv4",
        "apiVersion": "discovery.k8s.io/v1",
        "endpoints": endpoints,
        "kind": "EndpointSlice",
        "metadata": {
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": g.stamp()},
            "creationTimestamp": g.stamp(),
            "generateName": f"{name}-",
            "generation": 1 + s % 7,
            "labels": labels,
            "name": f"{name}-{g.suffix()}",
            "namespace": namespace,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "blockOwnerDeletion": True,
                    "controller": True,
                    "kind": "Service",
                    "name": name,
                    "uid": service_uid,
                }
            ],
            "resourceVersion": g.rv(),
            "uid": g.uid(),
        },
        "ports": ports,
    }


def _pod(g: _Gen, e: int, sizes: Sizes, template: str, uid: str) -> dict[str, Any]:
    s, j = divmod(e, sizes.endpoints_per_slice)
    svc = service_name(s)
    name = _pod_name(s, j, template)
    node = node_name(e % sizes.nodes)
    pod_ip = endpoint_ip(e, sizes)
    started = g.stamp()
    token_volume = f"kube-api-access-{g.suffix()}"
    spec: dict[str, Any] = {
        "containers": [
            {
                "image": "nginx:1.25",
                "imagePullPolicy": "IfNotPresent",
                "name": "app",
                "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "volumeMounts": [
                    {
                        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                        "name": token_volume,
                        "readOnly": True,
                    }
                ],
            }
        ],
        "dnsPolicy": "ClusterFirst",
        "enableServiceLinks": True,
        "nodeName": node,
        "preemptionPolicy": "PreemptLowerPriority",
        "priority": 0,
        "restartPolicy": "Always",
        "schedulerName": "default-scheduler",
        "securityContext": {},
        "serviceAccount": "default",
        "serviceAccountName": "default",
        "terminationGracePeriodSeconds": 30,
        "tolerations": [
            {
                "effect": "NoExecute",
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "tolerationSeconds": 300,
            }
        ],
        "volumes": [
            {
                "name": token_volume,
                "projected": {
                    "defaultMode": 420,
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                "name": "kube-root-ca.crt",
                            }
                        },
                    ],
                },
            }
        ],
    }
    if _headless(s):
        spec["hostname"] = name
        spec["subdomain"] = svc
    ready = "True" if _conditions(e)["ready"] else "False"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "creationTimestamp": started,
            "generateName": f"{svc}-{template}-",
            "labels": {"app": svc, "pod-template-hash": template},
            "name": name,
            "namespace": namespace_name(s % sizes.namespaces),
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "blockOwnerDeletion": True,
                    "controller": True,
                    "kind": "ReplicaSet",
                    "name": f"{svc}-{template}",
                    "uid": g.uid(),
                }
            ],
            "resourceVersion": g.rv(),
            "uid": uid,
        },
        "spec": spec,
        "status": {
            "conditions": [
                {
                    "lastProbeTime": None,
                    "lastTransitionTime": started,
                    "status": "True",
                    "type": "Initialized",
                },
                {
                    "lastProbeTime": None,
                    "lastTransitionTime": g.stamp(),
                    "status": ready,
                    "type": "Ready",
                },
                {
                    "lastProbeTime": None,
                    "lastTransitionTime": started,
                    "status": "True",
                    "type": "PodScheduled",
                },
            ],
            "containerStatuses": [
                {
                    "containerID": f"containerd://{uuid.UUID(int=g.rng.getrandbits(128)).hex}",
                    "image": "docker.io/library/nginx:1.25",
                    "imageID": "docker.io/library/nginx@sha256:3afec5b9331a551d5d7c8bffbc23b852"
                    "d14e393597d10aab4fe28c26930a2e39",
                    "lastState": {},
                    "name": "app",
                    "ready": ready == "True",
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": started}},
                }
            ],
            "hostIP": f"192.168.10.{11 + e % sizes.nodes}",
            "hostIPs": [{"ip": f"192.168.10.{11 + e % sizes.nodes}"}],
            "phase": "Running",
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
            "qosClass": "BestEffort",
            "startTime": started,
        },
    }


def objects(sizes: Sizes) -> Iterator[dict[str, Any]]:
    """Every object of the snapshot, in the order ``kubectl get ns,nodes,pods,svc,...`` lists."""
    if sizes.pods > sizes.endpoints:
        raise ValueError("every generated Pod backs an endpoint: pods <= endpoints")
    g = _Gen()
    templates = [g.suffix(10)[:10] for _ in range(sizes.services)]
    pod_uids = [g.uid() for _ in range(sizes.pods)]
    for i in range(sizes.namespaces):
        yield _namespace(g, i)
    for n in range(sizes.nodes):
        yield _node(g, n)
    for e in range(sizes.pods):
        yield _pod(g, e, sizes, templates[e // sizes.endpoints_per_slice], pod_uids[e])
    service_uids = []
    for s in range(sizes.services):
        service = _service(g, s, sizes)
        service_uids.append(service["metadata"]["uid"])
        yield service
    for s in range(sizes.services):
        slice_ = _endpoint_slice(g, s, sizes, service_uids[s], templates[s])
        for j, endpoint in enumerate(slice_["endpoints"]):
            e = s * sizes.endpoints_per_slice + j
            if e < sizes.pods:  # the Pod behind it is in the file: same uid
                endpoint["targetRef"]["uid"] = pod_uids[e]
        yield slice_


# -- kubectl-style YAML ----------------------------------------------------------------------

# Plain scalars YAML 1.1 (PyYAML) or YAML 1.2 would read as something other than a string.
_SPECIAL = re.compile(
    r"""^(?:
        ~|null|Null|NULL
      | y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF
      | [-+]?[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
      | [-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
      | [-+]?0[xob][0-9a-fA-F_]+
      | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?
      | [-+]?\.(?:inf|Inf|INF) | \.(?:nan|NaN|NAN)
      | [0-9]{4}-[0-9]{1,2}-[0-9]{1,2}.*
    )$""",
    re.VERBOSE,
)
_quoted: dict[str, str] = {}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        return str(value)
    text = _quoted.get(value)
    if text is None:
        plain = (
            value != ""
            and not _SPECIAL.match(value)
            and value[0] not in "-?:,[]{}#&*!|>'\"%@` "
            and value[-1] != " "
            and ": " not in value
            and " #" not in value
            and value.isprintable()
        )
        text = value if plain else json.dumps(value)
        if len(_quoted) < 100_000:
            _quoted[value] = text
    return text


def _yaml_lines(obj: dict[str, Any], indent: str, out: list[str]) -> None:
    """A mapping in go-yaml v2 block style, as kubectl prints it: sorted keys, lists unindented."""
    for key in sorted(obj):
        value = obj[key]
        if isinstance(value, dict):
            if value:
                out.append(f"{indent}{key}:")
                _yaml_lines(value, indent + "  ", out)
            else:
                out.append(f"{indent}{key}: {{}}")
        elif isinstance(value, list):
            if not value:
                out.append(f"{indent}{key}: []")
                continue
            out.append(f"{indent}{key}:")
            for item in value:
                if isinstance(item, dict) and item:
                    lines: list[str] = []
                    _yaml_lines(item, indent + "  ", lines)
                    lines[0] = f"{indent}- {lines[0][len(indent) + 2 :]}"
                    out.extend(lines)
                else:
                    out.append(f"{indent}- {'{}' if isinstance(item, dict) else _scalar(item)}")
        else:
            out.append(f"{indent}{key}: {_scalar(value)}")


def to_yaml(obj: dict[str, Any]) -> str:
    out: list[str] = []
    _yaml_lines(obj, "", out)
    return "\n".join(out) + "\n"


def write_yaml(path: Path, sizes: Sizes) -> int:
    """The snapshot as multi-document YAML; returns the number of objects written."""
    count = 0
    with path.open("w", encoding="utf-8") as stream:
        for obj in objects(sizes):
            if count:
                stream.write("---\n")
            stream.write(to_yaml(obj))
            count += 1
    return count


def write_json(path: Path, sizes: Sizes) -> int:
    """The snapshot as ``kubectl get -o json`` prints several kinds: one ``kind: List``."""
    items = list(objects(sizes))
    document = {
        "apiVersion": "v1",
        "items": items,
        "kind": "List",
        "metadata": {"resourceVersion": ""},
    }
    with path.open("w", encoding="utf-8") as stream:
        json.dump(document, stream, indent=4, sort_keys=True)
        stream.write("\n")
    return len(items)
