"""Kubernetes objects in the rancher-metadata tree, as Rancher 1.x showed them.

Namespace -> stack, Service -> service (kind kubernetesService, vip = clusterIP), Pod ->
container, Node -> host. The pods have loopback IPs, so an aiohttp client bound to that
address (``local_addr``) is that pod.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from helpers import DEMO_SNAPSHOT
from metadata_helpers import MetadataDaemon

SNAPSHOT = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, uid: ns-shop-uid, labels: {team: web}}
status: {phase: Active}
---
apiVersion: v1
kind: Node
metadata:
  name: node-a
  uid: node-a-uid
  labels: {topology.kubernetes.io/zone: zone-a}
spec: {podCIDR: 10.42.1.0/24}
status:
  addresses:
  - {type: InternalIP, address: 192.168.10.11}
  - {type: Hostname, address: node-a.example}
  capacity: {cpu: "2", memory: 4Gi}
  conditions:
  - {type: Ready, status: "True"}
---
apiVersion: v1
kind: Service
metadata: {name: frontend, namespace: shop, uid: svc-frontend-uid, labels: {app: frontend}}
spec:
  type: ClusterIP
  clusterIP: 10.43.87.21
  clusterIPs: [10.43.87.21]
  selector: {app: frontend}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: frontend-x1
  namespace: shop
  labels: {kubernetes.io/service-name: frontend}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [127.0.0.12]
  conditions: {ready: true}
  nodeName: node-a
  targetRef: {kind: Pod, name: frontend-1, namespace: shop}
- addresses: [127.0.0.13]
  conditions: {ready: false}
  nodeName: node-a
  targetRef: {kind: Pod, name: frontend-2, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend-1, namespace: shop, uid: pod-1-uid, labels: {app: frontend}}
spec:
  nodeName: node-a
  containers:
  - name: web
    ports: [{containerPort: 8080, protocol: TCP}]
status:
  phase: Running
  podIP: 127.0.0.12
  podIPs: [{ip: 127.0.0.12}]
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Pod
metadata: {name: frontend-2, namespace: shop, uid: pod-2-uid, labels: {app: frontend}}
spec: {nodeName: node-a, containers: [{name: web}]}
status:
  phase: Running
  podIP: 127.0.0.13
  conditions: [{type: Ready, status: "False"}]
---
apiVersion: v1
kind: Pod
metadata: {name: Lonely, namespace: shop, uid: pod-3-uid}
spec: {nodeName: node-a, containers: [{name: job}]}
status: {phase: Pending, podIP: 127.0.0.14}
"""

FRONTEND_1 = {
    "create_index": 0,
    "dns": [],
    "dns_search": [],
    "environment_uuid": "",
    "external_id": "",
    "health_state": "healthy",
    "host_uuid": "node-a-uid",
    "ips": ["127.0.0.12"],
    "labels": {"app": "frontend"},
    "links": {},
    "metadata_kind": "container",
    "name": "frontend-1",
    "network_uuid": "",
    "ports": ["8080/tcp"],
    "primary_ip": "127.0.0.12",
    "service_index": "",
    "service_name": "frontend",
    "service_uuid": "svc-frontend-uid",
    "stack_name": "shop",
    "stack_uuid": "ns-shop-uid",
    "state": "running",
    "uuid": "pod-1-uid",
}
NODE_A = {
    "agent_ip": "192.168.10.11",
    "environment_uuid": "",
    "hostname": "node-a.example",
    "labels": {"topology.kubernetes.io/zone": "zone-a"},
    "memory": 4096,
    "metadata_kind": "host",
    "milli_cpu": 2000,
    "name": "node-a",
    "state": "ready",
    "uuid": "node-a-uid",
}


async def get(daemon: MetadataDaemon, path: str, source: str, accept: str = "") -> Any:
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    headers = {"Accept": accept} if accept else {}
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(daemon.url + path, headers=headers) as response,
    ):
        body = await response.read()
        return response.status, json.loads(body) if accept else body


async def test_pods_services_namespaces_and_nodes_in_the_tree(
    metadata_daemon: Callable[..., MetadataDaemon], tmp_path: Path
) -> None:
    snapshot = tmp_path / "kube.yaml"
    snapshot.write_text(SNAPSHOT)
    daemon = metadata_daemon("--snapshot", str(snapshot), "--node-name", "node-a")
    me = "127.0.0.12"
    json_type = "application/json"

    assert await get(daemon, "/latest/self/container", me, json_type) == (200, FRONTEND_1)
    assert await get(daemon, "/latest/self/host", me, json_type) == (200, NODE_A)
    status, service = await get(daemon, "/latest/self/service", me, json_type)
    assert status == 200
    assert {k: v for k, v in service.items() if k != "containers"} == {
        "environment_uuid": "",
        "external_ips": [],
        "fqdn": "",
        "health_state": "",
        "hostname": "",
        "kind": "kubernetesService",
        "labels": {"app": "frontend"},
        "links": {},
        "metadata": {},
        "metadata_kind": "service",
        "name": "frontend",
        "ports": ["80:8080/tcp"],
        "primary_service_name": "frontend",
        "scale": 0,
        "sidekicks": [],
        "stack_name": "shop",
        "stack_uuid": "ns-shop-uid",
        "state": "",
        "system": False,
        "token": None,
        "uuid": "svc-frontend-uid",
        "vip": "10.43.87.21",
    }
    # both endpoints' pods, the not-ready one too (it is still the service's container)
    assert [c["name"] for c in service["containers"]] == ["frontend-1", "frontend-2"]
    assert service["containers"][0] == FRONTEND_1
    assert await get(daemon, "/latest/self/stack/name", me) == (200, b"shop")
    assert await get(daemon, "/latest/self/container/health_state", "127.0.0.13") == (
        200,
        b"unhealthy",
    )
    # a pod no service selects: its container and stack, no service
    assert await get(daemon, "/latest/self", "127.0.0.14") == (200, b"container/\nhost/\nstack/\n")
    assert await get(daemon, "/latest/self/container/name", "127.0.0.14") == (200, b"lonely")
    assert await get(daemon, "/2015-12-19/self/container/name", "127.0.0.14") == (200, b"Lonely")
    # not a pod: this node only
    assert await get(daemon, "/latest/self", "127.0.0.1") == (200, b"host/\n")
    assert await get(daemon, "/latest/self/host", "127.0.0.1", json_type) == (200, NODE_A)
    assert await get(daemon, "/latest/stacks/shop/services", "127.0.0.1") == (200, b"0=frontend\n")
    assert await get(daemon, "/2015-07-25/stacks/shop/services", "127.0.0.1", json_type) == (
        200,
        ["frontend"],
    )
    assert await get(daemon, "/latest/containers", "127.0.0.1") == (
        200,
        b"0=lonely\n1=frontend-1\n2=frontend-2\n",
    )


async def test_kubernetes_and_cattle_records_share_one_tree(
    metadata_daemon: Callable[..., MetadataDaemon],
) -> None:
    daemon = metadata_daemon("--snapshot", str(DEMO_SNAPSHOT), "--node-name", "node-a")
    stranger = "127.0.0.1"
    assert await get(daemon, "/latest/services", stranger) == (
        200,
        b"0=kubernetes\n1=kube-dns\n2=cart\n3=frontend\n4=payments\n5=nginx\n",
    )
    assert await get(daemon, "/latest/stacks", stranger) == (
        200,
        b"0=default\n1=kube-system\n2=shop\n3=web\n",
    )
    kinds = await get(daemon, "/latest/services", stranger, "application/json")
    assert [(s["name"], s["kind"], s["vip"]) for s in kinds[1]] == [
        ("kubernetes", "kubernetesService", "10.43.0.1"),
        ("kube-dns", "kubernetesService", "10.43.0.10"),
        ("cart", "kubernetesService", ""),
        ("frontend", "kubernetesService", "10.43.87.21"),
        ("payments", "kubernetesService", ""),
        ("nginx", "service", None),  # Cattle: null without a VIP
    ]
    assert await get(daemon, "/latest/services/payments/hostname", stranger) == (
        200,
        b"payments.example.com",
    )
    assert await get(daemon, "/latest/services/cart/containers", stranger) == (
        200,
        b"0=cart-0\n1=cart-1\n",
    )
