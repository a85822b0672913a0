"""Malformed plugin input: thousands of random and mutated network configurations (and CNI_*
environments) on the plugin's stdin always give exactly one CNI result, or exactly one CNI error
object and a nonzero exit, never a traceback nor an internal error (code 110). Seeded and
bounded: the entry point runs in-process (``cni.respond``, what ``main`` prints), a few dozen
through the installed executable."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ipam.cni_driver import Plugin

from node_services.ipam import cni

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
ERROR_KEYS = {"cniVersion", "code", "msg", "details"}
PLACEHOLDER_DIR = "/fuzz/ipam-data"
PLACEHOLDER_RESOLV = "/fuzz/resolv.conf"


def seeds(data_dir: str, resolv: str) -> list[dict[str, Any]]:
    """Valid configurations touching every key the plugin reads."""
    ipam = {"type": "node-services-ipam", "dataDir": data_dir}
    return [
        {"cniVersion": "1.0.0", "name": "net", "ipam": {**ipam, "subnet": "10.244.7.0/24"}},
        {
            "cniVersion": "0.4.0",
            "name": "dual",
            "ipam": {
                **ipam,
                "ranges": [
                    [{"subnet": "10.5.0.0/28", "rangeStart": "10.5.0.3", "gateway": "10.5.0.1"}],
                    [{"subnet": "fd00:5::/120", "rangeEnd": "fd00:5::40"}],
                ],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.0.0.0/8", "gw": "10.5.0.1"}],
                "resolvConf": resolv,
                "lockTimeout": 2,
            },
        },
        {"cniVersion": "1.1.0", "name": "node", "ipam": {**ipam, "range": "node"}},
        {
            "cniVersion": "1.1.0",
            "name": "net",
            "ipam": {**ipam, "subnet": "10.244.7.0/24"},
            "args": {"cni": {"ips": ["10.244.7.77"]}},
            "runtimeConfig": {"ips": ["10.244.7.78/24"]},
            "prevResult": {"cniVersion": "1.1.0", "ips": [{"address": "10.244.7.2/24"}]},
            "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}],
        },
    ]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(14)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2**63, -(2**64), 10**30, 600, 601])
    if choice == 3:
        return rng.choice([math.nan, math.inf, -math.inf, 1e308, -0.0, 0.5, 5e-324])
    if choice == 4:
        return rng.choice(["", "node", "1.0.0", "0.3.1", "9.9.9", "10.244.7.5", "::1", "x"])
    if choice == 5:
        return rng.choice(["10.0.0.0/8", "10.0.0.0/31", "fd00::/64", "0.0.0.0/0", "10.1.2.3/33"])
    if choice == 6:
        return "".join(chr(rng.choice([0, 10, 34, 92, 0xE9, 0xD800, 0x1F600])) for _ in range(4))
    if choice == 7:
        return "a" * rng.choice([256, 70_000])
    if choice == 8:  # deep nesting, around and past the decoder's recursion limit
        value: Any = 1
        for _ in range(rng.choice([50, 400, 900, 3000])):
            value = [value] if rng.random() < 0.5 else {"k": value}
        return value
    if choice == 9 and depth < 3:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if choice == 10 and depth < 3:
        keys = ["subnet", "gateway", "dst", "gw", "address", "containerID", "ifname", "ips", "x"]
        return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if choice == 11:
        return rng.randbytes(rng.randint(0, 12)).decode("latin-1")
    if choice == 12:
        return {"subnet": rng.choice(["10.9.0.0/30", "10.9.0.0/16", "fd00::/8"])}
    return [[{"subnet": "10.9.0.0/24"}], [{"subnet": "10.9.0.0/25"}]]  # overlapping sets


def paths(value: Any) -> list[tuple[Any, ...]]:
    """Paths to the nodes of a document, down to 8 levels (mutations nest deeper ones)."""
    out: list[tuple[Any, ...]] = []
    todo: list[tuple[tuple[Any, ...], Any]] = [((), value)]
    while todo:
        prefix, node = todo.pop()
        out.append(prefix)
        if len(prefix) >= 8:
            continue
        if isinstance(node, dict):
            todo.extend(((*prefix, key), item) for key, item in node.items())
        elif isinstance(node, list):
            todo.extend(((*prefix, i), item) for i, item in enumerate(node))
    return out


def mutate_tree(rng: random.Random, doc: Any) -> Any:
    doc = json.loads(json.dumps(doc))
    for _ in range(rng.randint(1, 4)):
        where = rng.choice(paths(doc))
        if not where:
            doc = random_value(rng) if rng.random() < 0.05 else doc
            continue
        parent = doc
        for step in where[:-1]:
            parent = parent[step]
        last = where[-1]
        action = rng.randrange(3)
        if action == 0:
            parent[last] = random_value(rng)
        elif action == 1 and isinstance(parent, dict):
            del parent[last]
        elif isinstance(parent, dict):
            parent[rng.choice(["extra", "ipam", "name", "cniVersion", "lockTimeout"])] = (
                random_value(rng)
            )
        else:
            parent.append(random_value(rng))
    return doc


def mutate_bytes(rng: random.Random, text: bytes) -> bytes:
    data = bytearray(text)
    choice = rng.randrange(6)
    if choice == 0 and data:
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif choice == 1 and data:
        del data[rng.randrange(len(data)) :]
    elif choice == 2:
        data[rng.randint(0, len(data)) : 0] = rng.choice([b"[", b"{", b"]", b'"', b"\\", b","])
    elif choice == 3:
        data = bytearray(b"\xef\xbb\xbf" + bytes(data)) if rng.random() < 0.5 else data * 2
    elif choice == 4:
        data = bytearray(text.decode().encode(rng.choice(["utf-16", "utf-32", "latin-1"])))
    else:
        data = bytearray(rng.randbytes(rng.randint(0, 300)))
    return bytes(data)


def confined(stdin: bytes, data_dir: str, resolv: str) -> bytes:
    """Keep a mutated document's store and resolv.conf inside the test's directory: a mutation
    must not make the plugin write elsewhere on the machine (or read a device forever)."""
    try:
        doc = json.loads(stdin)
    except (ValueError, RecursionError):
        return stdin  # the plugin cannot decode it either
    if not isinstance(doc, dict) or not isinstance(doc.get("ipam"), dict):
        return stdin
    ipam = doc["ipam"]
    changed = False
    value = ipam.get("dataDir")
    if not (isinstance(value, str) and (value == data_dir or "\x00" in value)) and not (
        "dataDir" in ipam and not isinstance(value, str)
    ):
        ipam["dataDir"] = data_dir
        changed = True
    if isinstance(ipam.get("resolvConf"), str) and ipam["resolvConf"] not in ("", resolv):
        ipam["resolvConf"] = resolv
        changed = True
    return json.dumps(doc).encode() if changed else stdin


def environment(rng: random.Random, command: str, cni_path: str) -> dict[str, str]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": rng.choice(["c1", "c2", "sandbox-3", "c1"]),
        "CNI_IFNAME": rng.choice(["eth0", "net1", "eth0"]),
        "CNI_NETNS": "/var/run/netns/fuzz",
        "CNI_PATH": cni_path,
        "CNI_ARGS": rng.choice(["", "IgnoreUnknown=1;IP=10.244.7.60", "K8S_POD_NAME=p;X=1"]),
    }
    if rng.random() < 0.1:  # the environment too, now and then
        key = rng.choice(sorted(env))
        env[key] = rng.choice(["", "-bad", "x" * 300, "a;b", "IP=nope", "ADD "])
    return env


def assert_one_cni_answer(command: str, text: str, status: int, stdin: bytes) -> None:
    """Exactly one JSON document: a result (or nothing) with 0, an error object with 1."""
    if status == 0:
        if command in ("ADD", "VERSION"):
            body = json.loads(text)
            assert isinstance(body, dict) and isinstance(body["cniVersion"], str), text
            assert ("ips" in body) if command == "ADD" else ("supportedVersions" in body)
        else:
            assert text == "", (command, text)
        return
    assert status == 1, (status, text)
    body = json.loads(text)
    assert text.count("\n") == 1 and text.endswith("\n"), text
    assert isinstance(body, dict) and set(body) <= ERROR_KEYS, body
    assert {"cniVersion", "code", "msg"} <= set(body), body
    assert body["cniVersion"] in cni.SUPPORTED_VERSIONS
    assert isinstance(body["msg"], str) and body["msg"], body
    assert isinstance(body["code"], int), body
    assert body["code"] != cni.INTERNAL_ERROR, (body, stdin[:300])


def cases(rng: random.Random, count: int, data_dir: str, resolv: str) -> list[tuple[str, bytes]]:
    # Generated with fixed placeholder paths, so the same seed gives the same cases whatever
    # the test's directory is called; confined() then puts them in the test's directory.
    docs = seeds(PLACEHOLDER_DIR, PLACEHOLDER_RESOLV)
    out = []
    for _ in range(count):
        command = rng.choice(COMMANDS)
        doc = mutate_tree(rng, rng.choice(docs)) if rng.random() < 0.8 else rng.choice(docs)
        try:
            stdin = json.dumps(doc, allow_nan=True).encode()
        except (ValueError, RecursionError):
            stdin = b"[" * 5000
        if rng.random() < 0.3:
            stdin = mutate_bytes(rng, stdin)
        out.append((command, confined(stdin, data_dir, resolv)))
    return out


@pytest.fixture
def resolv(tmp_path: Path) -> str:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 10.43.0.10\nsearch svc.cluster.local\noptions ndots:5\n")
    return str(path)


def test_2000_random_and_mutated_configs_in_process(plugin: Plugin, resolv: str) -> None:
    rng = random.Random(20261201)
    data_dir = str(plugin.data_dir)
    errors: dict[int, int] = {}
    successes = 0
    for command, stdin in cases(rng, 2000, data_dir, resolv):
        env = environment(rng, command, str(plugin.cni_path))
        text, status = cni.respond(env, stdin)
        assert_one_cni_answer(command, text, status, stdin)
        if status:
            code = json.loads(text)["code"]
            errors[code] = errors.get(code, 0) + 1
        else:
            successes += 1
    # the fuzzing reached past decoding: real commands ran and each spec code came up
    assert successes > 200, (successes, errors)
    assert {1, 4, 6, 7} <= set(errors), errors
    assert plugin.check_store() == []  # and whatever ran left the store consistent


def test_mutated_configs_through_the_real_executable(plugin: Plugin, resolv: str) -> None:
    rng = random.Random(1201)
    data_dir = str(plugin.data_dir)
    for command, stdin in cases(rng, 30, data_dir, resolv):
        env = environment(rng, command, str(plugin.cni_path))
        env["PATH"] = os.environ.get("PATH", "")
        proc = subprocess.run(
            [str(plugin.executable)], input=stdin, env=env, capture_output=True, timeout=60
        )
        assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
        assert_one_cni_answer(command, proc.stdout.decode(), proc.returncode, stdin)
    # and the deepest nesting the runtime could send, straight to the process
    proc = subprocess.run(
        [str(plugin.executable)],
        input=b"[" * 200_000,
        env={**environment(rng, "ADD", str(plugin.cni_path)), "CNI_ARGS": ""},
        capture_output=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stderr) == (1, b"")
    assert json.loads(proc.stdout)["code"] == 6
