"""With the Kubernetes source, the overlay writes this node's VTEP MAC and underlay address as
its annotations (the existing node patch), against the test API server; a kernel fake."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from pathlib import Path

import yaml
from fakes.kube_apiserver import FakeKubeAPIServer
from fakes.kube_helpers import wait_until
from helpers import FIXTURES
from overlay.fake_kernel import FakeKernel
from prometheus_client import CollectorRegistry

from node_services.app import node_annotator
from node_services.overlay.model import vtep_mac_for
from node_services.overlay.reconcile import OverlayConfig, OverlayReconciler
from node_services.sources.kube.client import load_connection
from node_services.sources.kube.source import KubeSource
from node_services.state.store import Store


async def test_kubernetes_node_gets_its_vtep_mac_and_public_ip_annotations(
    tmp_path: Path,
) -> None:
    node = yaml.safe_load((FIXTURES / "kube" / "node.yaml").read_text())
    node["metadata"]["annotations"] = {"node.alpha.kubernetes.io/ttl": "0"}
    server = await FakeKubeAPIServer().start()
    server.put(copy.deepcopy(node))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(server.kubeconfig())
    store = Store()
    source = KubeSource(
        store,
        kubeconfig=kubeconfig,
        connection=await load_connection(kubeconfig),
        node_name="node-a",
        backoff=(0.02, 0.2),
    )
    task = asyncio.create_task(source.run())
    try:
        await wait_until(lambda: store.snapshot.all_synced and store.snapshot.hosts, what="sync")
        kernel = FakeKernel(networks=("192.168.10.0/24",))
        overlay = OverlayReconciler(
            store, OverlayConfig("vxlan", "node-a"), CollectorRegistry(), kernel
        )
        overlay.announce = node_annotator(source)
        assert await overlay.reconcile_once() is True
        stored = server.objects["nodes"][("", "node-a")]["metadata"]["annotations"]
        assert stored == {
            "node.alpha.kubernetes.io/ttl": "0",
            "node-services.io/vtep-mac": vtep_mac_for("node-a"),
            "node-services.io/public-ip": "192.168.10.11",
        }
        assert kernel.devices[-1].mac == vtep_mac_for("node-a")
        host = await wait_until(
            lambda: next(
                (h for h in store.snapshot.hosts.values() if h.vtep_mac == vtep_mac_for("node-a")),
                None,
            ),
            what="the annotation back in the store",
        )
        assert host.public_ip == "192.168.10.11"
        patches = [path for method, path, _ in server.requests if method == "PATCH"]
        assert patches == ["/api/v1/nodes/node-a"]
        assert await overlay.reconcile_once() is True  # nothing changed: no second patch
        assert [p for m, p, _ in server.requests if m == "PATCH"] == patches
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop()
