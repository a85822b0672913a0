"""Cattle v2-beta resources, as the Cattle API returns them, become the right records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from node_services.sources.cattle import translate as translate_module
from node_services.sources.cattle.translate import ContainerMemo, resolve_stack_names, translate
from node_services.sources.errors import TranslateError, UnsupportedObject
from node_services.state import (
    Endpoint,
    Endpoints,
    Host,
    Port,
    Service,
    ServiceLink,
    Stack,
    Workload,
)
from node_services.state.records import WorkloadLink

FIXTURES = Path(__file__).parent.parent / "fixtures" / "cattle"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def scenario() -> dict[str, Any]:
    return {r["id"]: r for r in fixture("recorded-scenario.json")}


def test_host() -> None:
    [host] = translate(fixture("host.json"), "c")
    assert host == Host(
        key="cattle:host/1h1",
        source="c",
        name="node1",
        uuid="host-1",
        hostname="node1",
        addresses=("192.168.1.10",),
        public_ip="192.168.1.10",
        labels=(("zone", "a"),),
        state="active",
        memory=2048 * 1024 * 1024,
        milli_cpu=2000,
        agent_state="active",
        local_storage_mb=None,  # null in the resource: not reported
    )


def test_stack_and_the_older_environment_type() -> None:
    [stack] = translate(fixture("stack.json"), "c")
    assert stack == Stack(
        key="cattle:stack/1st5", source="c", name="Web", uuid="stack-1", state="active"
    )
    legacy = dict(fixture("stack.json"), type="environment")
    assert translate(legacy, "c") == [stack]


def test_service_with_sidekick_link_metadata_and_token() -> None:
    [service] = translate(scenario()["1s3"], "c")
    assert isinstance(service, Service)
    assert (service.key, service.name, service.stack_key, service.kind) == (
        "cattle:service/1s3",
        "nginx",
        "cattle:stack/1st5",
        "service",
    )
    assert service.namespace == ""  # filled by resolve_stack_names
    assert (service.cluster_ips, service.headless) == ((), True)  # no VIP: container IPs
    assert service.ports == (Port(name="", port=80, protocol="TCP", public_port=80),)
    assert service.links == (ServiceLink(target_key="cattle:service/1s4", alias="database"),)
    assert service.sidekicks == ("log",)
    assert service.scale == 2
    assert service.token == "s3cret"
    assert json.loads(service.metadata_json) == {"example": {"name": "hello", "value": "world"}}
    assert dict(service.labels) == {"app": "nginx", "io.rancher.sidekicks": "log"}


def test_service_vip_is_its_cluster_ip() -> None:
    obj = dict(scenario()["1s3"], vip="10.43.99.1")
    [service] = translate(obj, "c")
    assert (service.cluster_ips, service.headless) == (("10.43.99.1",), False)


def test_external_services_by_hostname_and_by_ips() -> None:
    [by_name] = translate(scenario()["1s5"], "c")
    assert (by_name.type, by_name.kind, by_name.external_name, by_name.headless) == (
        "ExternalName",
        "externalService",
        "www.example.com",
        False,
    )
    [by_ips] = translate(scenario()["1s7"], "c")
    assert (by_ips.type, by_ips.external_ips) == ("ClusterIP", ("127.0.0.50", "127.0.0.51"))


def test_alias_service_links_every_target() -> None:
    [alias] = translate(scenario()["1s6"], "c")
    assert alias.kind == "dnsService"
    assert alias.links == (
        ServiceLink(target_key="cattle:service/1s4", alias="db/mysql"),
        ServiceLink(target_key="cattle:service/1s3", alias="nginx"),
    )


def test_container_becomes_a_workload_and_an_endpoint_of_its_service() -> None:
    workload, endpoints = translate(scenario()["1i10"], "c")
    assert isinstance(workload, Workload)
    assert (workload.key, workload.name, workload.namespace) == (
        "cattle:container/1i10",
        "Web-nginx-1",
        "Web",
    )
    assert (workload.ips, workload.host_key, workload.stack_key) == (
        ("127.0.0.2",),
        "cattle:host/1h1",
        "cattle:stack/1st5",
    )
    assert (workload.state, workload.health_state, workload.ready) == ("running", "healthy", True)
    assert workload.service_keys == ("cattle:service/1s3",)
    assert (workload.create_index, workload.service_index) == (1, "1")
    assert workload.external_id == "dockerid1"
    assert workload.dns == ("169.254.169.250",)
    assert workload.launch_config == ""
    assert endpoints == Endpoints(
        key="cattle:endpoint/1s3/1i10",
        source="c",
        namespace="Web",
        service="",
        service_key="cattle:service/1s3",
        ports=(Port(name="", port=80, protocol="TCP", public_port=80),),
        endpoints=(
            Endpoint(
                addresses=("127.0.0.2",),
                hostname="Web-nginx-1",
                target_key="cattle:container/1i10",
            ),
        ),
    )


def test_sidekick_container_names_its_launch_config() -> None:
    workload, _ = translate(scenario()["1i13"], "c")
    assert workload.launch_config == "log"


def test_unhealthy_or_stopped_containers_are_not_ready() -> None:
    for change in ({"healthState": "unhealthy"}, {"state": "stopped"}):
        workload, endpoints = translate(dict(scenario()["1i10"], **change), "c")
        assert workload.ready is False
        assert endpoints.endpoints[0].ready is False


def test_removed_resources_become_nothing() -> None:
    assert translate(dict(scenario()["1i10"], state="removed"), "c") == []


def test_resolve_stack_names_fills_namespaces_and_service_names() -> None:
    records = [r for obj in fixture("recorded-scenario.json") for r in translate(obj, "c")]
    resolved = {r.key: r for r in resolve_stack_names(records)}
    assert resolved["cattle:service/1s3"].namespace == "Web"  # type: ignore[union-attr]
    assert resolved["cattle:service/1s4"].namespace == "db"  # type: ignore[union-attr]
    endpoint = resolved["cattle:endpoint/1s4/1i12"]
    assert isinstance(endpoint, Endpoints)
    assert (endpoint.namespace, endpoint.service) == ("db", "mysql")


def test_collection_items_translate_like_single_resources() -> None:
    collection = fixture("collection.json")
    assert collection["type"] == "collection"
    keys = [r.key for item in collection["data"] for r in translate(item, "c")]
    assert keys[0] == "cattle:container/1i10"


def test_unsupported_type_and_bad_fields_name_the_resource() -> None:
    with pytest.raises(UnsupportedObject, match=r"volume 1v2"):
        translate({"id": "1v2", "type": "volume"}, "c")
    with pytest.raises(TranslateError, match=r"container 1i10 \(Web-nginx-1\): primaryIpAddress"):
        translate(dict(scenario()["1i10"], primaryIpAddress="not-an-ip"), "c")
    with pytest.raises(TranslateError, match=r"ports\[0\]: 'eighty' is not a port spec"):
        translate(dict(scenario()["1i10"], ports=["eighty"]), "c")
    with pytest.raises(TranslateError, match=r"externalService 1s7 \(extip\): an external service"):
        translate(dict(scenario()["1s7"], externalIpAddresses=None), "c")


def test_container_links_ports_bound_to_an_address_and_sidekick_launch_configs() -> None:
    resources = {r["name"]: r for r in fixture("recorded-2/cattle-resources.json") if r.get("name")}
    [toolbox] = translate(resources["toolbox"], "c")
    assert isinstance(toolbox, Workload)
    assert toolbox.links == (
        WorkloadLink(alias="alerts", target_key="cattle:container/1i114"),
        WorkloadLink(alias="pg", target_key="cattle:container/1i109"),
    )
    assert (toolbox.create_index, toolbox.start_count, toolbox.hostname) == (0, 1, "toolbox")
    [web] = translate(resources["web"], "c")
    assert isinstance(web, Service)
    assert [(p.bind_ip, p.public_port, p.port) for p in web.ports] == [
        ("", 8080, 80),
        ("127.0.0.1", 9443, 443),
    ]
    [metrics] = web.launch_configs
    assert (metrics.name, metrics.labels, metrics.health_check_json) == (
        "metrics",
        (("component", "exporter"),),
        "",
    )
    assert [(p.port, p.public_port) for p in metrics.ports] == [(9102, 0)]
    assert json.loads(web.health_check_json)["request_line"] == "GET /healthz HTTP/1.0"


def test_container_links_become_workload_links() -> None:
    recorded = json.loads((FIXTURES / "recorded-2" / "cattle-resources.json").read_text())
    toolbox = next(r for r in recorded if r.get("name") == "toolbox")
    (workload,) = translate(toolbox, "c")
    assert isinstance(workload, Workload)
    assert workload.links == (
        WorkloadLink(alias="alerts", target_key="cattle:container/1i114"),
        WorkloadLink(alias="pg", target_key="cattle:container/1i109"),
    )
    (plain,) = translate({**toolbox, "instanceLinks": None}, "c")
    assert isinstance(plain, Workload) and plain.links == ()
    with pytest.raises(TranslateError, match="instanceLinks"):
        translate({**toolbox, "instanceLinks": {"pg": ["1i109"]}}, "c")


class _Recording(dict[str, Any]):
    """A resource that notes which fields are read."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


def _containers() -> list[dict[str, Any]]:
    objects = [fixture("container.json"), *fixture("recorded-scenario.json")]
    return [o for o in objects if o["type"] == "container"]


def test_the_container_memo_compares_every_field_a_translation_reads() -> None:
    """A field the translation read but the memo did not compare would be given stale."""
    volatile = {"primaryIpAddress", "state", "healthState", "id", "type", "removed"}
    for obj in _containers():
        recording = _Recording(obj)
        translate(recording, "c")
        assert recording.read - volatile <= set(translate_module._CONTAINER_FIELDS), obj["id"]


def test_the_container_memo_gives_what_a_fresh_translation_gives() -> None:
    memo = ContainerMemo()
    [obj] = [o for o in _containers() if o["id"] == fixture("container.json")["id"]][:1]
    variants: list[dict[str, Any]] = [
        obj,
        {**obj, "primaryIpAddress": "10.42.9.9"},
        {**obj, "state": "stopped", "healthState": "unhealthy"},
        {**obj, "primaryIpAddress": None},
        {**obj, "labels": {**obj.get("labels", {}), "x": 1}},
        # equal to the last one by ==, but translated differently ("1.0", "True")
        {**obj, "labels": {**obj.get("labels", {}), "x": 1.0}},
        {**obj, "labels": {**obj.get("labels", {}), "x": True}},
        {**obj, "transitioningMessage": "not read"},
        {**obj, "state": "removed"},
        obj,
        {**obj, "primaryIpAddress": "fd00::9"},  # another family: other endpoint groups
        {**obj, "primaryIpAddress": "10.42.9.8"},
        {**obj, "name": "renamed-3", "serviceIds": []},
        {**obj, "name": "renamed-3", "serviceIds": [], "primaryIpAddress": None},
        {**obj, "name": "renamed-3", "serviceIds": [], "primaryIpAddress": "10.42.9.7"},
    ]
    lazy = ContainerMemo()  # the live source's way: a Volatile for the volatile fields
    kinds = set()
    for _round in range(2):
        for variant in variants:
            fresh = translate(json.loads(json.dumps(variant)), "c")
            assert translate(json.loads(json.dumps(variant)), "c", memo) == fresh, variant
            change = translate_module.translate_change(json.loads(json.dumps(variant)), "c", lazy)
            if isinstance(change, translate_module.Volatile):
                kinds.add("volatile")
                change = change.records()
            assert list(change) == list(fresh), variant
    assert "volatile" in kinds
    assert len(memo) == 1
    memo.discard("cattle:container/" + obj["id"])
    assert len(memo) == 0


def test_the_container_memo_is_bounded() -> None:
    memo = ContainerMemo(max_entries=3)
    base = _containers()[0]
    for n in range(10):
        translate({**base, "id": f"1i9{n}"}, "c", memo)
        assert len(memo) <= 3


def test_the_container_memo_is_bounded_in_bytes() -> None:
    """It keeps each container's compared fields whole: their bytes are bounded too."""
    base = _containers()[0]
    one = ContainerMemo()
    translate(base, "c", one)
    form = one.size
    assert form > 0
    translate({**base, "primaryIpAddress": "10.42.9.9"}, "c", one)  # the same container
    assert (len(one), one.size) == (1, form)
    memo = ContainerMemo(max_bytes=3 * form)
    for n in range(10):
        translate({**base, "id": f"1i9{n}"}, "c", memo)
        assert memo.size <= 3 * form
        assert 1 <= len(memo) <= 3
    memo.discard("cattle:container/1i99")
    assert memo.size == (len(memo) * form)
