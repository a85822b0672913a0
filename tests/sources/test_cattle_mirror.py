"""The live mirror resolves per change exactly what translate.resolve gives for the whole
set: checked after every step of a random sequence of creates, updates and removals."""

from __future__ import annotations

import copy
import random
from typing import Any

from fakes.cattle_server import read_fixture
from helpers import FIXTURES

from node_services.sources.cattle import translate
from node_services.sources.cattle.mirror import Mirror
from node_services.state.records import Deleted, Record

SCENARIO = read_fixture(FIXTURES / "cattle" / "recorded-scenario.json")
NETWORK = {
    "id": "1n3",
    "type": "network",
    "kind": "cni",
    "state": "active",
    "name": "ipsec",
    "subnets": [{"type": "subnet", "networkAddress": "10.42.0.0/16"}],
}


def items_of(obj: dict[str, Any]) -> tuple[str, tuple[translate.Translated, ...]]:
    return translate.key(obj["type"], obj["id"]), tuple(translate.translate(obj, "cattle"))


def expected(objects: dict[str, dict[str, Any]]) -> dict[str, Record]:
    records = translate.resolve(
        item for obj in objects.values() for item in translate.translate(obj, "cattle")
    )
    return {r.key: r for r in records}


def mutate(rng: random.Random, objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    obj = copy.deepcopy(rng.choice([*objects.values(), *SCENARIO, NETWORK]))
    choice = rng.randrange(6)
    if choice == 0:
        obj["state"] = "removed"
    elif choice == 1 and obj["type"] == "stack":
        obj["name"] = rng.choice(["Web", "db", "Front", "back"])
    elif choice == 2 and obj["type"] in ("service", "externalService", "dnsService"):
        obj["name"] = rng.choice(["nginx", "mysql", "api"])
        obj["stackId"] = rng.choice(["1st5", "1st6", "1st9"])
    elif choice == 3 and obj["type"] == "network":
        obj["subnets"] = [
            {"type": "subnet", "networkAddress": rng.choice(["10.42.0.0/16", "10.9.0.0/16"])}
        ]
    elif choice == 4 and obj["type"] == "container":
        obj["serviceIds"] = rng.sample(["1s3", "1s4", "1s5"], rng.randrange(3))
        obj["primaryIpAddress"] = f"127.0.3.{rng.randrange(1, 250)}"
    elif obj["type"] == "container":
        obj["id"] = f"1i{rng.randrange(100, 120)}"
        obj["name"] = f"Web-nginx-{obj['id']}"
    return obj


def test_reset_equals_resolve() -> None:
    objects = {o["id"]: o for o in [*SCENARIO, NETWORK]}
    mirror = Mirror()
    records = mirror.reset(dict(items_of(o) for o in objects.values()))
    assert {r.key: r for r in records} == expected(objects)
    assert mirror.pod_cidrs == ("10.42.0.0/16",)


def test_updates_equal_a_full_resolve_at_every_step() -> None:
    rng = random.Random(7)
    objects = {o["id"]: copy.deepcopy(o) for o in [*SCENARIO, NETWORK]}
    mirror = Mirror()
    held = {r.key: r for r in mirror.reset(dict(items_of(o) for o in objects.values()))}
    for _step in range(400):
        batch = [mutate(rng, objects) for _ in range(rng.randrange(1, 4))]
        changes = {}
        for obj in batch:
            if obj["state"] == "removed" and rng.random() < 0.5:
                objects.pop(obj["id"], None)
                changes[translate.key(obj["type"], obj["id"])] = None
                continue
            objects[obj["id"]] = obj
            key, values = items_of(obj)
            changes[key] = values
        for change in mirror.update(changes):
            if isinstance(change, Deleted):
                held.pop(change.key)
            else:
                held[change.key] = change
        assert held == expected(objects)
        assert {r.key: r for r in mirror.records()} == held
