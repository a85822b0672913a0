"""The real daemon with --kubeconfig pointing at the test API server (in a thread)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fakes.kube_apiserver import serve_in_thread
from fakes.kube_helpers import fixture_objects, service
from helpers import DaemonProcess

Start = Callable[..., DaemonProcess]


def test_readyz_flips_only_after_every_initial_list(daemon: Start, tmp_path: Path) -> None:
    with serve_in_thread() as api:
        for obj in fixture_objects():
            api.call(lambda obj=obj: api.server.put(obj))
        api.server.faults.hold_lists = ["endpointslices"]  # this one list hangs for now
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(api.server.kubeconfig())
        node = daemon("--kubeconfig", str(kubeconfig), "--pod-records", "verified")

        node.wait_for(
            lambda: api.server.list_count["services"] == 1 and api.server.watch_count["services"],
            what="services listed and watched",
        )
        node.wait_for(
            lambda: node.metric('node_services_store_records{kind="service"}') == "4.0",
            what="services in the cache",
        )
        time.sleep(0.3)
        status, body = node.get("/readyz")
        assert status == 503
        assert body == "not ready:\n  source kubernetes:endpointslices has not synced\n"

        api.call(lambda: api.server.faults.hold_lists.clear())
        node.wait_for(lambda: node.get("/readyz")[0] == 200, what="ready")
        assert node.get("/readyz") == (200, "ok\n")
        assert node.metric('node_services_store_records{kind="endpoints"}') == "3.0"
        # pod records verified: every pod is listed, not only this node's
        assert node.metric('node_services_store_records{kind="workload"}') == "2.0"
        pod_lists = [q for m, p, q in api.server.requests if p == "/api/v1/pods"]
        assert all("fieldSelector" not in q for q in pod_lists)

        api.call(lambda: api.server.put(service("late", "10.43.3.3")))
        node.wait_for(
            lambda: node.metric('node_services_store_records{kind="service"}') == "5.0",
            what="watched service",
        )
        assert node.metric('node_services_kube_lists_total{resource="services"}') == "1.0"
        assert node.stop() == 0  # SIGTERM while watching: a clean shutdown
        assert "Traceback" not in node.output()
        assert "Unclosed" not in node.output()


def test_unreachable_api_server_keeps_the_daemon_up_but_not_ready(
    daemon: Start, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        "clusters: [{name: x, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: x, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: x, user: x}}]\n"
    )
    node = daemon("--kubeconfig", str(kubeconfig))
    node.wait_for(lambda: "Connect" in node.output(), what="a logged connection error")
    status, body = node.get("/readyz")
    assert status == 503
    assert "source kubernetes:services has not synced" in body
    assert node.get("/healthz") == (200, "ok\n")
