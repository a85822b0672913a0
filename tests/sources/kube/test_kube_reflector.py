"""The Kubernetes source against the test API server: what reaches the store, and when."""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import ssl
import time
from typing import Any

import pytest
from fakes.kube_apiserver import FakeKubeAPIServer
from fakes.kube_helpers import fixture_objects, service, wait_until
from prometheus_client import CollectorRegistry

from node_services.sources.kube.client import KubeAPIError, KubeClient, load_connection
from node_services.sources.kube.reflector import Backoff, Reflector, Resource
from node_services.state import store as store_module
from node_services.state.records import Host, Service
from node_services.state.store import Store

SERVICES = Resource("services", "Service", "v1")


async def test_initial_sync_lists_every_resource_in_pages(make_harness: Any) -> None:
    kube = await make_harness(page_size=2)
    await kube.synced()
    snap = kube.store.snapshot
    assert dict(snap.synced) == {
        "kubernetes:namespaces": True,
        "kubernetes:nodes": True,
        "kubernetes:services": True,
        "kubernetes:endpointslices": True,
        "kubernetes:pods": True,
    }
    assert sorted(snap.services) == [
        "k8s:Service/default/db",
        "k8s:Service/default/search",
        "k8s:Service/default/web",
        "k8s:Service/kube-system/ingress",
    ]
    web = snap.service("default", "web")
    assert web is not None
    assert web.cluster_ips == ("10.43.0.10", "fd00:43::a")
    assert web.source == "kubernetes:services"
    assert sorted(snap.endpoints) == [
        "k8s:EndpointSlice/default/db-xyz34",
        "k8s:EndpointSlice/default/web-abc12",
        "k8s:EndpointSlice/default/web-v6k9p",
    ]
    assert [e.addresses for e in snap.endpoints_for("k8s:Service/default/web")[0].endpoints] == [
        ("10.42.1.7",),
        ("10.42.2.8",),
        ("10.42.1.9",),
    ]
    assert sorted(snap.hosts) == ["k8s:Node/node-a", "k8s:Node/node-b"]
    assert sorted(snap.stacks) == ["k8s:Namespace/default"]
    # Pods of this node only: db-0 runs on node-b.
    assert sorted(snap.workloads) == ["k8s:Pod/default/web-7d4b9c-abcde"]
    # Paged: 4 services with limit=2 took two requests but one list.
    pages = [q for m, p, q in kube.server.requests if p == "/api/v1/services" and "watch" not in q]
    assert [q.get("continue", "") != "" for q in pages] == [False, True]
    assert all(q["limit"] == "2" for q in pages)
    assert kube.server.list_count["services"] == 1
    pod_lists = [q for m, p, q in kube.server.requests if p == "/api/v1/pods"]
    assert {q["fieldSelector"] for q in pod_lists} == {"spec.nodeName=node-a"}


async def test_live_added_modified_deleted_reach_the_store(make_harness: Any) -> None:
    kube = await make_harness()
    await kube.synced()
    server: FakeKubeAPIServer = kube.server

    server.put(service("api", "10.43.7.7"))
    api = await wait_until(lambda: kube.store.snapshot.service("default", "api"), what="ADDED")
    assert isinstance(api, Service)
    assert api.cluster_ips == ("10.43.7.7",)
    assert [p.port for p in api.ports] == [80]

    changed = service("api", "10.43.7.7", tier="backend")
    changed["spec"]["ports"][0]["port"] = 8443
    server.put(changed)
    api = await wait_until(
        lambda: (s := kube.store.snapshot.service("default", "api")) and s.ports[0].port == 8443,
        what="MODIFIED",
    )
    assert kube.store.snapshot.service("default", "api").labels == (("tier", "backend"),)

    slice_obj = copy.deepcopy(server.objects["endpointslices"][("default", "web-abc12")])
    slice_obj["kind"] = "EndpointSlice"
    slice_obj["endpoints"] = slice_obj["endpoints"][:1]
    server.put(slice_obj)
    await wait_until(
        lambda: (
            len(kube.store.snapshot.endpoints["k8s:EndpointSlice/default/web-abc12"].endpoints) == 1
        ),
        what="slice MODIFIED",
    )

    server.delete("Service", "default", "api")
    await wait_until(
        lambda: kube.store.snapshot.service("default", "api") is None, what="DELETED service"
    )
    server.delete("EndpointSlice", "default", "db-xyz34")
    await wait_until(
        lambda: "k8s:EndpointSlice/default/db-xyz34" not in kube.store.snapshot.endpoints,
        what="DELETED slice",
    )
    server.delete("Node", "", "node-b")
    await wait_until(lambda: "k8s:Node/node-b" not in kube.store.snapshot.hosts, what="node")
    assert server.list_count["services"] == 1  # all of it over the first watch


async def test_events_that_arrive_together_are_applied_as_one_batch(make_harness: Any) -> None:
    kube = await make_harness()
    await kube.synced()
    before = kube.store.version
    for i in range(300):  # no await in between: the server writes them as one chunk
        kube.server.put(service(f"batch-{i}", f"10.43.9.{i % 250}"))
    await wait_until(lambda: kube.store.snapshot.service("default", "batch-299"), what="batch")
    assert sum(1 for k in kube.store.snapshot.services if "/batch-" in k) == 300
    assert kube.store.version - before <= 5


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
async def test_delete_while_watch_down_and_compacted_is_gone_after_relist(
    make_harness: Any, gone_as_http: bool
) -> None:
    kube = await make_harness()
    await kube.synced()
    server: FakeKubeAPIServer = kube.server
    server.faults.gone_as_http = gone_as_http
    assert kube.store.snapshot.service("default", "db") is not None

    server.faults.fail_next = 10**6  # the API server is unreachable for a while
    server.drop_watches()
    await wait_until(lambda: not server.watchers, what="watches dropped")
    server.delete("Service", "default", "db")
    server.put(service("late", "10.43.8.8"))
    server.compact()  # ... and the history of that gap is gone
    server.faults.fail_next = 0

    await wait_until(lambda: server.list_count["services"] == 2, what="relist", within=10)
    await wait_until(
        lambda: kube.store.snapshot.service("default", "db") is None, what="db removed by relist"
    )
    snap = kube.store.snapshot
    assert snap.service("default", "late") is not None
    assert snap.service("default", "web") is not None
    assert snap.synced["kubernetes:services"] is True
    assert len(snap.hosts) == 2  # the other resources relisted too (compaction is global)
    await wait_until(lambda: all(server.list_count[r] == 2 for r in server.list_count))


async def test_a_large_relist_is_merged_off_the_loop_and_removes_what_vanished(
    make_harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    many = [service(f"s{i}", f"10.44.{i // 250}.{i % 250 + 1}") for i in range(1200)]
    kube = await make_harness(objects=[*fixture_objects(), *many], page_size=500)
    await kube.synced()
    server: FakeKubeAPIServer = kube.server
    store: Store = kube.store
    assert len(store.snapshot.services) == 1204
    replaced_async = 0
    original = store_module._plan_replace  # runs only in replace_async's worker thread

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal replaced_async
        replaced_async += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(store_module, "_plan_replace", counting)
    server.faults.fail_next = 10**6
    server.drop_watches()
    await wait_until(lambda: not server.watchers, what="watches dropped")
    server.delete("Service", "default", "s7")
    server.compact()
    server.faults.fail_next = 0
    await wait_until(lambda: server.list_count["services"] == 2, what="relist", within=10)
    await wait_until(lambda: store.snapshot.service("default", "s7") is None, what="s7 removed")
    snap = store.snapshot
    assert len(snap.services) == 1203
    assert snap.service("default", "s8") is not None
    assert snap.synced["kubernetes:services"] is True
    assert replaced_async >= 1  # the 1,203-service relist took the worker-thread path


async def test_dropped_connection_resumes_from_last_resource_version(make_harness: Any) -> None:
    kube = await make_harness()
    await kube.synced()
    server: FakeKubeAPIServer = kube.server
    server.put(service("before-drop", "10.43.5.1"))
    await wait_until(lambda: kube.store.snapshot.service("default", "before-drop"), what="add")
    last_rv = kube.rv_of("Service", "default", "before-drop")

    assert server.drop_watches() == 5
    server.put(service("during-drop", "10.43.5.2"))
    await wait_until(lambda: kube.store.snapshot.service("default", "during-drop"), what="resume")

    service_watches = [
        q for m, p, q in server.requests if p == "/api/v1/services" and q.get("watch") == "true"
    ]
    assert len(service_watches) == 2
    assert service_watches[1]["resourceVersion"] == last_rv
    assert service_watches[1]["allowWatchBookmarks"] == "true"
    assert 300 <= int(service_watches[1]["timeoutSeconds"]) <= 600
    assert server.list_count["services"] == 1  # no relist


async def test_clean_close_rewatches_without_relist(make_harness: Any) -> None:
    kube = await make_harness(watch_timeout=(1, 1), server_options={"bookmark_interval": 0.2})
    await kube.synced()
    server: FakeKubeAPIServer = kube.server
    first_rv = server.rv
    server.put({"kind": "Namespace", "metadata": {"name": "other"}})  # moves the global rv
    await wait_until(lambda: server.watch_count["services"] >= 3, what="rewatches", within=5)
    server.put(service("after-timeouts", "10.43.5.3"))
    await wait_until(lambda: kube.store.snapshot.service("default", "after-timeouts"), what="add")
    assert server.list_count["services"] == 1
    rvs = [
        q["resourceVersion"]
        for m, p, q in server.requests
        if p == "/api/v1/services" and q.get("watch") == "true"
    ]
    # Bookmarks advance the resourceVersion a quiet watch resumes from.
    assert rvs[0] == str(first_rv)
    assert int(rvs[-1]) > first_rv


async def test_stalled_stream_is_detected_by_the_read_timeout(
    make_harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    kube = await make_harness(read_timeout=0.5, registry=registry)
    await kube.synced()
    server: FakeKubeAPIServer = kube.server
    server.faults.stall = True  # connection open, nothing sent
    server.put(service("stalled", "10.43.6.6"))
    started = time.monotonic()
    await wait_until(lambda: server.watch_count["services"] == 2, what="reconnect", within=5)
    assert 0.4 < time.monotonic() - started < 3
    server.faults.stall = False
    await wait_until(lambda: kube.store.snapshot.service("default", "stalled"), what="event")
    assert server.list_count["services"] == 1
    assert "kubernetes:services: watch sent nothing for 0.5s; reconnecting" in caplog.text
    value = registry.get_sample_value(
        "node_services_kube_errors_total", {"resource": "services", "reason": "read_timeout"}
    )
    assert value is not None and value >= 1


async def test_stalled_list_times_out_and_is_retried(make_harness: Any) -> None:
    kube = await make_harness(start=False, read_timeout=0.3)
    kube.server.faults.hold_lists = ["services"]
    kube.start()
    await wait_until(
        lambda: sum(1 for m, p, q in kube.server.requests if p == "/api/v1/services") >= 2,
        what="retried list",
    )
    assert not kube.store.snapshot.synced["kubernetes:services"]
    kube.server.faults.hold_lists = []
    await kube.synced()
    assert kube.store.snapshot.service("default", "web") is not None


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(initial=0.8, maximum=30.0, jitter=0.5, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    bases = [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    for delay, base in zip(delays, bases, strict=True):
        assert base <= delay <= min(30.0, base * 1.5)
    assert delays[:6] != bases[:6]  # jittered
    backoff.reset()
    assert 0.8 <= backoff.next_delay() <= 1.2


async def test_reflector_backs_off_on_errors_and_resets_after_success(tmp_path: Any) -> None:
    server = await FakeKubeAPIServer().start()
    try:
        server.put(service("web", "10.43.0.10"))
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(server.kubeconfig())
        store = Store()
        backoff = Backoff(initial=0.02, maximum=0.16, jitter=0.5, rng=random.Random(1))
        async with KubeClient(await load_connection(kubeconfig)) as client:
            reflector = Reflector(client, store, SERVICES, backoff=backoff)
            server.faults.fail_next = 5
            task = asyncio.create_task(reflector.run())
            try:
                await wait_until(lambda: store.snapshot.synced.get("kubernetes:services"))
                first = list(backoff.history)
                assert len(first) == 5
                for delay, base in zip(first, [0.02, 0.04, 0.08, 0.16, 0.16], strict=True):
                    assert base <= delay <= min(0.16, base * 1.5)
                assert backoff.failures == 0  # reset by the successful list
                # The watch opens after the list: cut it only once it is open, else the
                # injected failure would hit the first watch request instead.
                await wait_until(lambda: len(server.watchers) == 1, what="watch open")
                server.faults.fail_next = 1
                assert server.drop_watches() == 1
                await wait_until(lambda: len(backoff.history) == 6)
                assert 0.02 <= backoff.history[5] <= 0.03  # started over
                await wait_until(lambda: server.watch_count["services"] == 2)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await server.stop()


async def test_429_waits_for_retry_after(make_harness: Any) -> None:
    kube = await make_harness(start=False, backoff=(0.01, 0.05))
    kube.server.faults.throttle_next = 1
    kube.server.faults.retry_after = 1
    started = time.monotonic()
    kube.start()
    await kube.synced()
    assert time.monotonic() - started >= 0.95  # not the 0.01 s backoff


async def test_malformed_object_is_skipped_and_logged_by_name(
    make_harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bad = service("broken", "10.43.300.1")  # not an IP
    registry = CollectorRegistry()
    kube = await make_harness(objects=[bad, service("fine", "10.43.1.1")], registry=registry)
    with caplog.at_level(logging.ERROR):
        await kube.synced()
        assert sorted(kube.store.snapshot.services) == ["k8s:Service/default/fine"]
        assert "skipped invalid object Service default/broken" in caplog.text
        # Over the watch too; and a valid object that turns invalid stops being served.
        worse = service("fine", "not-an-ip")
        kube.server.put(worse)
        kube.server.put(service("after", "10.43.1.2"))
        await wait_until(lambda: kube.store.snapshot.service("default", "after"), what="after")
    assert kube.store.snapshot.service("default", "fine") is None
    assert "skipped invalid object Service default/fine" in caplog.text
    assert (
        registry.get_sample_value(
            "node_services_kube_invalid_objects_total", {"resource": "services"}
        )
        == 2
    )


async def test_all_pods_are_listed_when_pod_records_are_verified(make_harness: Any) -> None:
    kube = await make_harness(all_pods=True)
    await kube.synced()
    assert sorted(kube.store.snapshot.workloads) == [
        "k8s:Pod/default/db-0",
        "k8s:Pod/default/web-7d4b9c-abcde",
    ]
    pod_lists = [q for m, p, q in kube.server.requests if p == "/api/v1/pods"]
    assert all("fieldSelector" not in q for q in pod_lists)


async def test_pod_moving_off_this_node_leaves_the_store(make_harness: Any) -> None:
    kube = await make_harness()
    await kube.synced()
    pod = copy.deepcopy(kube.server.objects["pods"][("default", "web-7d4b9c-abcde")])
    pod["kind"] = "Pod"
    pod["spec"]["nodeName"] = "node-b"  # the selector now excludes it: the watch says DELETED
    kube.server.put(pod)
    await wait_until(lambda: not kube.store.snapshot.workloads, what="pod gone")


async def test_patch_node_annotations_retries_on_conflict(make_harness: Any) -> None:
    kube = await make_harness()
    await kube.synced()
    kube.server.faults.conflict_next = 2
    result = await kube.source.patch_node_annotations(
        {"node-services.io/vtep-mac": "AA:BB:CC:00:11:22"}
    )
    assert result["metadata"]["annotations"]["node-services.io/vtep-mac"] == "AA:BB:CC:00:11:22"
    patches = [(m, p) for m, p, q in kube.server.requests if m == "PATCH"]
    assert patches == [("PATCH", "/api/v1/nodes/node-a")] * 3
    host = await wait_until(
        lambda: next(
            (h for h in kube.store.snapshot.hosts.values() if h.vtep_mac == "aa:bb:cc:00:11:22"),
            None,
        ),
        what="annotation in the store",
    )
    assert isinstance(host, Host)
    assert host.vtep_mac == "aa:bb:cc:00:11:22"
    # Removing it: null in a merge patch.
    await kube.source.patch_node_annotations({"node-services.io/vtep-mac": None})
    stored = kube.server.objects["nodes"][("", "node-a")]["metadata"]
    assert "node-services.io/vtep-mac" not in stored.get("annotations", {})


async def test_bearer_token_is_reread_when_it_rotates(make_harness: Any, tmp_path: Any) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("token-one\n")
    server = await FakeKubeAPIServer(tokens={"token-one"}).start()
    try:
        server.put(service("web", "10.43.0.10"))
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(server.kubeconfig(token_file=str(token_file)))
        store = Store()
        async with KubeClient(await load_connection(kubeconfig)) as client:
            reflector = Reflector(client, store, SERVICES, backoff=Backoff(0.02, 0.1))
            task = asyncio.create_task(reflector.run())
            try:
                await wait_until(lambda: store.snapshot.synced.get("kubernetes:services"))
                await wait_until(lambda: len(server.watchers) == 1, what="watch open")
                # The kubelet rotates the token: the old one stops working.
                token_file.write_text("token-two\n")
                server.tokens = {"token-two"}
                server.drop_watches()
                server.put(service("after-rotation", "10.43.0.11"))
                await wait_until(lambda: store.snapshot.service("default", "after-rotation"))
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        auth_failures = [r for r in server.requests if r[1] == "/api/v1/services"]
        assert len(auth_failures) >= 3  # list, watch, rejected watch, accepted watch
    finally:
        await server.stop()


async def test_in_cluster_config_uses_the_service_account(tmp_path: Any) -> None:
    from kubernetes.config.incluster_config import InClusterConfigLoader

    token, ca, key = tmp_path / "token", tmp_path / "ca.crt", tmp_path / "ca.key"
    token.write_text("sa-token")
    openssl = await asyncio.create_subprocess_exec(
        *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
        *("-subj", "/CN=kubernetes", "-keyout", str(key), "-out", str(ca)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await openssl.wait() == 0
    loader = InClusterConfigLoader(
        token_filename=str(token),
        cert_filename=str(ca),
        environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"},
    )
    connection = await load_connection(None, incluster_loader=loader)
    assert connection.host == "https://127.0.0.1:6443"
    assert connection.ssl_context is not None
    assert connection.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert await connection.token.header() == "Bearer sa-token"
    token.write_text("sa-token-rotated")
    assert await connection.token.header(force=True) == "Bearer sa-token-rotated"


async def test_unreadable_kubeconfig_is_a_clear_error(tmp_path: Any) -> None:
    broken = tmp_path / "kubeconfig"
    broken.write_text("clusters: []\n")
    with pytest.raises(KubeAPIError) as info:
        await load_connection(broken)
    assert str(broken) in str(info.value)


async def test_bad_kubeconfig_is_logged_and_retried_not_fatal(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from node_services.sources.kube.source import KubeSource

    broken = tmp_path / "kubeconfig"
    broken.write_text("clusters: []\n")
    store = Store()
    source = KubeSource(store, kubeconfig=broken, node_name="node-a", backoff=(0.02, 0.05))
    task = asyncio.create_task(source.run())
    try:
        await wait_until(lambda: caplog.text.count(f"kubernetes: {broken}:") >= 2, what="retries")
        assert not task.done()
        assert not store.snapshot.all_synced
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_in_cluster_over_tls_with_the_service_account(tmp_path: Any) -> None:
    """The in-cluster path end to end: HTTPS verified against the service account's CA,
    the token from its file, the host from KUBERNETES_SERVICE_HOST/PORT."""
    from kubernetes.config.incluster_config import InClusterConfigLoader

    ca, key = tmp_path / "ca.crt", tmp_path / "server.key"
    openssl = await asyncio.create_subprocess_exec(
        *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
        *("-subj", "/CN=kube-apiserver", "-addext", "subjectAltName=IP:127.0.0.1"),
        *("-keyout", str(key), "-out", str(ca)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await openssl.wait() == 0
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(ca, key)
    server = await FakeKubeAPIServer(tokens={"sa-token"}, ssl_context=server_tls).start()
    try:
        server.put(service("web", "10.43.0.10"))
        token = tmp_path / "token"
        token.write_text("sa-token")
        loader = InClusterConfigLoader(
            token_filename=str(token),
            cert_filename=str(ca),
            environ={
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(server.port),
            },
        )
        connection = await load_connection(None, incluster_loader=loader)
        assert connection.host == f"https://127.0.0.1:{server.port}"
        store = Store()
        async with KubeClient(connection) as client:
            reflector = Reflector(client, store, SERVICES, backoff=Backoff(0.02, 0.1))
            task = asyncio.create_task(reflector.run())
            try:
                await wait_until(lambda: store.snapshot.service("default", "web"), what="sync")
                server.put(service("api", "10.43.0.11"))
                await wait_until(lambda: store.snapshot.service("default", "api"), what="watch")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await server.stop()


async def _self_signed(tmp_path: Any, name: str, san: str | None = None) -> tuple[Any, Any]:
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    extra = ("-addext", f"subjectAltName={san}") if san else ()
    openssl = await asyncio.create_subprocess_exec(
        *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
        *("-subj", f"/CN={name}", *extra, "-keyout", str(key), "-out", str(cert)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await openssl.wait() == 0
    return cert, key


async def test_kubeconfig_with_client_certificates_over_mutual_tls(tmp_path: Any) -> None:
    server_cert, server_key = await _self_signed(tmp_path, "apiserver", "IP:127.0.0.1")
    client_cert, client_key = await _self_signed(tmp_path, "node-services")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(server_cert, server_key)
    server_tls.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no connection
    server_tls.load_verify_locations(client_cert)
    server = await FakeKubeAPIServer(ssl_context=server_tls).start()
    try:
        server.put(service("web", "10.43.0.10"))
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
            f"clusters: [{{name: c, cluster: {{server: '{server.url}', "
            f"certificate-authority: {server_cert}}}}}]\n"
            f"users: [{{name: u, user: {{client-certificate: {client_cert}, "
            f"client-key: {client_key}}}}}]\n"
            "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
        )
        store = Store()
        async with KubeClient(await load_connection(kubeconfig)) as client:
            reflector = Reflector(client, store, SERVICES, backoff=Backoff(0.02, 0.1))
            task = asyncio.create_task(reflector.run())
            try:
                await wait_until(lambda: store.snapshot.service("default", "web"), what="sync")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await server.stop()


def _node(name: str, cpu: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "spec": {"podCIDRs": []},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "192.168.10.50"}],
            "capacity": {"cpu": cpu, "memory": "1Gi"},
        },
    }


async def test_objects_whose_translation_raises_anything_are_rejected_and_the_reflector_goes_on(
    make_harness: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "nan" and "inf" quantities once ended the reflector task (ValueError, OverflowError);
    # an object that makes translation run out of memory must not either.
    from node_services.sources.guard import Rejections
    from node_services.sources.kube import translate as kube_translate

    real = kube_translate.translate

    def exploding(obj: Any, source: str) -> Any:
        if obj["metadata"]["name"].startswith("boom"):
            raise MemoryError
        return real(obj, source)

    monkeypatch.setattr(kube_translate, "translate", exploding)
    registry = CollectorRegistry()
    objects = [_node("nan-node", "nan"), _node("inf-node", "inf"), _node("boom-1", "2")]
    kube = await make_harness(
        objects=[*objects, _node("good-1", "2")], rejections=Rejections(registry)
    )
    with caplog.at_level(logging.ERROR):
        await kube.synced()
        assert sorted(kube.store.snapshot.hosts) == ["k8s:Node/good-1"]
        # over the watch too: the same objects again, then a good one still arrives
        for obj in (_node("inf-2", "-inf"), _node("nan-2", "NaN"), _node("boom-2", "1")):
            kube.server.put(obj)
        kube.server.put(_node("good-2", "500m"))
        await wait_until(lambda: "k8s:Node/good-2" in kube.store.snapshot.hosts, what="good-2")
    assert sorted(kube.store.snapshot.hosts) == ["k8s:Node/good-1", "k8s:Node/good-2"]
    good = kube.store.snapshot.hosts["k8s:Node/good-2"]
    assert isinstance(good, Host) and good.milli_cpu == 500
    text = caplog.text
    for name in ("nan-node", "inf-node", "inf-2", "nan-2"):
        assert f"skipped invalid object Node {name}: status.capacity.cpu:" in text
    for name in ("boom-1", "boom-2"):
        assert f"skipped invalid object Node {name}: ran out of memory while processing it" in text
    assert all(task.done() is False for task in kube.tasks)
    assert (
        registry.get_sample_value(
            "node_services_source_rejected_objects_total", {"source": "kubernetes:nodes"}
        )
        == 6
    )


async def test_an_unexpected_failure_of_a_list_is_retried_not_fatal(
    make_harness: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node_services.sources.guard import Rejections

    real = KubeClient.get_json
    failures: list[str] = []

    async def failing_once(self: KubeClient, path: str, params: Any = None) -> Any:
        if path.endswith("/nodes") and not failures:
            failures.append(path)
            raise MemoryError
        return await real(self, path, params)

    monkeypatch.setattr(KubeClient, "get_json", failing_once)
    registry = CollectorRegistry()
    with caplog.at_level(logging.ERROR):
        kube = await make_harness(rejections=Rejections(registry))
        await kube.synced()
    assert failures == ["/api/v1/nodes"]
    assert sorted(kube.store.snapshot.hosts) == ["k8s:Node/node-a", "k8s:Node/node-b"]
    assert (
        "kubernetes:nodes: list/watch failed: ran out of memory while processing it (MemoryError)"
        in caplog.text
    )
    labels = {"source": "kubernetes:nodes", "reason": "error"}
    assert registry.get_sample_value("node_services_source_rejected_loads_total", labels) == 1
