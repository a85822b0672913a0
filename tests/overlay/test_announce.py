"""With the Kubernetes source, the overlay writes this node's VTEP MAC and underlay address as
its annotations (the existing node patch) and, once routes are programmed, its
NetworkUnavailable condition as False, against the test API server; a kernel fake."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import copy
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakes.kube_apiserver import FakeKubeAPIServer
from fakes.kube_helpers import wait_until
from helpers import FIXTURES
from overlay.fake_kernel import FakeKernel
from prometheus_client import CollectorRegistry

from node_services.app import Daemon, node_annotator, node_network_marker
from node_services.config import load_settings
from node_services.overlay import reconcile
from node_services.overlay.model import vtep_mac_for
from node_services.overlay.reconcile import OverlayConfig, OverlayReconciler
from node_services.sources.kube.client import load_connection
from node_services.sources.kube.source import KubeSource
from node_services.state.store import Store


@contextlib.asynccontextmanager
async def synced_kube_source(
    tmp_path: Path, node: dict[str, Any]
) -> AsyncIterator[tuple[FakeKubeAPIServer, Store, KubeSource]]:
    """``node`` on the test API server and the real Kubernetes source synced from it."""
    server = await FakeKubeAPIServer().start()
    server.put(node)
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
        yield server, store, source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop()


async def test_kubernetes_node_gets_its_vtep_mac_and_public_ip_annotations(
    tmp_path: Path,
) -> None:
    node = yaml.safe_load((FIXTURES / "kube" / "node.yaml").read_text())
    node["metadata"]["annotations"] = {"node.alpha.kubernetes.io/ttl": "0"}
    async with synced_kube_source(tmp_path, copy.deepcopy(node)) as (server, store, source):
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


# -- NetworkUnavailable ------------------------------------------------------------------------

KUBELET_CONDITIONS = ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]


@contextlib.asynccontextmanager
async def kube_overlay(
    tmp_path: Path, backend: str = "vxlan", *, conditions: list[dict[str, str]] | None = None
) -> AsyncIterator[tuple[FakeKubeAPIServer, OverlayReconciler, CollectorRegistry]]:
    """The fixture node on the test API server, the real Kubernetes source synced from it, and
    a reconciler with the daemon's two hooks (annotations, then the node condition)."""
    node = yaml.safe_load((FIXTURES / "kube" / "node.yaml").read_text())
    node["status"]["conditions"] = [*(conditions or []), *node["status"]["conditions"]]
    async with synced_kube_source(tmp_path, node) as (server, store, source):
        registry = CollectorRegistry()
        overlay = OverlayReconciler(
            store,
            OverlayConfig(backend, "node-a"),
            registry,
            FakeKernel(networks=("192.168.10.0/24",)),
        )
        overlay.announce = node_annotator(source)
        overlay.node_up = node_network_marker(source)
        yield server, overlay, registry


def stored_conditions(server: FakeKubeAPIServer) -> list[dict[str, str]]:
    conditions: list[dict[str, str]] = server.objects["nodes"][("", "node-a")]["status"][
        "conditions"
    ]
    return conditions


def patches(server: FakeKubeAPIServer) -> list[str]:
    return [path for method, path, _ in server.requests if method == "PATCH"]


def condition_errors(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value(
        "node_services_overlay_errors_total", {"reason": "node_condition"}
    )


async def test_network_unavailable_goes_false_once_after_the_first_pass_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    """As a cloud route controller leaves it (True, NoRouteCreated): our first pass programs
    the routes, publishes the annotations, then replaces the condition in place with False /
    NodeServicesIsUp; the kubelet's conditions stay as they were; later passes send nothing."""
    unavailable = {
        "type": "NetworkUnavailable",
        "status": "True",
        "reason": "NoRouteCreated",
        "message": "RouteController failed to create a route",
        "lastTransitionTime": "2024-05-14T08:57:49Z",
        "lastHeartbeatTime": "2024-05-14T08:57:49Z",
    }
    async with kube_overlay(tmp_path, conditions=[unavailable]) as (server, overlay, registry):
        kubelet = [c for c in stored_conditions(server) if c["type"] != "NetworkUnavailable"]
        started = time.time()
        assert await overlay.reconcile_once() is True
        assert patches(server) == ["/api/v1/nodes/node-a", "/api/v1/nodes/node-a/status"]
        conditions = stored_conditions(server)
        assert [c["type"] for c in conditions] == ["NetworkUnavailable", *KUBELET_CONDITIONS]
        assert conditions[1:] == kubelet
        up = conditions[0]
        assert {k: up[k] for k in ("status", "reason", "message")} == {
            "status": "False",
            "reason": "NodeServicesIsUp",
            "message": "node-services overlay routes are programmed on this node",
        }
        for stamp in ("lastTransitionTime", "lastHeartbeatTime"):  # the status changed: now
            at = calendar.timegm(time.strptime(up[stamp], "%Y-%m-%dT%H:%M:%SZ"))
            assert started - 1 <= at <= time.time()
        requests = len(server.requests)
        for _ in range(3):
            assert await overlay.reconcile_once() is True
        assert len(server.requests) == requests  # not re-read, not re-sent
        assert patches(server) == ["/api/v1/nodes/node-a", "/api/v1/nodes/node-a/status"]
        assert condition_errors(registry) is None  # never counted


async def test_host_gw_node_without_the_condition_gets_it_with_no_annotation_patch(
    tmp_path: Path,
) -> None:
    async with kube_overlay(tmp_path, "host-gw") as (server, overlay, registry):
        assert await overlay.reconcile_once() is True
        assert await overlay.reconcile_once() is True
        assert patches(server) == ["/api/v1/nodes/node-a/status"]
        conditions = stored_conditions(server)
        assert [c["type"] for c in conditions] == ["NetworkUnavailable", *KUBELET_CONDITIONS]
        assert (conditions[0]["status"], conditions[0]["reason"]) == ("False", "NodeServicesIsUp")
        assert condition_errors(registry) is None


async def test_node_already_marked_up_by_us_gets_no_status_patch(tmp_path: Path) -> None:
    """A restarted daemon reads the condition first: already False / NodeServicesIsUp, its
    lastTransitionTime is not touched by a patch."""
    already = {
        "type": "NetworkUnavailable",
        "status": "False",
        "reason": "NodeServicesIsUp",
        "message": "node-services overlay routes are programmed on this node",
        "lastTransitionTime": "2024-05-14T09:00:00Z",
        "lastHeartbeatTime": "2024-05-14T09:00:00Z",
    }
    async with kube_overlay(tmp_path, "host-gw", conditions=[already]) as (server, overlay, _):
        assert await overlay.reconcile_once() is True
        assert await overlay.reconcile_once() is True
        assert patches(server) == []
        assert stored_conditions(server)[0] == already


async def test_condition_waits_for_the_annotations_peers_route_to_us_by(tmp_path: Path) -> None:
    async with kube_overlay(tmp_path) as (server, overlay, registry):
        server.faults.fail_node_patches = 1
        assert await overlay.reconcile_once() is True
        assert patches(server) == ["/api/v1/nodes/node-a"]  # the annotation patch, refused
        assert "NetworkUnavailable" not in [c["type"] for c in stored_conditions(server)]
        assert (
            registry.get_sample_value("node_services_overlay_errors_total", {"reason": "announce"})
            == 1
        )
        assert condition_errors(registry) is None  # not tried, so not failed
        assert await overlay.reconcile_once() is True
        assert patches(server) == [
            "/api/v1/nodes/node-a",
            "/api/v1/nodes/node-a",
            "/api/v1/nodes/node-a/status",
        ]
        assert stored_conditions(server)[0]["reason"] == "NodeServicesIsUp"


@pytest.mark.parametrize(
    ("code", "logged"),
    [
        (500, "500 InternalError: injected patch failure"),
        (
            403,
            '403 Forbidden: nodes "node-a" is forbidden: User "system:serviceaccount:kube-system:'
            'node-services" cannot patch resource "nodes/status"',
        ),
    ],
)
async def test_failed_status_patch_is_logged_once_counted_and_retried_on_the_next_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, code: int, logged: str
) -> None:
    async with kube_overlay(tmp_path, "host-gw") as (server, overlay, registry):
        server.faults.fail_status_patches = 2
        server.faults.patch_fail_code = code
        with caplog.at_level(logging.INFO, logger="node_services.overlay.reconcile"):
            assert await overlay.reconcile_once() is True  # the routes are in: the pass is good
            assert await overlay.reconcile_once() is True
            assert condition_errors(registry) == 2
            assert overlay.problems() == []  # readiness does not wait for the API server
            assert "NetworkUnavailable" not in [c["type"] for c in stored_conditions(server)]
            assert await overlay.reconcile_once() is True
            assert await overlay.reconcile_once() is True
        assert patches(server) == ["/api/v1/nodes/node-a/status"] * 3
        assert stored_conditions(server)[0]["reason"] == "NodeServicesIsUp"
        assert condition_errors(registry) == 2
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # the same failure twice: one line
        assert (
            "could not mark node node-a's network as up (NetworkUnavailable=False)" in (warnings[0])
        )
        assert logged in warnings[0]
        assert any("node node-a's network marked as up" in r.getMessage() for r in caplog.records)


async def test_status_patch_that_never_answers_is_cut_by_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(reconcile, "ANNOUNCE_TIMEOUT", 0.3)
    async with kube_overlay(tmp_path, "host-gw") as (server, overlay, registry):
        server.faults.hold_status_patches = True
        started = time.monotonic()
        assert await overlay.reconcile_once() is True
        assert time.monotonic() - started < 3
        assert condition_errors(registry) == 1
        assert any("timed out after 0.3s" in r.getMessage() for r in caplog.records)
        server.faults.hold_status_patches = False
        assert await overlay.reconcile_once() is True
        assert stored_conditions(server)[0]["reason"] == "NodeServicesIsUp"


async def test_daemon_with_kubernetes_and_an_overlay_wires_both_node_writes(tmp_path: Path) -> None:
    """The daemon's wiring: its overlay (kernel faked) on its own Kubernetes source annotates
    the node, then marks it up, each once."""
    node = yaml.safe_load((FIXTURES / "kube" / "node.yaml").read_text())
    server = await FakeKubeAPIServer().start()
    server.put(node)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(server.kubeconfig())
    settings = load_settings(
        environ={},
        overrides={
            "node_name": "node-a",
            "kubeconfig": str(kubeconfig),
            "overlay": "vxlan",
            "overlay_reconcile_interval": 0.05,
        },
    )
    daemon = Daemon(settings)
    daemon._start_overlay()
    assert daemon.overlay is not None and daemon.kube is not None
    daemon.overlay.kernel = FakeKernel(networks=("192.168.10.0/24",))  # before its first pass
    daemon.supervisor.start("kubernetes", daemon.kube.run)
    try:
        await wait_until(
            lambda: "NetworkUnavailable" in [c["type"] for c in stored_conditions(server)],
            what="the node condition",
        )
        passes = daemon.overlay.passes
        await wait_until(lambda: daemon.overlay and daemon.overlay.passes >= passes + 3)
        assert patches(server) == ["/api/v1/nodes/node-a", "/api/v1/nodes/node-a/status"]
        assert stored_conditions(server)[0]["reason"] == "NodeServicesIsUp"
        assert daemon.supervisor.problems() == []
    finally:
        await daemon.supervisor.stop()
        await server.stop()
