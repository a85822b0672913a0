"""Settings of the Kubernetes source: validated, and wired into the daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_services.app import Daemon
from node_services.config import ConfigError, load_settings


def test_kube_settings_parse_and_reject_bad_values() -> None:
    settings = load_settings(
        environ={"NODE_SERVICES_KUBE_READ_TIMEOUT": "2.5", "NODE_SERVICES_KUBE_PAGE_SIZE": "50"}
    )
    assert (settings.kube_read_timeout, settings.kube_page_size) == (2.5, 50)
    with pytest.raises(ConfigError) as info:
        load_settings(
            environ={"NODE_SERVICES_KUBE_READ_TIMEOUT": "0", "NODE_SERVICES_KUBE_PAGE_SIZE": "x"}
        )
    assert info.value.problems == [
        "environment: NODE_SERVICES_KUBE_READ_TIMEOUT: must be more than 0",
        "environment: NODE_SERVICES_KUBE_PAGE_SIZE: 'x' is not a whole number of at least 1",
    ]


def test_daemon_enables_the_source_with_a_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    without = Daemon(load_settings(environ={}))
    assert without.kube is None
    assert without.store.sources == ()
    settings = load_settings(
        environ={}, overrides={"kubeconfig": str(kubeconfig), "pod_records": "verified"}
    )
    daemon = Daemon(settings)
    assert daemon.kube is not None
    assert daemon.store.sources == (
        "kubernetes:namespaces",
        "kubernetes:nodes",
        "kubernetes:services",
        "kubernetes:endpointslices",
        "kubernetes:pods",
    )
    assert [r.field_selector for r in daemon.kube.resources if r.name == "pods"] == [""]


def test_daemon_enables_the_source_in_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.43.0.1")
    daemon = Daemon(load_settings(environ={}, overrides={"node_name": "node-7"}))
    assert daemon.kube is not None
    assert daemon.kube.kubeconfig is None
    assert [r.field_selector for r in daemon.kube.resources if r.name == "pods"] == [
        "spec.nodeName=node-7"
    ]
