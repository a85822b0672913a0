"""Reconcile by diff, with a kernel fake: the plan's exact changes and order, readiness,
metrics and log lines. The real kernel is exercised in test_namespaces.py."""

from __future__ import annotations

import logging

import pytest
from overlay.fake_kernel import FakeKernel
from prometheus_client import CollectorRegistry

from node_services.overlay.model import Desired, FdbEntry, Neighbour, Route, Underlay, vtep_mac_for
from node_services.overlay.netlink import ADD, REMOVE, REPLACE, Actual, Change, OverlayError
from node_services.overlay.reconcile import OverlayConfig, OverlayReconciler, plan
from node_services.state.records import Host
from node_services.state.store import Store

DEV = "ns-vxlan.1"


def test_plan_adds_replaces_and_removes_in_a_safe_order() -> None:
    desired = Desired(
        routes=frozenset({Route("10.244.2.0/24", "10.244.2.0", DEV, True)}),
        neighbours=frozenset({Neighbour("10.244.2.0", "0a:00:00:00:00:02", DEV)}),
        fdb=frozenset({FdbEntry("0a:00:00:00:00:02", "192.168.7.2", DEV)}),
    )
    actual = Actual(
        routes=frozenset({Route("10.244.3.0/24", "10.244.3.0", DEV, True)}),
        neighbours=frozenset(
            {
                Neighbour("10.244.2.0", "0a:00:00:00:00:99", DEV),
                Neighbour("10.244.3.0", "0a:00:00:00:00:03", DEV),
            }
        ),
        fdb=frozenset(
            {
                FdbEntry("0a:00:00:00:00:02", "192.168.7.2", DEV),
                FdbEntry("0a:00:00:00:00:03", "192.168.7.3", DEV),
            }
        ),
    )
    assert plan(desired, actual) == [
        Change(REMOVE, Route("10.244.3.0/24", "10.244.3.0", DEV, True)),
        Change(REPLACE, Neighbour("10.244.2.0", "0a:00:00:00:00:02", DEV)),
        Change(ADD, Route("10.244.2.0/24", "10.244.2.0", DEV, True)),
        Change(REMOVE, Neighbour("10.244.3.0", "0a:00:00:00:00:03", DEV)),
        Change(REMOVE, FdbEntry("0a:00:00:00:00:03", "192.168.7.3", DEV)),
    ]
    assert plan(desired, Actual(desired.routes, desired.neighbours, desired.fdb)) == []


def test_plan_removes_a_second_remote_of_a_desired_fdb_entry() -> None:
    wanted = FdbEntry("0a:00:00:00:00:02", "192.168.7.2", DEV)
    extra = FdbEntry("0a:00:00:00:00:02", "192.168.7.9", DEV)
    desired = Desired(fdb=frozenset({wanted}))
    assert plan(desired, Actual(frozenset(), frozenset(), frozenset({wanted, extra}))) == [
        Change(REMOVE, extra)
    ]


def host(n: int, ip: str = "") -> Host:
    return Host(
        key=f"k8s:Node/node-{n}",
        source="snap",
        name=f"node-{n}",
        addresses=(ip or f"192.168.7.{n}",),
        pod_cidrs=(f"10.244.{n}.0/24",),
    )


def reconciler(
    backend: str, kernel: FakeKernel, store: Store
) -> tuple[OverlayReconciler, CollectorRegistry]:
    registry = CollectorRegistry()
    return OverlayReconciler(store, OverlayConfig(backend, "node-1"), registry, kernel), registry


async def test_overlay_waits_for_every_source_and_touches_nothing_meanwhile() -> None:
    store = Store()
    store.register("snap")
    kernel = FakeKernel()
    overlay, _ = reconciler("vxlan", kernel, store)
    assert overlay.problems() == ["overlay vxlan has not reconciled yet: not reconciled yet"]
    assert await overlay.reconcile_once() is False
    assert overlay.problems() == [
        "overlay vxlan has not reconciled yet: waiting for every source to sync"
    ]
    store.replace("snap", [host(2), host(3)])
    assert await overlay.reconcile_once() is False
    assert overlay.problems() == [
        "overlay vxlan has not reconciled yet: node node-1 is not in the state cache yet"
    ]
    assert kernel.applied == []


async def test_first_pass_programs_every_peer_and_a_second_changes_nothing() -> None:
    store = Store()
    store.replace("snap", [host(1), host(2), host(3)])
    kernel = FakeKernel()
    overlay, registry = reconciler("vxlan", kernel, store)
    assert await overlay.reconcile_once() is True
    assert overlay.problems() == []
    assert kernel.routes == {
        Route("10.244.2.0/24", "10.244.2.0", DEV, True),
        Route("10.244.3.0/24", "10.244.3.0", DEV, True),
    }
    assert kernel.fdb == {
        FdbEntry(vtep_mac_for("node-2"), "192.168.7.2", DEV),
        FdbEntry(vtep_mac_for("node-3"), "192.168.7.3", DEV),
    }
    assert registry.get_sample_value("node_services_overlay_repairs_total", {"kind": "added"}) == 6
    assert registry.get_sample_value("node_services_overlay_peers") == 2
    kernel.applied.clear()
    assert await overlay.reconcile_once() is True
    assert kernel.applied == []
    assert registry.get_sample_value("node_services_overlay_reconcile_seconds_count") == 2


async def test_refused_peer_is_logged_and_counted_once_not_every_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Store()
    store.replace("snap", [host(1), host(2), host(9, ip="10.88.0.9")])
    kernel = FakeKernel()
    overlay, registry = reconciler("host-gw", kernel, store)
    with caplog.at_level(logging.WARNING, logger="node_services.overlay.reconcile"):
        assert await overlay.reconcile_once() is True
        assert await overlay.reconcile_once() is True
    assert kernel.routes == {Route("10.244.2.0/24", "192.168.7.2", "eth0")}
    refused = [r.getMessage() for r in caplog.records if "node-9" in r.getMessage()]
    assert refused == [
        "overlay host-gw: peer node-9: underlay address 10.88.0.9 is not on a directly "
        "connected network of eth0 (192.168.7.0/24); host-gw cannot route to it (use vxlan)"
    ]
    assert (
        registry.get_sample_value(
            "node_services_overlay_errors_total", {"reason": "peer_not_connected"}
        )
        == 1
    )


async def test_a_route_held_by_another_protocol_is_left_alone_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Store()
    store.replace("snap", [host(1), host(2), host(3)])
    kernel = FakeKernel(taken={"10.244.3.0/24"})
    overlay, registry = reconciler("host-gw", kernel, store)
    with caplog.at_level(logging.WARNING, logger="node_services.overlay.reconcile"):
        assert await overlay.reconcile_once() is True
    assert kernel.routes == {Route("10.244.2.0/24", "192.168.7.2", "eth0")}
    assert (
        "overlay host-gw: add route 10.244.3.0/24 via 192.168.7.3 dev eth0: a route of another "
        "protocol holds this destination; left alone"
    ) in caplog.messages
    assert (
        registry.get_sample_value(
            "node_services_overlay_errors_total", {"reason": "route_conflict"}
        )
        == 1
    )
    assert registry.get_sample_value("node_services_overlay_repairs_total", {"kind": "added"}) == 1


async def test_a_failing_kernel_fails_the_pass_with_one_log_line_and_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Refusing(FakeKernel):
        def underlay(self, interface: str, address: str) -> Underlay:
            raise OverlayError("netlink", "reading the underlay interface: Operation not permitted")

    store = Store()
    store.replace("snap", [host(1), host(2)])
    overlay, registry = reconciler("vxlan", Refusing(), store)
    with caplog.at_level(logging.ERROR, logger="node_services.overlay.reconcile"):
        assert await overlay.reconcile_once() is False
        assert await overlay.reconcile_once() is False
    assert caplog.messages == [
        "overlay vxlan: reconcile failed: reading the underlay interface: Operation not permitted"
    ]
    assert overlay.problems() == [
        "overlay vxlan has not reconciled yet: reading the underlay interface: Operation not "
        "permitted"
    ]
    assert (
        registry.get_sample_value("node_services_overlay_errors_total", {"reason": "netlink"}) == 2
    )
