"""Debian's real CNI `bridge` plugin calling our IPAM, inside network namespaces the test makes.

Two namespaces per test: a "node" namespace in which the bridge plugin runs (its bridge and
gateway address live there, never in the machine's own namespace) and a "pod" namespace that
gets the veth. The only traffic is a ping from the pod to the bridge's gateway address.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ipam.cni_driver import Plugin, Reply

BRIDGE = Path("/usr/lib/cni/bridge")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(
        not BRIDGE.exists(), reason="needs Debian containernetworking-plugins (/usr/lib/cni/bridge)"
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (ip)"),
    pytest.mark.skipif(shutil.which("ping") is None, reason="needs ping (iputils-ping)"),
]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Namespaces:
    node: str
    pod: str
    bridge: str

    @property
    def pod_path(self) -> str:
        return f"/var/run/netns/{self.pod}"


@pytest.fixture
def netns() -> Iterator[Namespaces]:
    tag = secrets.token_hex(3)
    spaces = Namespaces(node=f"ns-ipam-n{tag}", pod=f"ns-ipam-p{tag}", bridge=f"br-ipam{tag}")
    try:
        ip("netns", "add", spaces.node)
        ip("netns", "add", spaces.pod)
        ip("-n", spaces.node, "link", "set", "lo", "up")
        ip("-n", spaces.pod, "link", "set", "lo", "up")
        yield spaces
    finally:
        # deleting the namespaces deletes the bridge and veth pair inside them
        ip("netns", "del", spaces.pod, check=False)
        ip("netns", "del", spaces.node, check=False)


@pytest.fixture
def cni_dir(plugin: Plugin) -> Plugin:
    (plugin.cni_path / "bridge").symlink_to(BRIDGE)
    return plugin


def bridge_config(plugin: Plugin, spaces: Namespaces, **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "podnet",
        "type": "bridge",
        "bridge": spaces.bridge,
        "isGateway": True,
        "ipMasq": False,
        "ipam": {
            "type": "node-services-ipam",
            "subnet": "10.244.200.0/24",
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": str(plugin.data_dir),
        },
        **extra,
    }


def run_bridge(
    plugin: Plugin, spaces: Namespaces, command: str, config: dict[str, Any], **kwargs: Any
) -> Reply:
    """The bridge plugin, run in the node namespace exactly as a runtime runs it."""
    env = plugin.env(command, **kwargs)
    proc = subprocess.run(
        ["ip", "netns", "exec", spaces.node, str(plugin.cni_path / "bridge")],
        input=json.dumps(config).encode(),
        env=env,
        capture_output=True,
        timeout=60,
    )
    return Reply(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def test_bridge_gives_the_pod_our_address_and_it_pings_its_gateway(
    cni_dir: Plugin, netns: Namespaces
) -> None:
    config = bridge_config(cni_dir, netns)
    added = run_bridge(cni_dir, netns, "ADD", config, container="pod1", netns=netns.pod_path)
    assert added.returncode == 0, added.stdout + added.stderr
    result = added.json
    assert [(e["address"], e["gateway"]) for e in result["ips"]] == [
        ("10.244.200.2/24", "10.244.200.1")
    ]
    shown = ip("-n", netns.pod, "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert "inet 10.244.200.2/24" in shown
    route = ip("-n", netns.pod, "route", "show", "default").stdout
    assert route.startswith("default via 10.244.200.1 dev eth0")
    ping = subprocess.run(
        ["ip", "netns", "exec", netns.pod, "ping", "-c", "1", "-W", "2", "10.244.200.1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "1 received" in ping.stdout

    second = run_bridge(
        cni_dir, netns, "ADD", config, container="pod2", netns=netns.pod_path, ifname="net1"
    )
    assert [e["address"] for e in second.json["ips"]] == ["10.244.200.3/24"]

    check = dict(config, prevResult=result)
    checked = run_bridge(cni_dir, netns, "CHECK", check, container="pod1", netns=netns.pod_path)
    assert (checked.returncode, checked.stdout) == (0, ""), checked.stdout + checked.stderr

    for attempt in ("with netns", "again", "without netns"):
        path = "" if attempt == "without netns" else netns.pod_path
        deleted = run_bridge(cni_dir, netns, "DEL", config, container="pod1", netns=path)
        assert deleted.returncode == 0, (attempt, deleted.stdout + deleted.stderr)
    assert cni_dir.allocations("podnet") == {("pod2", "net1"): "10.244.200.3"}
    assert ip("-n", netns.pod, "link", "show", "eth0", check=False).returncode != 0
    assert cni_dir.check_store() == []


def test_bridge_check_fails_when_the_reservation_is_missing(
    cni_dir: Plugin, netns: Namespaces
) -> None:
    config = bridge_config(cni_dir, netns)
    added = run_bridge(cni_dir, netns, "ADD", config, container="pod1", netns=netns.pod_path)
    assert added.returncode == 0, added.stdout + added.stderr
    # the reservation vanishes behind the bridge's back (our plugin's own DEL)
    assert cni_dir.run("DEL", config, container="pod1").returncode == 0
    check = dict(config, prevResult=added.json)
    checked = run_bridge(cni_dir, netns, "CHECK", check, container="pod1", netns=netns.pod_path)
    assert checked.returncode != 0
    error = checked.json
    assert error["code"] == 102
    assert error["msg"] == "no IP reservation for container pod1 interface eth0 in network podnet"


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_bridge_never_hands_out_a_running_pods_address_after_the_store_is_lost(
    cni_dir: Plugin, netns: Namespaces, how: str
) -> None:
    config = bridge_config(cni_dir, netns)
    first = run_bridge(cni_dir, netns, "ADD", config, container="pod1", netns=netns.pod_path)
    assert [e["address"] for e in first.json["ips"]] == ["10.244.200.2/24"]
    db = cni_dir.data_dir / "ipam.db"
    if how == "truncated":
        db.write_bytes(b"")  # `: > ipam.db`
    else:
        db.unlink()

    second = run_bridge(
        cni_dir, netns, "ADD", config, container="pod2", netns=netns.pod_path, ifname="net1"
    )
    assert second.returncode != 0, second.stdout
    error = second.json
    assert "ips" not in error
    assert error["code"] == 5
    assert error["msg"] == "the IPAM store was lost: running containers' reservations are unknown"
    assert "restore ipam.db from a backup" in error["details"]
    # pod2's veth (the bridge leaves it for the runtime's DEL) got no address: pod1 keeps the
    # only 10.244.200.2 in the pod namespace
    shown = ip("-n", netns.pod, "-4", "-o", "addr", "show").stdout
    assert shown.count("inet 10.244.200.") == 1 and "eth0    inet 10.244.200.2/24" in shown
    # the runtime's clean-up DEL of pod2 succeeds, so the pod's teardown is not stuck
    deleted = run_bridge(
        cni_dir, netns, "DEL", config, container="pod2", netns=netns.pod_path, ifname="net1"
    )
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert ip("-n", netns.pod, "link", "show", "net1", check=False).returncode != 0
