"""The test API server is faithful: Debian's kubectl and the official Python client use it."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.kube_apiserver import ThreadedServer, serve_in_thread
from fakes.kube_helpers import fixture_objects, service
from helpers import http_get

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (Debian package) not installed")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ThreadedServer]:
    with serve_in_thread(bookmark_interval=0.5) as threaded:
        for obj in fixture_objects():
            threaded.call(lambda obj=obj: threaded.server.put(obj))
        (tmp_path / "kubeconfig").write_text(threaded.server.kubeconfig())
        yield threaded


def kubectl(tmp_path: Path, *args: str) -> str:
    assert KUBECTL is not None
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin"),
        "HOME": str(tmp_path),  # its discovery cache lands here, not in the real home
        "KUBECONFIG": str(tmp_path / "kubeconfig"),
    }
    result = subprocess.run(
        [KUBECTL, *args], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_kubectl
def test_kubectl_get_all_namespaces_json(api: ThreadedServer, tmp_path: Path) -> None:
    services = json.loads(kubectl(tmp_path, "get", "services", "-A", "-o", "json"))
    assert services["kind"] == "List"
    assert [
        (s["kind"], s["metadata"]["namespace"], s["metadata"]["name"]) for s in services["items"]
    ] == [
        ("Service", "default", "db"),
        ("Service", "default", "search"),
        ("Service", "default", "web"),
        ("Service", "kube-system", "ingress"),
    ]
    web = services["items"][2]
    stored = api.server.objects["services"][("default", "web")]
    assert web["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]
    assert web["spec"]["clusterIPs"] == ["10.43.0.10", "fd00:43::a"]

    slices = json.loads(kubectl(tmp_path, "get", "endpointslices", "-A", "-o", "json"))
    assert [s["metadata"]["name"] for s in slices["items"]] == [
        "db-xyz34",
        "web-abc12",
        "web-v6k9p",
    ]
    assert slices["items"][1]["apiVersion"] == "discovery.k8s.io/v1"
    nodes = json.loads(kubectl(tmp_path, "get", "nodes", "-o", "json"))
    assert [n["metadata"]["name"] for n in nodes["items"]] == ["node-a", "node-b"]


@needs_kubectl
def test_kubectl_selectors_paging_and_single_get(api: ThreadedServer, tmp_path: Path) -> None:
    assert (
        kubectl(
            tmp_path, "get", "pods", "-A", "--field-selector", "spec.nodeName=node-b", "-o", "name"
        )
        == "pod/db-0\n"
    )
    assert kubectl(tmp_path, "get", "svc", "-l", "app in (web)", "-o", "name") == "service/web\n"
    assert kubectl(tmp_path, "get", "services", "-A", "--chunk-size=2", "-o", "name").split() == [
        "service/db",
        "service/search",
        "service/web",
        "service/ingress",
    ]
    continued = [
        q for m, p, q in api.server.requests if p == "/api/v1/services" and "continue" in q
    ]
    assert len(continued) == 1 and continued[0]["limit"] == "2"
    node = json.loads(kubectl(tmp_path, "get", "node", "node-b", "-o", "json"))
    assert node["kind"] == "Node" and node["metadata"]["name"] == "node-b"
    missing = subprocess.run(
        [str(KUBECTL), "get", "service", "nope"],
        capture_output=True,
        text=True,
        env={"HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "kubeconfig")},
        timeout=30,
        check=False,
    )
    assert missing.returncode == 1
    assert 'services "nope" not found' in missing.stderr


@needs_kubectl
def test_kubectl_annotate_patches_the_node(api: ThreadedServer, tmp_path: Path) -> None:
    kubectl(tmp_path, "annotate", "node", "node-b", "node-services.io/public-ip=192.0.2.9")
    stored = api.server.objects["nodes"][("", "node-b")]
    assert stored["metadata"]["annotations"]["node-services.io/public-ip"] == "192.0.2.9"
    patch_types = [
        r for r in api.server.requests if r[0] == "PATCH" and r[1] == "/api/v1/nodes/node-b"
    ]
    assert len(patch_types) == 1


@needs_kubectl
def test_kubectl_patch_of_node_status_merges_conditions_by_type(
    api: ThreadedServer, tmp_path: Path
) -> None:
    """kubectl's strategic merge patch of the status subresource (what flannel and our overlay
    send) replaces or adds the named condition and keeps the kubelet's others; a new one
    comes first, as on a real server; spec stays; a JSON merge patch replaces the list."""
    up = {
        "type": "NetworkUnavailable",
        "status": "False",
        "reason": "NodeServicesIsUp",
        "message": "routes programmed",
        "lastTransitionTime": "2026-01-02T03:04:05Z",
        "lastHeartbeatTime": "2026-01-02T03:04:05Z",
    }
    before = api.call(lambda: copy.deepcopy(api.server.objects["nodes"][("", "node-a")]))
    patch = {"status": {"conditions": [up]}, "spec": {"podCIDR": "10.99.0.0/24"}}
    args = ("patch", "node", "node-a", "--subresource=status", "--type=strategic")
    assert kubectl(tmp_path, *args, "-p", json.dumps(patch)) == "node/node-a patched\n"
    node = json.loads(kubectl(tmp_path, "get", "node", "node-a", "-o", "json"))
    conditions = node["status"]["conditions"]
    assert conditions == [up, *before["status"]["conditions"]]
    assert node["spec"] == before["spec"]  # the status subresource leaves the spec alone
    assert [(m, p) for m, p, _ in api.server.requests if m == "PATCH"] == [
        ("PATCH", "/api/v1/nodes/node-a/status")
    ]
    down = {**up, "status": "True", "reason": "NoRouteCreated"}
    kubectl(tmp_path, *args, "-p", json.dumps({"status": {"conditions": [down]}}))
    node = json.loads(kubectl(tmp_path, "get", "node", "node-a", "-o", "json"))
    assert node["status"]["conditions"] == [down, *before["status"]["conditions"]]
    # The node's own endpoint does not change its status.
    kubectl(tmp_path, "patch", "node", "node-a", "-p", json.dumps({"status": {"conditions": []}}))
    node = json.loads(kubectl(tmp_path, "get", "node", "node-a", "-o", "json"))
    assert len(node["status"]["conditions"]) == 5
    merge = ("patch", "node", "node-a", "--subresource=status", "--type=merge")
    kubectl(tmp_path, *merge, "-p", json.dumps({"status": {"conditions": [up]}}))
    node = json.loads(kubectl(tmp_path, "get", "node", "node-a", "-o", "json"))
    assert node["status"]["conditions"] == [up]


@needs_kubectl
def test_kubectl_watch_sees_events(api: ThreadedServer, tmp_path: Path) -> None:
    assert KUBECTL is not None
    env = {"HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "kubeconfig")}
    watch = subprocess.Popen(
        [KUBECTL, "get", "services", "-n", "default", "-w", "--output-watch-events", "-o", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    events: list[dict[str, Any]] = []

    def read() -> None:
        assert watch.stdout is not None
        decoder, buffer = json.JSONDecoder(), ""
        for line in watch.stdout:
            buffer += line
            try:
                event, _ = decoder.raw_decode(buffer.strip())
            except ValueError:
                continue
            events.append(event)
            buffer = ""

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 15
        while len(events) < 3 and time.monotonic() < deadline:  # the three existing services
            time.sleep(0.05)
        while not api.server.watch_count["services"] and time.monotonic() < deadline:
            time.sleep(0.05)
        api.call(lambda: api.server.put(service("fresh", "10.43.4.4")))
        api.call(lambda: api.server.delete("Service", "default", "db"))
        while len(events) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watch.terminate()
        watch.wait(10)
    summary = [(e["type"], e["object"]["metadata"]["name"]) for e in events]
    assert summary == [
        ("ADDED", "db"),
        ("ADDED", "search"),
        ("ADDED", "web"),
        ("ADDED", "fresh"),
        ("DELETED", "db"),
    ]


@pytest.mark.parametrize(
    ("path", "model", "names"),
    [
        ("/api/v1/services", "V1ServiceList", ["db", "search", "web", "ingress"]),
        ("/api/v1/namespaces", "V1NamespaceList", ["default"]),
        ("/api/v1/nodes", "V1NodeList", ["node-a", "node-b"]),
        ("/api/v1/pods", "V1PodList", ["db-0", "web-7d4b9c-abcde"]),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            "V1EndpointSliceList",
            ["db-xyz34", "web-abc12", "web-v6k9p"],
        ),
    ],
)
def test_kubernetes_models_deserialize_list_responses(
    api: ThreadedServer, path: str, model: str, names: list[str]
) -> None:
    from kubernetes.client import ApiClient

    status, body = http_get(api.server.url + path)
    assert status == 200
    result = ApiClient().deserialize(body, model, "application/json")
    assert [item.metadata.name for item in result.items] == names
    assert result.metadata.resource_version == str(api.server.rv)
    if model == "V1ServiceList":
        assert result.items[2].spec.cluster_ips == ["10.43.0.10", "fd00:43::a"]
    if model == "V1EndpointSliceList":
        assert result.items[1].endpoints[0].addresses == ["10.42.1.7"]
        assert result.items[1].endpoints[0].conditions.ready is True


def test_kubernetes_models_deserialize_discovery_and_status(api: ThreadedServer) -> None:
    from kubernetes.client import ApiClient

    client = ApiClient()
    url = api.server.url
    version = client.deserialize(http_get(url + "/version")[1], "VersionInfo", "application/json")
    assert (version.major, version.minor) == ("1", "30")
    groups = client.deserialize(http_get(url + "/apis")[1], "V1APIGroupList", "application/json")
    assert [g.name for g in groups.groups] == ["discovery.k8s.io"]
    core = client.deserialize(http_get(url + "/api/v1")[1], "V1APIResourceList", "application/json")
    assert {r.name: r.namespaced for r in core.resources} == {
        "namespaces": False,
        "nodes": False,
        "nodes/status": False,
        "services": True,
        "pods": True,
    }
    api.call(api.server.compact)
    status, body = http_get(url + "/api/v1/services?limit=1")
    token = json.loads(body)["metadata"]["continue"]
    api.call(api.server.compact)
    status, body = http_get(url + f"/api/v1/services?limit=1&continue={token}")
    assert status == 410
    gone = client.deserialize(body, "V1Status", "application/json")
    assert (gone.code, gone.reason, gone.status) == (410, "Expired", "Failure")


def test_official_client_lists_and_watches(api: ThreadedServer) -> None:
    from kubernetes import client, watch

    configuration = client.Configuration()
    configuration.host = api.server.url
    v1 = client.CoreV1Api(client.ApiClient(configuration))
    listed = v1.list_service_for_all_namespaces(limit=3)
    assert [s.metadata.name for s in listed.items] == ["db", "search", "web"]
    assert listed.metadata._continue
    rest = v1.list_service_for_all_namespaces(limit=3, _continue=listed.metadata._continue)
    assert [s.metadata.name for s in rest.items] == ["ingress"]

    api.call(lambda: api.server.put(service("watched", "10.43.4.5")))
    seen = []
    for event in watch.Watch().stream(
        v1.list_namespaced_service,
        "default",
        resource_version=listed.metadata.resource_version,
        timeout_seconds=1,
    ):
        seen.append((event["type"], event["object"].metadata.name))
    assert seen == [("ADDED", "watched")]


def test_watch_from_a_compacted_version_is_an_error_event_with_410(api: ThreadedServer) -> None:
    old = api.server.rv
    api.call(lambda: api.server.put(service("newer", "10.43.4.6")))
    api.call(api.server.compact)
    status, body = http_get(
        api.server.url + f"/api/v1/services?watch=true&resourceVersion={old}", timeout=5
    )
    assert status == 200
    event = json.loads(body)
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status"
    assert event["object"]["code"] == 410
    assert event["object"]["reason"] == "Expired"
    api.server.faults.gone_as_http = True
    status, body = http_get(
        api.server.url + f"/api/v1/services?watch=true&resourceVersion={old}", timeout=5
    )
    assert status == 410
    assert json.loads(body)["reason"] == "Expired"


def test_faults_answer_500_and_429_with_status_bodies(api: ThreadedServer) -> None:
    api.server.faults.throttle_next = 1
    api.server.faults.retry_after = 3
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(api.server.url + "/api/v1/nodes", timeout=5)
    assert info.value.code == 429
    assert info.value.headers["Retry-After"] == "3"
    assert json.loads(info.value.read())["reason"] == "TooManyRequests"
    api.server.faults.fail_next = 1
    status, body = http_get(api.server.url + "/api/v1/nodes")
    assert status == 500
    assert json.loads(body)["reason"] == "InternalError"
    assert http_get(api.server.url + "/api/v1/nodes")[0] == 200
    status, body = http_get(api.server.url + "/api/v1/pods?fieldSelector=spec.bogus%3Dx")
    assert status == 400
    assert json.loads(body)["message"] == 'field label not supported: "spec.bogus"'


def test_bench_controls_churn_one_namespace_and_report_write_times(api: ThreadedServer) -> None:
    """The benchmark's background load (POST /fake/churn) leaves other namespaces alone; its
    writes (POST /fake/objects, /fake/delete) return when each watch event was queued."""
    import urllib.error
    import urllib.request

    def post(body: Any, path: str = "/fake/churn") -> tuple[int, Any]:
        request = urllib.request.Request(
            api.server.url + path, data=json.dumps(body).encode(), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    started = time.time()
    status, body = post(
        [
            service("a", "10.43.6.1", namespace="churned"),
            service("b", "10.43.6.2", namespace="churned"),
        ],
        "/fake/objects",
    )
    assert status == 200
    assert len(body["resourceVersions"]) == len(body["writtenAt"]) == 2
    assert started <= body["writtenAt"][0] <= body["writtenAt"][1] <= time.time()
    assert body["writtenAt"][1] == api.call(lambda: api.server.history[-1].written_at)
    before = api.call(
        lambda: {
            k: v["metadata"]["resourceVersion"] for k, v in api.server.objects["services"].items()
        }
    )
    status, body = post({"count": 5, "rate": 0, "label": "x/at", "namespace": "churned"})
    assert (status, body["written"]) == (200, 5)
    after = api.call(lambda: dict(api.server.objects["services"]))
    changed = sorted(k for k, v in after.items() if v["metadata"]["resourceVersion"] != before[k])
    assert changed == [("churned", "a"), ("churned", "b")]
    assert float(after[("churned", "a")]["metadata"]["labels"]["x/at"]) > 0
    status, body = post({"count": 1, "namespace": "nowhere"})
    assert status == 404
    assert body["message"] == "no services to churn in namespace 'nowhere'"
    gone = [{"kind": "Service", "namespace": "churned", "name": n} for n in ("a", "nope")]
    status, body = post(gone, "/fake/delete")
    assert (status, body["deleted"], len(body["writtenAt"])) == (200, 1, 1)
    assert body["writtenAt"][0] == api.call(lambda: api.server.history[-1].written_at)
