"""Two sources naming the same host (a Kubernetes Node and a Cattle host both `node-a`): one
wins by the documented rule, every user of the name sees the same one, and it is warned of."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from helpers import FIXTURES, DaemonProcess, free_port

from node_services.state import Host, Store

SAME_HOST = FIXTURES / "same-host-two-sources.yaml"


def hosts() -> list[Host]:
    return [
        Host(key="cattle:host/1h1", source="c", name="", hostname="node-a"),
        Host(key="k8s:Node/node-a", source="k", name="node-a", pod_cidrs=("10.42.1.0/24",)),
        Host(key="k8s:Node/node-b", source="k", name="node-b", pod_cidrs=("10.42.2.0/24",)),
    ]


def test_the_host_with_pod_cidrs_wins_whatever_the_order() -> None:
    for records in (hosts(), hosts()[::-1]):
        store = Store()
        store.replace("s", records)
        snapshot = store.snapshot
        assert snapshot.host_named("node-a") is not None
        assert snapshot.host_named("node-a").key == "k8s:Node/node-a"  # type: ignore[union-attr]
        assert [h.key for h in snapshot.hosts_named("node-a")] == [
            "k8s:Node/node-a",
            "cattle:host/1h1",
        ]


def test_without_pod_cidrs_the_kubernetes_node_wins_then_the_lowest_key() -> None:
    store = Store()
    store.replace(
        "s",
        [
            Host(key="cattle:host/1h2", source="c", name="", hostname="node-a"),
            Host(key="k8s:Node/node-a", source="k", name="node-a"),
            Host(key="cattle:host/1h1", source="c", name="", hostname="node-a"),
        ],
    )
    keys = [h.key for h in store.snapshot.hosts_named("node-a")]
    assert keys == ["k8s:Node/node-a", "cattle:host/1h1", "cattle:host/1h2"]


def test_metadata_self_host_is_the_node_and_the_clash_is_warned(
    daemon: Callable[..., DaemonProcess],
) -> None:
    metadata = f"127.0.0.1:{free_port()}"
    node = daemon("--snapshot", str(SAME_HOST), "--metadata-listen", metadata)
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="readiness")
    status, body = _get_json(f"http://{metadata}/latest/self/host")
    assert status == 200
    assert (body["name"], body["memory"], body["milli_cpu"]) == ("node-a", 7940, 4000)
    node.wait_for(lambda: "is named by 2 hosts" in node.output(), what="the warning")
    assert (
        "node node-a is named by 2 hosts (k8s:Node/node-a, cattle:host/1h1): self/host shows "
        "k8s:Node/node-a (hosts with pod CIDRs win, then Kubernetes Nodes, then the lowest "
        "key); give each node one host"
    ) in node.output()


def _get_json(url: str) -> tuple[int, dict[str, object]]:
    import urllib.request

    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, json.loads(response.read())


def test_fixture_really_has_the_clash() -> None:
    text = Path(SAME_HOST).read_text()
    assert "hostname: node-a" in text
    assert "  name: node-a" in text
