"""Three "hosts" as network namespaces, the daemon running in each, pods between them.

Everything lives in namespaces this module creates (names carry the test's PID): an
"underlay" namespace holding the bridge that joins the hosts' veths (the machine's own
namespace is never touched), three host namespaces (eth0 10.77.0.N/24, the daemon, the pod
bridge made by Debian's CNI ``bridge`` plugin with node-services-ipam ``"range": "node"``) and
one pod namespace per host. All three daemons read one snapshot of Kubernetes Node objects.
The only traffic is between these namespaces. Everything is removed afterwards, also when a
test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from node_services.overlay.model import vtep_mac_for

BRIDGE = Path("/usr/lib/cni/bridge")
PID = os.getpid()
UNDERLAY = f"nsvc-ul-{PID}"
DEVICE = "ns-vxlan.1"
MTU = 1450  # the veths' 1500 less VXLAN's 50
INTERVAL = 1.0  # overlay_reconcile_interval of the daemons here
NODES = (1, 2, 3)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(
        not BRIDGE.exists(), reason="needs Debian containernetworking-plugins (/usr/lib/cni/bridge)"
    ),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("ip", "bridge", "ping", "curl")),
        reason="needs iproute2 (ip, bridge), iputils-ping and curl",
    ),
]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


def host_ns(n: int) -> str:
    return f"nsvc-h{n}-{PID}"


def pod_ns(n: int) -> str:
    return f"nsvc-p{n}-{PID}"


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *args, check=check)


def node_yaml(n: int, *, ip: str = "") -> str:
    return f"""apiVersion: v1
kind: Node
metadata:
  name: node-{n}
spec:
  podCIDR: 10.244.{n}.0/24
  podCIDRs: [10.244.{n}.0/24]
status:
  addresses:
  - {{address: {ip or f"10.77.0.{n}"}, type: InternalIP}}
  conditions:
  - {{type: Ready, status: "True"}}
"""


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    """Seconds it took for ``check`` to hold; fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Daemon:
    node: int
    log_path: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_SERVICES_")}
        env.update(
            NODE_SERVICES_IPAM="on",
            NODE_SERVICES_OVERLAY_RECONCILE_INTERVAL=str(INTERVAL),
            NODE_SERVICES_SNAPSHOT_POLL_INTERVAL="0.1",
            # the setting for old kernels (auto keeps offload on this one): the checks below
            # prove that "off" reaches the device
            NODE_SERVICES_OVERLAY_TX_CHECKSUM_OFFLOAD="off",
        )
        env.update(self.env)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                "ip", "netns", "exec", host_ns(self.node),
                sys.executable, "-m", "node_services", "run",
                "--node-name", f"node-{self.node}",
                "--admin-listen", "127.0.0.1:9254",
                "--dns-listen", "127.0.0.1:5353",
                "--metadata-listen", "127.0.0.1:8080",
                "--upstream", "127.0.0.1:1",
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
        log.close()

    def get(self, path: str) -> tuple[int, str]:
        done = in_ns(
            host_ns(self.node),
            "curl", "-s", "-m", "2", "-w", "\n%{http_code}", f"http://127.0.0.1:9254{path}",
            check=False,
        )  # fmt: skip
        body, _, code = done.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def metric(self, name: str) -> float:
        _, body = self.get("/metrics")
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon on node-{self.node} exited:\n{self.output()}")
            return self.get("/readyz")[0] == 200

        try:
            wait_until(ready, f"node-{self.node} ready", timeout=20)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.get('/readyz')}\n{self.output()}") from None

    def kill(self, signum: int = signal.SIGTERM) -> None:
        # the process is `ip netns exec`, which execs the daemon: same PID
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Cluster:
    root: Path
    snapshot: Path
    cni_path: Path
    daemons: dict[int, Daemon] = field(default_factory=dict)
    pod_ips: dict[int, str] = field(default_factory=dict)

    def write_snapshot(self, *nodes: int, extra: str = "") -> None:
        docs = [node_yaml(n) for n in nodes] + ([extra] if extra else [])
        tmp = self.snapshot.with_suffix(".tmp")
        tmp.write_text("---\n".join(docs))
        tmp.replace(self.snapshot)

    def start(self, overlay: str, *nodes: int) -> None:
        for n in nodes:
            self.daemons[n] = Daemon(
                n,
                self.root / f"daemon-{n}.log",
                [
                    "--overlay", overlay,
                    "--snapshot", str(self.snapshot),
                    "--ipam-dir", str(self.root / f"ipam-{n}"),
                ],
                {"NODE_SERVICES_CNI_CONF_DIR": str(self.root / f"net.d-{n}")},
            )  # fmt: skip
            self.daemons[n].start()
        for n in nodes:
            self.daemons[n].wait_ready()

    def stop(self, *nodes: int) -> None:
        for n in nodes or tuple(self.daemons):
            self.daemons[n].kill()

    def add_pod(self, n: int) -> None:
        """A pod on host ``n``: Debian's bridge plugin + our IPAM, as a runtime runs them,
        with the network config the daemon wrote into its cni_conf_dir."""
        conflist = json.loads((self.root / f"net.d-{n}" / "10-node-services.conflist").read_text())
        config = {
            "cniVersion": conflist["cniVersion"],
            "name": conflist["name"],
            **conflist["plugins"][0],
        }
        assert config["mtu"] == MTU
        assert config["ipam"] == {
            "type": "node-services-ipam",
            "range": "node",
            "dataDir": str(self.root / f"ipam-{n}"),
            "routes": [{"dst": "0.0.0.0/0"}],
        }
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": f"pod{n}",
            "CNI_NETNS": f"/var/run/netns/{pod_ns(n)}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(self.cni_path),
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod{n}",
        }
        done = subprocess.run(
            ["ip", "netns", "exec", host_ns(n), str(BRIDGE)],
            input=json.dumps(config),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        self.pod_ips[n] = json.loads(done.stdout)["ips"][0]["address"].split("/")[0]

    def ping(self, src: int, dst: int, *extra: str) -> subprocess.CompletedProcess[str]:
        return in_ns(
            pod_ns(src), "ping", "-c", "1", "-W", "2", *extra, self.pod_ips[dst], check=False
        )


def routes(n: int) -> list[str]:
    shown = run("ip", "-n", host_ns(n), "-4", "route", "show", "proto", "77").stdout
    return sorted(" ".join(line.split()) for line in shown.splitlines())


def neighbours(n: int) -> list[str]:
    shown = run("ip", "-n", host_ns(n), "neigh", "show", "dev", DEVICE, "nud", "permanent").stdout
    return sorted(" ".join(line.split()) for line in shown.splitlines())


def fdb(n: int) -> list[str]:
    shown = in_ns(host_ns(n), "bridge", "fdb", "show", "dev", DEVICE).stdout
    return sorted(" ".join(line.split()) for line in shown.splitlines())


def vxlan_entries(n: int, *peers: int) -> tuple[list[str], list[str], list[str]]:
    """Exactly what host ``n`` must hold for ``peers`` with the vxlan backend."""
    return (
        sorted(f"10.244.{p}.0/24 via 10.244.{p}.0 dev {DEVICE} onlink" for p in peers),
        sorted(f"10.244.{p}.0 lladdr {vtep_mac_for(f'node-{p}')} PERMANENT" for p in peers),
        sorted(f"{vtep_mac_for(f'node-{p}')} dst 10.77.0.{p} self permanent" for p in peers),
    )


def actual(n: int) -> tuple[list[str], list[str], list[str]]:
    return routes(n), neighbours(n), fdb(n)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("overlay")
    cni_path = root / "cni-bin"
    subprocess.run(
        [sys.executable, "-m", "node_services.ipam.cni", "--install", str(cni_path)],
        check=True,
        capture_output=True,
    )
    made = [UNDERLAY]
    cluster = Cluster(root, root / "snapshot.yaml", cni_path)
    try:
        run("ip", "netns", "add", UNDERLAY)
        run("ip", "-n", UNDERLAY, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", UNDERLAY, "link", "set", "br0", "up")
        for n in NODES:
            for ns in (host_ns(n), pod_ns(n)):
                run("ip", "netns", "add", ns)
                made.append(ns)
                run("ip", "-n", ns, "link", "set", "lo", "up")
            run(
                "ip", "-n", host_ns(n), "link", "add", "eth0", "type", "veth",
                "peer", "name", f"h{n}", "netns", UNDERLAY,
            )  # fmt: skip
            run("ip", "-n", UNDERLAY, "link", "set", f"h{n}", "master", "br0", "up")
            run("ip", "-n", host_ns(n), "addr", "add", f"10.77.0.{n}/24", "dev", "eth0")
            run("ip", "-n", host_ns(n), "link", "set", "eth0", "up")
        cluster.write_snapshot(*NODES)
        cluster.start("vxlan", *NODES)
        for n in NODES:
            cluster.add_pod(n)
        yield cluster
    finally:
        cluster.stop()
        for ns in reversed(made):
            run("ip", "netns", "del", ns, check=False)
        for n, daemon in cluster.daemons.items():
            if daemon.log_path.exists():
                sys.stderr.write(f"--- node-{n} daemon log (tail)\n{daemon.output()[-3000:]}\n")


@pytest.fixture
def vxlan_cluster(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster with the three nodes converged on the vxlan backend; restored after."""
    wait_until(
        lambda: all(actual(n) == vxlan_entries(n, *(p for p in NODES if p != n)) for n in NODES),
        "three converged vxlan nodes",
    )
    yield cluster
    cluster.write_snapshot(*NODES)
    for n in NODES:
        daemon = cluster.daemons[n]
        if daemon.proc is None or daemon.proc.poll() is not None:
            daemon.start()
            daemon.wait_ready()


def test_vxlan_pods_on_different_hosts_ping_each_other(vxlan_cluster: Cluster) -> None:
    cluster = vxlan_cluster
    assert cluster.pod_ips == {1: "10.244.1.2", 2: "10.244.2.2", 3: "10.244.3.2"}
    link = run("ip", "-n", host_ns(1), "-d", "link", "show", DEVICE).stdout
    assert f"mtu {MTU} " in link
    assert f"link/ether {vtep_mac_for('node-1')} " in link
    assert "vxlan id 1 local 10.77.0.1 dev eth0 srcport 0 0 dstport 8472 nolearning" in link
    addrs = run("ip", "-n", host_ns(1), "-4", "-o", "addr", "show", "dev", DEVICE).stdout
    assert [line.split()[3] for line in addrs.splitlines()] == ["10.244.1.0/32"]
    offload = in_ns(
        host_ns(1),
        sys.executable,
        "-c",
        f"from node_services.overlay.ethtool import tx_checksum_offload as t\nprint(t({DEVICE!r}))",
    )
    assert offload.stdout.strip() == "False"
    if shutil.which("ethtool"):
        features = in_ns(host_ns(1), "ethtool", "-k", DEVICE).stdout
        assert "tx-checksumming: off" in features
    for src, dst in ((1, 2), (1, 3), (3, 2), (2, 1)):
        ping = cluster.ping(src, dst)
        assert ping.returncode == 0, (src, dst, ping.stdout + ping.stderr)
    assert cluster.daemons[1].metric("node_services_overlay_peers") == 2


def test_df_payload_of_mtu_minus_28_passes_and_one_byte_more_fails(vxlan_cluster: Cluster) -> None:
    cluster = vxlan_cluster
    assert f"mtu {MTU} " in run("ip", "-n", pod_ns(1), "link", "show", "eth0").stdout
    fits = cluster.ping(1, 2, "-M", "do", "-s", str(MTU - 28))
    assert fits.returncode == 0, fits.stdout + fits.stderr
    too_big = cluster.ping(1, 2, "-M", "do", "-s", str(MTU - 27))
    assert too_big.returncode != 0
    assert "message too long" in (too_big.stdout + too_big.stderr).lower()


def test_hand_deleted_or_changed_entries_are_repaired_within_one_period(
    vxlan_cluster: Cluster,
) -> None:
    daemon = vxlan_cluster.daemons[1]
    before = {
        k: daemon.metric(f'node_services_overlay_repairs_total{{kind="{k}"}}')
        for k in ("added", "replaced")
    }
    mac2, mac3 = vtep_mac_for("node-2"), vtep_mac_for("node-3")
    ns = host_ns(1)
    run("ip", "-n", ns, "route", "del", "10.244.2.0/24")
    run("ip", "-n", ns, "neigh", "replace", "10.244.3.0", "lladdr", "0a:00:00:00:00:99",
        "dev", DEVICE, "nud", "permanent")  # fmt: skip
    in_ns(
        ns,
        "bridge",
        "fdb",
        "replace",
        mac2,
        "dev",
        DEVICE,
        "dst",
        "10.77.0.99",
        "self",
        "permanent",
    )
    in_ns(ns, "bridge", "fdb", "del", mac3, "dev", DEVICE, "dst", "10.77.0.3", "self")
    # No check that the kernel now differs: a periodic pass may already have repaired it
    # (the repair counters below prove each change was seen and undone).
    took = wait_until(lambda: actual(1) == vxlan_entries(1, 2, 3), "repair", timeout=INTERVAL * 3)
    # one period, plus the pass itself on a busy machine
    assert took <= INTERVAL + 1.0, took
    after = {
        k: daemon.metric(f'node_services_overlay_repairs_total{{kind="{k}"}}')
        for k in ("added", "replaced")
    }
    assert after["added"] - before["added"] >= 2  # the route and the FDB entry
    assert after["replaced"] - before["replaced"] >= 2  # the neighbour and the FDB entry
    assert vxlan_cluster.ping(1, 2).returncode == 0


def test_a_route_of_another_protocol_to_an_unrelated_prefix_is_left_alone(
    vxlan_cluster: Cluster,
) -> None:
    ns = host_ns(1)
    run("ip", "-n", ns, "route", "add", "10.99.0.0/24", "via", "10.77.0.2", "proto", "static")
    try:
        daemon = vxlan_cluster.daemons[1]
        passes = daemon.metric("node_services_overlay_reconcile_seconds_count")
        wait_until(
            lambda: daemon.metric("node_services_overlay_reconcile_seconds_count") >= passes + 2,
            "two more reconcile passes",
        )
        shown = run("ip", "-n", ns, "route", "show", "10.99.0.0/24").stdout.split()
        assert shown == ["10.99.0.0/24", "via", "10.77.0.2", "dev", "eth0", "proto", "static"]
        assert actual(1) == vxlan_entries(1, 2, 3)
    finally:
        run("ip", "-n", ns, "route", "del", "10.99.0.0/24", check=False)


def test_removing_a_node_removes_its_route_neighbour_and_fdb_on_the_others(
    vxlan_cluster: Cluster,
) -> None:
    vxlan_cluster.write_snapshot(1, 2)
    wait_until(
        lambda: actual(1) == vxlan_entries(1, 2) and actual(2) == vxlan_entries(2, 1),
        "node-3's entries gone from node-1 and node-2",
    )
    assert vxlan_cluster.ping(1, 2).returncode == 0
    assert vxlan_cluster.daemons[1].metric("node_services_overlay_peers") == 1


def test_sigkill_and_restart_after_a_node_left_removes_its_entries(
    vxlan_cluster: Cluster,
) -> None:
    daemon = vxlan_cluster.daemons[1]
    daemon.kill(signal.SIGKILL)
    vxlan_cluster.write_snapshot(1, 2)
    wait_until(lambda: actual(2) == vxlan_entries(2, 1), "node-2 drops node-3")
    time.sleep(INTERVAL)
    assert actual(1) == vxlan_entries(1, 2, 3)  # nobody cleans up while node-1's daemon is down
    daemon.start()
    daemon.wait_ready()
    assert actual(1) == vxlan_entries(1, 2)  # ready means the first pass went through
    assert "remove route 10.244.3.0/24 via 10.244.3.0 dev ns-vxlan.1 onlink" in daemon.output()


def test_host_gw_pods_ping_each_other_and_an_unconnected_peer_is_refused(
    cluster: Cluster,
) -> None:
    far = node_yaml(9, ip="10.88.0.9")
    cluster.write_snapshot(*NODES, extra=far)
    cluster.stop()
    try:
        cluster.start("host-gw", *NODES)
        for n in NODES:
            assert routes(n) == sorted(
                f"10.244.{p}.0/24 via 10.77.0.{p} dev eth0" for p in NODES if p != n
            ), n
        for src, dst in ((1, 2), (2, 3), (3, 1)):
            ping = cluster.ping(src, dst)
            assert ping.returncode == 0, (src, dst, ping.stdout + ping.stderr)
        daemon = cluster.daemons[1]
        assert daemon.metric('node_services_overlay_errors_total{reason="peer_not_connected"}') == 1
        assert daemon.metric("node_services_overlay_peers") == 2
        assert (
            "peer node-9: underlay address 10.88.0.9 is not on a directly connected network of "
            "eth0 (10.77.0.0/24); host-gw cannot route to it (use vxlan)"
        ) in daemon.output()
    finally:
        cluster.stop()  # the last test of the module: nothing needs the vxlan daemons again
