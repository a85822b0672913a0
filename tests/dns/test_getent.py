"""End to end with glibc: `getent ahosts` in a pod's network namespace, with a pod's
resolv.conf (`search <ns>.svc.cluster.local svc.cluster.local cluster.local`, `ndots:5`),
against the daemon in a "node" namespace joined to it by a veth pair, autopath off and on.

Everything runs inside the two namespaces the test creates (the fake upstream on the node
namespace's loopback), so no packet leaves them. The daemon's query log counts the queries
one lookup costs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnshelpers import namespace, pod, service, write_snapshot
from helpers import ROOT, free_port, network_namespace

NODE_IP, POD_IP = "10.77.0.1", "10.77.0.5"
UPSTREAM = ("127.0.0.2", 5300)
TABLE = {"api.example.com": [["A", "192.0.2.10"]]}
POD_RESOLV_CONF = (
    f"nameserver {NODE_IP}\n"
    "search shop.svc.cluster.local svc.cluster.local cluster.local\n"
    "options ndots:5 attempts:2 timeout:2\n"
)
NODE_RESOLV_CONF = f"nameserver {UPSTREAM[0]}\nsearch corp.example\n"


def _netns_etc(name: str, resolv_conf: str) -> Path:
    """/etc/netns/<name>/resolv.conf, which `ip netns exec` mounts over /etc/resolv.conf."""
    directory = Path("/etc/netns") / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "resolv.conf").write_text(resolv_conf)
    return directory


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def namespaces(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    if shutil.which("getent") is None:
        pytest.skip("getent (glibc) is not installed")
    tmp = tmp_path_factory.mktemp("getent")
    snapshot = write_snapshot(
        tmp / "cluster.yaml",
        [
            namespace("shop"),
            service("shop", "web", cluster_ips=("10.96.0.20",)),
            pod("shop", "client", POD_IP),
        ],
    )
    with network_namespace("gnode") as node, network_namespace("gpod") as pod_ns:
        etc = [_netns_etc(node, NODE_RESOLV_CONF), _netns_etc(pod_ns, POD_RESOLV_CONF)]
        try:
            _run(
                "ip",
                "-n",
                node,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "eth0",
                "netns",
                pod_ns,
            )
            _run("ip", "-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
            _run("ip", "-n", pod_ns, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
            _run("ip", "-n", node, "link", "set", "eth0", "up")
            _run("ip", "-n", pod_ns, "link", "set", "eth0", "up")
            yield node, pod_ns, snapshot
        finally:
            for directory in etc:
                shutil.rmtree(directory, ignore_errors=True)


class NodeDaemon:
    """The fake upstream and the daemon, started in the node namespace; ended by PID."""

    def __init__(self, node: str, pod_ns: str, snapshot: Path, log: Path, autopath: str) -> None:
        self.log_path = log
        self.pod_ns = pod_ns
        self.result: set[str] = set()
        self.upstream = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                node,
                sys.executable,
                str(ROOT / "tests" / "fakes" / "dns_table_upstream.py"),
                UPSTREAM[0],
                str(UPSTREAM[1]),
                json.dumps(TABLE),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.upstream.stdout is not None
        assert self.upstream.stdout.readline().strip() == "ready"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_SERVICES_")}
        env["NODE_SERVICES_DNS_AUTOPATH"] = autopath
        self.log = log.open("wb")
        self.daemon = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                node,
                sys.executable,
                "-m",
                "node_services",
                "run",
                "--snapshot",
                str(snapshot),
                "--node-name",
                "node-a",
                "--dns-listen",
                f"{NODE_IP}:53",
                "--admin-listen",
                f"127.0.0.1:{free_port()}",
                "--metadata-listen",
                f"127.0.0.1:{free_port()}",
                "--upstream",
                f"{UPSTREAM[0]}:{UPSTREAM[1]}",
                "--dns-query-log",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def queries(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if " udp " in line]

    def asked(self, name: str, expect: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """The distinct questions (name, type) one lookup of ``name`` made the daemon answer
        (distinct: a resolver's retry after a lost datagram is the same question). The daemon
        logs a query just after sending its answer: wait (a while) for ``expect`` to show."""
        before = len(self.queries())
        self.result = ahosts(self.pod_ns, name)
        for _ in range(2):  # the resolver gave up (a loaded machine): ask again, same questions
            if self.result or name.startswith("nosuch"):
                break
            self.result = ahosts(self.pod_ns, name)
        deadline = time.monotonic() + 10
        while True:
            questions = set()
            for line in self.queries()[before:]:
                fields = line.split(" udp ", 1)[1].split()
                questions.add((fields[0].lower(), fields[1]))
            if questions >= expect or time.monotonic() > deadline:
                return questions
            time.sleep(0.05)

    def stop(self) -> None:
        for process in (self.daemon, self.upstream):
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.log.close()


def ahosts(pod_ns: str, name: str) -> set[str]:
    result = _run("ip", "netns", "exec", pod_ns, "getent", "ahosts", name, check=False)
    return {line.split()[0] for line in result.stdout.splitlines() if line.strip()}


def _wait_ready(daemon: NodeDaemon, pod_ns: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert daemon.daemon.poll() is None, daemon.log_path.read_text()
        if ahosts(pod_ns, "web.shop.svc.cluster.local") == {"10.96.0.20"}:
            return
        time.sleep(0.2)
    raise AssertionError("the daemon did not answer:\n" + daemon.log_path.read_text())


@pytest.mark.parametrize("autopath", ["off", "on"])
def test_getent_ahosts_in_a_pod(
    namespaces: tuple[str, str, Path], tmp_path: Path, autopath: str
) -> None:
    node, pod_ns, snapshot = namespaces
    daemon = NodeDaemon(node, pod_ns, snapshot, tmp_path / "daemon.log", autopath)
    search = ("shop.svc.cluster.local", "svc.cluster.local", "cluster.local")
    try:
        _wait_ready(daemon, pod_ns)
        # `web`: its first expansion exists, with or without autopath.
        first = {("web.shop.svc.cluster.local", t) for t in ("A", "AAAA")}
        assert daemon.asked("web", first) == first
        assert daemon.result == {"10.96.0.20"}
        # `web.shop`: autopath answers its first expansion (a CNAME to web.shop.svc...).
        expected = {("web.shop.shop.svc.cluster.local", t) for t in ("A", "AAAA")}
        if autopath == "off":
            expected |= first
        assert daemon.asked("web.shop", expected) == expected
        assert daemon.result == {"10.96.0.20"}
        # An external name: A and AAAA for each search expansion and the name itself
        # without autopath (8 questions); only the first expansion with it (2).
        walk = [f"api.example.com.{domain}" for domain in search] + ["api.example.com"]
        names = walk[:1] if autopath == "on" else walk
        expected = {(name, t) for name in names for t in ("A", "AAAA")}
        assert daemon.asked("api.example.com", expected) == expected
        assert daemon.result == {"192.0.2.10"}
        # A name that exists nowhere: the client walks everything either way.
        missing = {("nosuch.example.org", "A"), ("nosuch.example.org", "AAAA")}
        assert daemon.asked("nosuch.example.org", missing) >= missing
        assert daemon.result == set()
    finally:
        daemon.stop()
