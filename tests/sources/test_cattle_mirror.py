"""The live mirror resolves per change exactly what translate.resolve gives for the whole
set: checked after every step of a random sequence of creates, updates and removals."""

from __future__ import annotations

import copy
import json
import operator
import random
from collections import Counter
from typing import Any

from fakes.cattle_server import read_fixture
from helpers import FIXTURES

from node_services.sources.cattle import translate
from node_services.sources.cattle.mirror import Mirror
from node_services.state.records import Change, Deleted, Host, Record, Service, Workload, label

SCENARIO = read_fixture(FIXTURES / "cattle" / "recorded-scenario.json")
NETWORK = {
    "id": "1n3",
    "type": "network",
    "kind": "cni",
    "state": "active",
    "name": "ipsec",
    "uuid": "uuid-ipsec",
    "subnets": [{"type": "subnet", "networkAddress": "10.42.0.0/16"}],
}
# A second network and a project naming the default, certificates and a load balancer whose
# lbConfig names services and certificates: what the rancher-metadata post-passes resolve.
EXTRA: list[dict[str, Any]] = [
    {
        "id": "1n4",
        "type": "network",
        "kind": "cni",
        "state": "active",
        "name": "flannel",
        "uuid": "uuid-flannel",
        "subnets": [{"type": "subnet", "networkAddress": "10.9.0.0/16"}],
    },
    {"id": "1a5", "type": "project", "defaultNetworkId": "1n3"},
    {"id": "1c1", "type": "certificate", "name": "www"},
    {"id": "1c2", "type": "certificate", "name": "api"},
    {
        "id": "1s8",
        "type": "loadBalancerService",
        "name": "lb",
        "stackId": "1st5",
        "launchConfig": {},
        "lbConfig": {
            "certificateIds": ["1c1", "1c2", "1c9"],
            "defaultCertificateId": "1c1",
            "portRules": [
                {"serviceId": "1s3", "sourcePort": 80, "targetPort": 8080, "protocol": "http"},
                {"serviceId": "1s4", "sourcePort": 3306, "targetPort": 3306, "protocol": "tcp"},
                {"serviceId": "1s8", "sourcePort": 81, "targetPort": 81, "protocol": "http"},
            ],
        },
    },
]
ALL = [*SCENARIO, NETWORK, *EXTRA]
for _obj in ALL:  # containers on a network: Workload.network_uuid is its uuid
    if _obj["type"] == "container":
        _obj["primaryNetworkId"] = "1n3"


def items_of(
    obj: dict[str, Any], memo: translate.ContainerMemo | None = None
) -> tuple[str, tuple[translate.Translated, ...]]:
    """The items of one object (through the live source's memo when given: ``expected``
    translates without it)."""
    items = translate.translate(json.loads(json.dumps(obj)) if memo else obj, "cattle", memo)
    return translate.key(obj["type"], obj["id"]), tuple(items)


def change_of(
    obj: dict[str, Any], memo: translate.ContainerMemo
) -> tuple[str, tuple[translate.Translated, ...] | translate.Volatile]:
    """What the live source gives the mirror for an event: the items, or a Volatile."""
    items = translate.translate_change(json.loads(json.dumps(obj)), "cattle", memo)
    key = translate.key(obj["type"], obj["id"])
    return key, items if isinstance(items, translate.Volatile) else tuple(items)


def expected(objects: dict[str, dict[str, Any]]) -> dict[str, Record]:
    records = translate.resolve(
        item for obj in objects.values() for item in translate.translate(obj, "cattle")
    )
    return {r.key: r for r in records}


def mutate(rng: random.Random, objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    obj = copy.deepcopy(rng.choice([*objects.values(), *ALL]))
    kind = obj["type"]
    if rng.random() < 0.15:
        obj["state"] = "removed"
    elif kind == "stack":
        obj["name"] = rng.choice(["Web", "db", "Front", "back"])
    elif kind in ("service", "externalService", "dnsService", "loadBalancerService"):
        if kind == "loadBalancerService" and rng.random() < 0.6:
            ids = ["1s3", "1s4", "1s5", "1s8", "1s9"]
            certs = ["1c1", "1c2", "1c3", "1c9"]
            obj["lbConfig"] = {
                "certificateIds": rng.sample(certs, rng.randrange(4)),
                "defaultCertificateId": rng.choice([*certs, None]),
                "portRules": [
                    {"serviceId": rng.choice([*ids, None]), "sourcePort": 80 + i}
                    for i in range(rng.randrange(4))
                ],
            }
        else:
            obj["name"] = rng.choice(["nginx", "mysql", "api", "lb"])
            obj["stackId"] = rng.choice(["1st5", "1st6", "1st9"])
    elif kind == "network":
        choice = rng.randrange(3)
        if choice == 0:
            obj["subnets"] = [
                {"type": "subnet", "networkAddress": rng.choice(["10.42.0.0/16", "10.9.0.0/16"])}
            ]
        elif choice == 1:
            obj["uuid"] = rng.choice(["uuid-ipsec", "uuid-flannel", "uuid-new"])
        else:
            obj["name"] = rng.choice(["ipsec", "flannel", "vxlan"])
            obj["state"] = rng.choice(["active", "inactive"])
    elif kind == "project":
        obj["defaultNetworkId"] = rng.choice(["1n3", "1n4", "1n9"])
    elif kind == "certificate":
        obj["id"] = rng.choice(["1c1", "1c2", "1c3"])
        obj["name"] = rng.choice(["www", "api", "mail"])
    elif kind == "container":
        choice = rng.randrange(5)
        if choice >= 3:  # what the memo re-reads (3) or compares exactly (4: "1" or "1.0")
            if choice == 3:
                obj["state"] = rng.choice(["running", "stopped", "starting"])
                obj["healthState"] = rng.choice(["healthy", "unhealthy", None])
                obj["primaryIpAddress"] = rng.choice([f"127.0.3.{rng.randrange(1, 9)}", None])
            else:
                obj["labels"] = {**obj.get("labels", {}), "n": rng.choice([1, 1.0, True])}
            return obj
        if choice == 0:
            obj["serviceIds"] = rng.sample(["1s3", "1s4", "1s5", "1s8"], rng.randrange(3))
            obj["primaryIpAddress"] = f"127.0.3.{rng.randrange(1, 250)}"
        elif choice == 1:
            obj["primaryNetworkId"] = rng.choice(["1n3", "1n4", "1n9", None])
        else:
            obj["id"] = f"1i{rng.randrange(100, 120)}"
            obj["name"] = f"Web-nginx-{obj['id']}"
    return obj


def apply(held: dict[str, Record], changes: list[Change]) -> None:
    for change in changes:
        if isinstance(change, Deleted):
            held.pop(change.key)
        else:
            held[change.key] = change


def test_reset_equals_resolve() -> None:
    objects = {o["id"]: o for o in ALL}
    mirror = Mirror()
    records = {r.key: r for r in mirror.reset(dict(items_of(o) for o in objects.values()))}
    assert records == expected(objects)
    assert mirror.pod_cidrs == ("10.42.0.0/16",)
    shown = (
        '{"default_policy_action":null,"host_ports":null,"is_default":true,"metadata":{},'
        '"name":"ipsec","policy":null,"uuid":"uuid-ipsec"}'
    )
    for host in ("cattle:host/1h1", "cattle:host/1h2"):
        record = records[host]
        assert isinstance(record, Host)
        assert (record.network_json, record.pod_cidrs) == (shown, ("10.42.0.0/16",))
    workload = records["cattle:container/1i10"]
    assert isinstance(workload, Workload)
    assert workload.network_uuid == "uuid-ipsec"
    lb = records["cattle:service/1s8"]
    assert isinstance(lb, Service)
    config = json.loads(lb.lb_config_json)
    assert (config["certs"], config["default_cert"]) == (["www", "api"], "www")
    assert [rule["service"] for rule in config["port_rules"]] == ["Web/nginx", "db/mysql", "Web/lb"]


def test_a_fact_change_re_resolves_only_what_depends_on_it() -> None:
    objects = {o["id"]: copy.deepcopy(o) for o in ALL}
    mirror = Mirror()
    held = {r.key: r for r in mirror.reset(dict(items_of(o) for o in objects.values()))}

    def change(obj: dict[str, Any]) -> set[str]:
        objects[obj["id"]] = obj
        key, values = items_of(obj)
        out = mirror.update({key: values})
        apply(held, out)
        assert held == expected(objects)
        return {c.key for c in out}

    certificate = {"id": "1c2", "type": "certificate", "name": "api2"}
    assert change(certificate) == {"cattle:service/1s8"}
    network = {**objects["1n3"], "uuid": "uuid-ipsec-2"}
    assert change(network) == {
        "cattle:host/1h1",
        "cattle:host/1h2",
        *(f"cattle:container/1i{n}" for n in range(10, 14)),
    }
    other = {**objects["1n4"], "uuid": "uuid-flannel-2"}  # no container is on it
    assert change(other) == set()
    db = {**objects["1st6"], "name": "data"}
    assert change(db) == {
        "cattle:stack/1st6",
        "cattle:service/1s4",
        "cattle:container/1i12",
        "cattle:endpoint/1s4/1i12",
        "cattle:service/1s8",
    }
    lb = next(r for r in held.values() if r.key == "cattle:service/1s8")
    assert isinstance(lb, Service)
    config = json.loads(lb.lb_config_json)
    assert config["certs"] == ["www", "api2"]
    assert [rule["service"] for rule in config["port_rules"]] == [
        "Web/nginx",
        "data/mysql",
        "Web/lb",
    ]


def test_a_containers_volatile_change_is_carried_to_its_records_and_kept() -> None:
    """The memo's Volatile changes only a container's records; a later name or network change
    resolves its items again with the address it has now, not the one of its memo entry."""
    objects = {o["id"]: copy.deepcopy(o) for o in ALL}
    mirror = Mirror()
    memo = translate.ContainerMemo()
    held = {r.key: r for r in mirror.reset(dict(items_of(o, memo) for o in objects.values()))}

    def step(*objs: dict[str, Any], expect: set[str] | None = None) -> set[str]:
        changes: dict[str, tuple[translate.Translated, ...] | translate.Volatile | None] = {}
        for obj in objs:
            objects[obj["id"]] = obj
            key, values = change_of(obj, memo)
            changes[key] = values
        out = mirror.update(changes)
        apply(held, out)
        assert held == expected(objects)
        assert {r.key: r for r in mirror.records()} == held
        return {c.key for c in out}

    def fast(obj: dict[str, Any]) -> bool:
        """Whether the mirror takes an event of ``obj`` without resolving: its items are the
        records of the memo's entry."""
        key, change = change_of(obj, memo)
        held = mirror._items.get(key, ())
        return isinstance(change, translate.Volatile) and (
            len(held) == len(change.base) and all(map(operator.is_, held, change.base))
        )

    nginx = {**objects["1i10"], "primaryIpAddress": "127.0.3.7"}
    assert fast(nginx)
    assert step(nginx) == {"cattle:container/1i10", "cattle:endpoint/1s3/1i10"}
    workload = held["cattle:container/1i10"]
    assert isinstance(workload, Workload)
    assert (workload.ips, workload.network_uuid, workload.namespace) == (
        ("127.0.3.7",),
        "uuid-ipsec",
        "Web",
    )
    assert step(dict(nginx)) == set()  # the same fields again: nothing to publish
    # health only, both serving: the endpoint (and so its group) is unchanged
    assert step({**nginx, "healthState": "updating-healthy"}) == {"cattle:container/1i10"}
    # the items (still the memo entry's address) resolved again after a stack rename ...
    web = {**objects["1st5"], "name": "Front"}
    assert "cattle:container/1i10" in step(web)
    assert fast({**objects["1i10"], "primaryIpAddress": "127.0.3.6"})  # and stays fast
    # ... and a network change; then the address and the stack in one batch
    network = {**objects["1n3"], "uuid": "uuid-ipsec-2"}
    assert "cattle:container/1i10" in step(network)
    assert fast({**objects["1i10"], "primaryIpAddress": "127.0.3.6"})
    moved = {**objects["1i10"], "primaryIpAddress": "127.0.3.8", "state": "stopping"}
    assert step(moved, {**objects["1st5"], "name": "Back"}) >= {
        "cattle:container/1i10",
        "cattle:endpoint/1s3/1i10",
        "cattle:stack/1st5",
    }
    # a memo entry newer than what the mirror holds (its translation was never applied)
    labelled = {**objects["1i11"], "labels": {**objects["1i11"].get("labels", {}), "x": "1"}}
    change_of(labelled, memo)
    later = {**labelled, "primaryIpAddress": "127.0.3.9"}
    change = change_of(later, memo)[1]
    assert isinstance(change, translate.Volatile)
    assert not fast(later)
    assert step(later) == {"cattle:container/1i11", "cattle:endpoint/1s3/1i11"}
    assert fast({**later, "primaryIpAddress": "127.0.3.10"})  # the memo's entry held now
    relabelled = held["cattle:container/1i11"]
    assert isinstance(relabelled, Workload)
    assert label(relabelled.labels, "x") == "1"
    # the address gone: the groups go too (a full translation, not a Volatile)
    gone = {**objects["1i12"], "primaryIpAddress": None}
    assert not isinstance(change_of(gone, memo)[1], translate.Volatile)
    assert step(gone) == {"cattle:container/1i12", "cattle:endpoint/1s4/1i12"}


def test_updates_equal_a_full_resolve_at_every_step() -> None:
    rng = random.Random(7)
    objects = {o["id"]: copy.deepcopy(o) for o in ALL}
    mirror = Mirror()
    memo = translate.ContainerMemo()  # as the live source translates
    held = {r.key: r for r in mirror.reset(dict(items_of(o, memo) for o in objects.values()))}
    seen: Counter[str] = Counter()
    for _step in range(600):
        batch = [mutate(rng, objects) for _ in range(rng.randrange(1, 4))]
        changes: dict[str, tuple[translate.Translated, ...] | translate.Volatile | None] = {}
        for obj in batch:
            if obj.get("state") == "removed" and rng.random() < 0.5:
                objects.pop(obj["id"], None)
                changes[translate.key(obj["type"], obj["id"])] = None
                continue
            objects[obj["id"]] = obj
            key, values = change_of(obj, memo)
            changes[key] = values
        seen.update(
            "volatile" for values in changes.values() if isinstance(values, translate.Volatile)
        )
        apply(held, mirror.update(changes))
        want = expected(objects)
        assert held == want
        assert {r.key: r for r in mirror.records()} == held
        for record in want.values():
            if isinstance(record, Host) and record.network_json:
                seen[f"network {json.loads(record.network_json)['uuid']}"] += 1
            elif isinstance(record, Workload) and record.network_uuid:
                seen["container network uuid"] += 1
            elif isinstance(record, Service) and record.lb_config_json:
                config = json.loads(record.lb_config_json)
                seen.update(f"cert {name}" for name in config["certs"])
                seen.update(
                    "rule service" for rule in config["port_rules"] if rule["service"] is not None
                )
    # the sequence went through what the post-passes resolve, not only the easy cases
    assert seen["volatile"] > 30, seen
    for what in ("network uuid-ipsec", "network uuid-flannel", "container network uuid"):
        assert seen[what] > 0, what
    for what in ("cert www", "cert api", "cert mail", "rule service"):
        assert seen[what] > 0, what
