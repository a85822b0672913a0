"""Kubernetes objects, shaped as `kubectl get -o yaml` prints them, become the right records."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from node_services.sources.errors import TranslateError, UnsupportedObject
from node_services.sources.kube.translate import translate
from node_services.state import Endpoint, Endpoints, Host, Port, Service, Stack, Workload

FIXTURES = Path(__file__).parent.parent / "fixtures" / "kube"


def fixture(name: str) -> dict[str, Any]:
    data = yaml.safe_load((FIXTURES / name).read_text())
    assert isinstance(data, dict)
    return data


def one(obj: dict[str, Any]) -> Any:
    records = translate(obj, "test")
    assert len(records) == 1
    return records[0]


def test_namespace_becomes_a_stack() -> None:
    assert one(fixture("namespace.yaml")) == Stack(
        key="k8s:Namespace/default",
        source="test",
        name="default",
        uuid="58d6bab5-4ad6-473a-b693-c5bc3d3b7d29",
        labels=(("kubernetes.io/metadata.name", "default"),),
        state="active",
    )


def test_node_becomes_a_host_with_cidrs_addresses_and_overlay_annotations() -> None:
    host = one(fixture("node.yaml"))
    assert isinstance(host, Host)
    assert host.key == "k8s:Node/node-a"
    assert host.name == host.hostname == "node-a"
    assert host.addresses == ("192.168.10.11",)
    assert host.pod_cidrs == ("10.42.1.0/24", "fd00:42:1::/64")
    assert host.vtep_mac == "0a:58:0a:2a:01:01"
    assert host.public_ip == "192.168.10.11"
    assert host.state == "ready"
    assert host.memory == 8131480 * 1024
    assert host.milli_cpu == 4000
    assert ("topology.kubernetes.io/zone", "zone-a") in host.labels


def test_node_without_public_ip_annotation_uses_its_internal_ip() -> None:
    host = one(fixture("node-b.yaml"))
    assert (host.vtep_mac, host.public_ip) == ("", "192.168.10.12")


def test_node_with_only_the_legacy_pod_cidr_field() -> None:
    node = fixture("node-b.yaml")
    del node["spec"]["podCIDRs"]
    assert one(node).pod_cidrs == ("10.42.2.0/24",)


def test_dual_stack_clusterip_service() -> None:
    assert one(fixture("service-clusterip-dualstack.yaml")) == Service(
        key="k8s:Service/default/web",
        source="test",
        namespace="default",
        name="web",
        stack_key="k8s:Namespace/default",
        uuid="d2779fae-f570-4cb3-a757-7610efbba369",
        type="ClusterIP",
        cluster_ips=("10.43.0.10", "fd00:43::a"),
        ports=(
            Port(name="http", port=80, protocol="TCP", target_port="8080", app_protocol="http"),
            Port(name="dns", port=53, protocol="UDP", target_port="53"),
        ),
        selector=(("app", "web"),),
        labels=(("app", "web"),),
    )


def test_headless_service_has_no_cluster_ip() -> None:
    service = one(fixture("service-headless.yaml"))
    assert service.headless is True
    assert service.cluster_ips == ()
    assert service.publish_not_ready is False  # omitted when false, as the API prints it


def test_publish_not_ready_addresses() -> None:
    obj = fixture("service-headless.yaml")
    obj["spec"]["publishNotReadyAddresses"] = True
    assert one(obj).publish_not_ready is True


def test_external_name_service() -> None:
    service = one(fixture("service-externalname.yaml"))
    assert (service.type, service.external_name, service.cluster_ips, service.headless) == (
        "ExternalName",
        "www.example.com",
        (),
        False,
    )


def test_node_port_service_keeps_node_ports_and_named_target_ports() -> None:
    service = one(fixture("service-nodeport.yaml"))
    assert service.type == "NodePort"
    assert service.ports[0] == Port(
        name="http", port=80, protocol="TCP", target_port="http", node_port=30080
    )


def test_endpoint_slice_conditions_follow_the_api_defaults() -> None:
    group = one(fixture("endpointslice-web.yaml"))
    assert isinstance(group, Endpoints)
    assert (group.key, group.service, group.service_key, group.address_type) == (
        "k8s:EndpointSlice/default/web-abc12",
        "web",
        "k8s:Service/default/web",
        "IPv4",
    )
    assert group.endpoints == (
        Endpoint(
            addresses=("10.42.1.7",),
            node_name="node-a",
            target_key="k8s:Pod/default/web-7d4b9c-abcde",
            zone="zone-a",
        ),
        Endpoint(
            addresses=("10.42.2.8",),
            ready=False,
            serving=True,
            terminating=True,
            node_name="node-b",
            target_key="k8s:Pod/default/web-7d4b9c-fghij",
            zone="zone-b",
        ),
        # conditions: {} -> ready (unset means ready), serving = ready, not terminating
        Endpoint(
            addresses=("10.42.1.9",),
            ready=True,
            serving=True,
            terminating=False,
            node_name="node-a",
            target_key="k8s:Pod/default/web-7d4b9c-klmno",
            zone="zone-a",
        ),
    )
    assert group.ports == (
        Port(name="http", port=8080, protocol="TCP", app_protocol="http"),
        Port(name="dns", port=53, protocol="UDP"),
    )


def test_endpoint_slice_hostnames_and_ipv6() -> None:
    db = one(fixture("endpointslice-db.yaml"))
    assert [(e.hostname, e.addresses) for e in db.endpoints] == [
        ("db-0", ("10.42.2.6",)),
        ("db-1", ("10.42.1.5",)),
    ]
    v6 = one(fixture("endpointslice-web-ipv6.yaml"))
    assert v6.address_type == "IPv6"
    assert [e.addresses for e in v6.endpoints] == [
        ("fd00:42:1::7",),
        ("fd00:42:2::8",),
        ("fd00:42:1::9",),
    ]


def test_ipv6_addresses_are_stored_in_canonical_form() -> None:
    obj = fixture("endpointslice-web-ipv6.yaml")
    obj["endpoints"][0]["addresses"] = ["FD00:0042:0001:0000:0000:0000:0000:0007"]
    assert one(obj).endpoints[0].addresses == ("fd00:42:1::7",)


def test_pod_becomes_a_workload_with_both_families() -> None:
    workload = one(fixture("pod.yaml"))
    assert isinstance(workload, Workload)
    assert workload.key == "k8s:Pod/default/web-7d4b9c-abcde"
    assert workload.ips == ("10.42.1.7", "fd00:42:1::7")
    assert (workload.host_key, workload.node_name) == ("k8s:Node/node-a", "node-a")
    assert (workload.state, workload.ready) == ("running", True)
    assert dict(workload.labels) == {"app": "web", "pod-template-hash": "7d4b9c"}


def test_pod_hostname_and_subdomain() -> None:
    workload = one(fixture("pod-hostname.yaml"))
    assert (workload.hostname, workload.subdomain, workload.ips) == ("db-0", "db", ("10.42.2.6",))


def test_unsupported_kind_is_reported_as_such() -> None:
    with pytest.raises(UnsupportedObject, match=r"ConfigMap default/cfg: kind 'ConfigMap'"):
        translate(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "cfg", "namespace": "default"},
            },
            "t",
        )


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            ("spec", "clusterIPs"),
            ["10.43.0.300"],
            r"spec.clusterIPs\[0\]: '10.43.0.300' is not an IP",
        ),
        (("spec", "ports", 0, "port"), "http", r"spec.ports\[0\].port: expected an integer"),
        (("spec", "ports", 1, "protocol"), "ICMP", r"spec.ports\[1\].protocol: 'ICMP' is not"),
        (("spec", "type"), "Magic", r"spec.type: unknown type 'Magic'"),
        (("metadata", "name"), None, r"metadata.name: missing"),
    ],
)
def test_malformed_service_names_the_object_and_the_field(
    path: tuple[Any, ...], value: Any, message: str
) -> None:
    obj = copy.deepcopy(fixture("service-clusterip-dualstack.yaml"))
    target = obj
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(TranslateError, match=message) as error:
        translate(obj, "t")
    if value is not None:
        assert str(error.value).startswith("Service default/web: ")


def test_endpoint_slice_without_addresses_is_rejected() -> None:
    obj = fixture("endpointslice-db.yaml")
    obj["endpoints"][1]["addresses"] = []
    with pytest.raises(TranslateError, match=r"EndpointSlice default/db-xyz34: endpoints\[1\]"):
        translate(obj, "t")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda e: e.update(addresses=["10.42.1.9", "nope"]), "addresses[1]: 'nope' is not an IP"),
        (lambda e: e.update(addresses=[]), "addresses: at least one address is required"),
        (lambda e: e.update(addresses="10.42.1.9"), "addresses: expected a list, got str"),
        (lambda e: e.update(conditions=[]), "conditions: expected a mapping, got list"),
        (lambda e: e.update(conditions={"ready": "yes"}), "conditions.ready: expected true or"),
        (lambda e: e.update(conditions={"serving": 1}), "conditions.serving: expected true or"),
        (lambda e: e.update(targetRef={"kind": "Pod", "name": 7.5j}), "targetRef.name: expected"),
        (lambda e: e.update(nodeName=["a"]), "nodeName: expected a string, got list"),
    ],
)
def test_a_bad_endpoint_field_is_named_with_its_index(change: Any, reason: str) -> None:
    obj = copy.deepcopy(fixture("endpointslice-db.yaml"))
    change(obj["endpoints"][1])
    with pytest.raises(TranslateError) as error:
        translate(obj, "t")
    assert str(error.value).startswith(f"EndpointSlice default/db-xyz34: endpoints[1].{reason}")


def test_an_endpoint_that_is_no_mapping_is_named() -> None:
    obj = copy.deepcopy(fixture("endpointslice-db.yaml"))
    obj["endpoints"][0] = "10.42.1.9"
    with pytest.raises(TranslateError) as error:
        translate(obj, "t")
    assert str(error.value) == (
        "EndpointSlice default/db-xyz34: endpoints[0]: expected a mapping, got str"
    )


def test_endpoint_slice_without_a_service_is_skipped() -> None:
    obj = fixture("endpointslice-db.yaml")
    del obj["metadata"]["labels"]["kubernetes.io/service-name"]
    with pytest.raises(UnsupportedObject):
        translate(obj, "t")


def test_strings_repeated_across_records_are_interned() -> None:
    a = one(fixture("endpointslice-web.yaml"))
    b = one(fixture("endpointslice-web-ipv6.yaml"))
    assert a.namespace is b.namespace
    assert a.endpoints[0].node_name is b.endpoints[0].node_name
    assert a.service_key is b.service_key


@pytest.mark.parametrize("address", ["010.42.1.7", "².1.1.1", "10.42.1", "10.42.1.256"])
def test_odd_ipv4_text_is_a_translate_error_not_a_crash(address: str) -> None:
    obj = fixture("endpointslice-db.yaml")
    obj["endpoints"][0]["addresses"] = [address]
    with pytest.raises(TranslateError, match=r"endpoints\[0\].addresses\[0\]: .* is not an IP"):
        translate(obj, "t")


def test_non_ascii_digits_in_a_port_are_a_translate_error() -> None:
    obj = fixture("service-headless.yaml")
    obj["spec"]["ports"][0]["port"] = "²"
    with pytest.raises(TranslateError, match=r"spec.ports\[0\].port: expected an integer"):
        translate(obj, "t")
