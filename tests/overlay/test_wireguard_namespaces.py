"""Three namespace "hosts" on an underlay bridge with the wireguard backend (wireguard-go).

As in test_namespaces.py: an "underlay" namespace holds the bridge joining the hosts' veths
(the machine's own namespace is never touched); each host namespace has eth0 10.78.0.N/24,
the daemon, and one pod made by Debian's CNI ``bridge`` plugin with node-services-ipam. This
kernel has no wireguard module, so each daemon starts ``wireguard-go`` itself (the ``auto``
implementation's fallback). wireguard-go's socket directory /var/run/wireguard is not per
network namespace: each daemon runs in its own mount namespace (``unshare --mount``) with a
tmpfs there, and ``wg`` is run inside that namespace (``nsenter``). Names carry the test's
PID; every namespace and process is removed afterwards, also when a test fails.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from node_services.overlay.wgkeys import PrivateKey, public_of

BRIDGE = Path("/usr/lib/cni/bridge")
PID = os.getpid()
UNDERLAY = f"nswg-ul-{PID}"
DEVICE = "ns-wg"
PORT = 51820
MTU = 1420  # the veths' 1500 less WireGuard's 80
INTERVAL = 1.0
NODES = (1, 2, 3)
TOOLS = ("ip", "ping", "curl", "wireguard-go", "wg", "tcpdump", "unshare", "nsenter")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(
        not BRIDGE.exists(), reason="needs Debian containernetworking-plugins (/usr/lib/cni/bridge)"
    ),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in TOOLS),
        reason="needs iproute2, iputils-ping, curl, wireguard-go, wireguard-tools, tcpdump and "
        "util-linux (unshare, nsenter)",
    ),
    pytest.mark.skipif(not Path("/dev/net/tun").exists(), reason="wireguard-go needs /dev/net/tun"),
]


def run(*args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        check=check,
        timeout=30,
        **kwargs,  # type: ignore[call-overload]
    )


def host_ns(n: int) -> str:
    return f"nswg-h{n}-{PID}"


def pod_ns(n: int) -> str:
    return f"nswg-p{n}-{PID}"


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def node_yaml(n: int, key: str = "") -> str:
    annotations = (
        f"  annotations: {{node-services.io/wireguard-public-key: {json.dumps(key)}}}\n"
        if key
        else ""
    )
    return f"""apiVersion: v1
kind: Node
metadata:
  name: node-{n}
{annotations}spec:
  podCIDR: 10.245.{n}.0/24
  podCIDRs: [10.245.{n}.0/24]
status:
  addresses:
  - {{address: 10.78.0.{n}, type: InternalIP}}
  conditions:
  - {{type: Ready, status: "True"}}
"""


@dataclass
class Host:
    n: int
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    wireguard_go: set[int] = field(default_factory=set)  # PIDs its daemon logged starting

    @property
    def log_path(self) -> Path:
        return self.root / f"daemon-{self.n}.log"

    @property
    def key_file(self) -> Path:
        return self.root / f"state-{self.n}" / "wireguard" / "private.key"

    def start(self, *, mount_of: int = 0) -> None:
        """The daemon in a new private mount namespace, or (``mount_of``) in that of a running
        process: a restarted daemon must see the wireguard-go socket its predecessor made."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_SERVICES_")}
        env.update(
            NODE_SERVICES_IPAM="on",
            NODE_SERVICES_OVERLAY_RECONCILE_INTERVAL=str(INTERVAL),
            NODE_SERVICES_SNAPSHOT_POLL_INTERVAL="0.1",
            NODE_SERVICES_CNI_CONF_DIR=str(self.root / f"net.d-{self.n}"),
            NODE_SERVICES_OVERLAY_WIREGUARD_KEY_FILE=str(self.key_file),
        )
        # a private mount namespace with its own /var/run/wireguard (propagation private:
        # the tmpfs is seen by this daemon and the wireguard-go it starts only)
        script = (
            "mkdir -p /var/run/wireguard && mount -t tmpfs -o mode=0700 nswg /var/run/wireguard"
            ' && exec "$@"'
        )
        enter = (
            ["nsenter", "-t", str(mount_of), "-m", "-n"]
            if mount_of
            else [
                "ip", "netns", "exec", host_ns(self.n),
                "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            ]
        )  # fmt: skip
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *enter,
                sys.executable, "-m", "node_services", "run",
                "--node-name", f"node-{self.n}",
                "--admin-listen", "127.0.0.1:9254",
                "--dns-listen", "127.0.0.1:5353",
                "--metadata-listen", "127.0.0.1:8080",
                "--upstream", "127.0.0.1:1",
                "--overlay", "wireguard",
                "--snapshot", str(self.root / "snapshot.yaml"),
                "--ipam-dir", str(self.root / f"ipam-{self.n}"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
        log.close()

    def get(self, path: str, port: int = 9254) -> tuple[int, str]:
        done = run(
            "ip", "netns", "exec", host_ns(self.n),
            "curl", "-s", "-m", "2", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}{path}",
            check=False,
        )  # fmt: skip
        body, _, code = done.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon on node-{self.n} exited:\n{self.output()}")
            return self.get("/readyz")[0] == 200

        try:
            wait_until(ready, f"node-{self.n} ready", timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.get('/readyz')}\n{self.output()}") from None
        self.wireguard_go |= {
            int(pid)
            for pid in re.findall(r"started wireguard-go for \S+ \(pid (\d+)", self.output())
        }

    def wg(self, *args: str) -> str:
        """``wg`` in this host's network and mount namespaces (where the socket is)."""
        assert self.proc is not None
        target = str(self.proc.pid)  # ip netns exec, unshare and sh exec: the daemon's PID
        return run("nsenter", "-t", target, "-m", "-n", "wg", *args).stdout

    def peers(self) -> dict[str, tuple[str, str, str]]:
        """public key -> (endpoint, allowed ips, keepalive), as ``wg show <dev> dump`` says."""
        lines = self.wg("show", DEVICE, "dump").splitlines()[1:]
        out = {}
        for line in lines:
            key, _psk, endpoint, allowed, _hs, _rx, _tx, keepalive = line.split("\t")
            out[key] = (endpoint, allowed, keepalive)
        return out

    def routes(self) -> list[str]:
        shown = run("ip", "-n", host_ns(self.n), "-4", "route", "show", "proto", "77").stdout
        return sorted(" ".join(line.split()) for line in shown.splitlines())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Cluster:
    root: Path
    cni_path: Path
    hosts: dict[int, Host] = field(default_factory=dict)
    pod_ips: dict[int, str] = field(default_factory=dict)

    def write_snapshot(self, *nodes: int, keys: dict[int, str] | None = None) -> None:
        keys = keys if keys is not None else self.public_keys()
        docs = [node_yaml(n, keys.get(n, "")) for n in nodes]
        path = self.root / "snapshot.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("---\n".join(docs))
        tmp.replace(path)

    def public_keys(self) -> dict[int, str]:
        """Each host's public key, from its key file (``wg pubkey``, not our code)."""
        keys = {}
        for n, host in self.hosts.items():
            if host.key_file.exists():
                keys[n] = run("wg", "pubkey", input=host.key_file.read_text()).stdout.strip()
        return keys

    def expected_peers(self, n: int, *peers: int) -> dict[str, tuple[str, str, str]]:
        keys = self.public_keys()
        return {keys[p]: (f"10.78.0.{p}:{PORT}", f"10.245.{p}.0/24", "off") for p in peers}

    def converged(self, n: int, *peers: int) -> bool:
        routes = sorted(f"10.245.{p}.0/24 dev {DEVICE}" for p in peers)
        return self.hosts[n].peers() == self.expected_peers(n, *peers) and (
            self.hosts[n].routes() == routes
        )

    def add_pod(self, n: int) -> None:
        conflist = json.loads((self.root / f"net.d-{n}" / "10-node-services.conflist").read_text())
        config = {
            "cniVersion": conflist["cniVersion"],
            "name": conflist["name"],
            **conflist["plugins"][0],
        }
        assert config["mtu"] == MTU
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": f"wgpod{n}",
            "CNI_NETNS": f"/var/run/netns/{pod_ns(n)}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(self.cni_path),
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=wgpod{n}",
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
        return run(
            "ip", "netns", "exec", pod_ns(src),
            "ping", "-c", "1", "-W", "2", *extra, self.pod_ips[dst],
            check=False,
        )  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("wireguard")
    cni_path = root / "cni-bin"
    subprocess.run(
        [sys.executable, "-m", "node_services.ipam.cni", "--install", str(cni_path)],
        check=True,
        capture_output=True,
    )
    made = [UNDERLAY]
    cluster = Cluster(root, cni_path)
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
                "peer", "name", f"w{n}", "netns", UNDERLAY,
            )  # fmt: skip
            run("ip", "-n", UNDERLAY, "link", "set", f"w{n}", "master", "br0", "up")
            run("ip", "-n", host_ns(n), "addr", "add", f"10.78.0.{n}/24", "dev", "eth0")
            run("ip", "-n", host_ns(n), "link", "set", "eth0", "up")
            cluster.hosts[n] = Host(n, root)
        cluster.write_snapshot(*NODES, keys={})  # no keys yet: each daemon makes its own
        for host in cluster.hosts.values():
            host.start()
        for host in cluster.hosts.values():
            host.wait_ready()
        cluster.write_snapshot(*NODES)  # what each node's annotation would carry
        for n in NODES:
            wait_until(
                lambda n=n: cluster.converged(n, *(p for p in NODES if p != n)),  # type: ignore[misc]
                f"node-{n} has its two peers",
            )
            cluster.add_pod(n)
        yield cluster
    finally:
        for host in cluster.hosts.values():
            host.stop()
        # the wireguard-go each daemon started (it outlives the daemon by design): by PID
        for host in cluster.hosts.values():
            for pid in sorted(host.wireguard_go):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for host in cluster.hosts.values():
            for pid in sorted(host.wireguard_go):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                    time.sleep(0.05)
        for ns in reversed(made):
            left = run("ip", "netns", "pids", ns, check=False).stdout.split()
            if left:
                sys.stderr.write(f"processes left in {ns}: {left}\n")
            run("ip", "netns", "del", ns, check=False)
        for n, host in cluster.hosts.items():
            if host.log_path.exists():
                sys.stderr.write(f"--- node-{n} daemon log (tail)\n{host.output()[-3000:]}\n")


@pytest.fixture
def wg_cluster(cluster: Cluster) -> Iterator[Cluster]:
    """The three nodes converged, each with its two peers; restored after a test."""
    yield cluster
    cluster.write_snapshot(*NODES)
    for n in NODES:
        wait_until(
            lambda n=n: cluster.converged(n, *(p for p in NODES if p != n)),  # type: ignore[misc]
            f"node-{n} back to its two peers",
        )
    # a peer removed and added again on one side starts without a session while the other
    # side still sends with the old one: WireGuard re-handshakes after ~15 s of no answer
    pairs = [(src, dst) for src in NODES for dst in NODES if src != dst and src in cluster.pod_ips]
    wait_until(
        lambda: all(cluster.ping(src, dst).returncode == 0 for src, dst in pairs),
        "every pod reaching every other again",
        timeout=60,
    )


def test_pods_on_different_hosts_ping_each_other_through_wireguard(wg_cluster: Cluster) -> None:
    cluster = wg_cluster
    assert cluster.pod_ips == {1: "10.245.1.2", 2: "10.245.2.2", 3: "10.245.3.2"}
    host = cluster.hosts[1]
    link = run("ip", "-n", host_ns(1), "link", "show", DEVICE).stdout
    assert f"mtu {MTU} " in link
    addrs = run("ip", "-n", host_ns(1), "-4", "-o", "addr", "show", "dev", DEVICE).stdout
    assert [line.split()[3] for line in addrs.splitlines()] == ["10.245.1.0/32"]
    shown = host.wg("show", DEVICE)
    assert f"listening port: {PORT}" in shown
    assert f"public key: {cluster.public_keys()[1]}" in shown
    for src, dst in ((1, 2), (1, 3), (3, 2), (2, 1)):
        ping = cluster.ping(src, dst)
        assert ping.returncode == 0, (src, dst, ping.stdout + ping.stderr)
    code, body = host.get("/metrics")
    assert code == 200
    assert "node_services_overlay_peers 2.0" in body.splitlines()
    assert "started wireguard-go for ns-wg" in host.output()


def test_underlay_carries_only_udp_to_the_wireguard_port(wg_cluster: Cluster) -> None:
    """On the underlay's bridge ports (a capture on the bridge itself misses what it forwards)."""
    cluster = wg_cluster
    pcap = cluster.root / "underlay.pcap"
    errors = cluster.root / "tcpdump.err"
    with errors.open("wb") as err:
        dump = subprocess.Popen(
            [
                "ip", "netns", "exec", UNDERLAY,
                "tcpdump", "-i", "any", "-n", "-U", "--immediate-mode", "-Z", "root",
                "-w", str(pcap), "ip",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )  # fmt: skip
    try:
        wait_until(lambda: b"listening on" in errors.read_bytes(), "tcpdump listening")
        pattern = "6e73776770696e67"  # "nswgping": must not cross the underlay in clear
        for src, dst in ((1, 2), (2, 3), (3, 1)):
            ping = cluster.ping(src, dst, "-p", pattern, "-s", "64")
            assert ping.returncode == 0, ping.stdout + ping.stderr
        time.sleep(1.0)  # let tcpdump write the last packets
    finally:
        dump.send_signal(signal.SIGINT)
        try:
            dump.wait(timeout=10)
        except subprocess.TimeoutExpired:
            dump.kill()
            dump.wait()
    lines = run("tcpdump", "-n", "-r", str(pcap)).stdout.splitlines()
    assert len(lines) >= 6, lines  # three echo requests and their replies, at least
    udp = re.compile(r"IP 10\.78\.0\.[123]\.51820 > 10\.78\.0\.[123]\.51820: UDP, length \d+$")
    assert [line for line in lines if not udp.search(line)] == []
    assert not any("ICMP" in line for line in lines)
    assert bytes.fromhex(pattern) * 2 not in pcap.read_bytes()
    destinations = {re.findall(r"> (10\.78\.0\.\d)\.51820:", line)[0] for line in lines}
    assert destinations == {f"10.78.0.{n}" for n in NODES}


def test_a_removed_node_peer_disappears_from_the_others(wg_cluster: Cluster) -> None:
    cluster = wg_cluster
    gone = cluster.public_keys()[3]
    cluster.write_snapshot(1, 2)
    wait_until(
        lambda: cluster.converged(1, 2) and cluster.converged(2, 1),
        "node-3's peer and routes gone from node-1 and node-2",
    )
    for n in (1, 2):
        assert gone not in cluster.hosts[n].wg("show", DEVICE)
    assert cluster.ping(1, 2).returncode == 0
    assert f"remove wireguard peer (key {gone})" in cluster.hosts[1].output()


def test_a_rotated_key_restores_connectivity_within_one_reconcile(wg_cluster: Cluster) -> None:
    cluster = wg_cluster
    host = cluster.hosts[2]
    old = cluster.public_keys()[2]
    new_key = PrivateKey.generate()
    tmp = host.key_file.with_name("rotate.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, (new_key.b64() + "\n").encode())
    os.close(fd)
    tmp.replace(host.key_file)  # an operator's rotation: a new key in the file
    wait_until(
        lambda: f"public key: {new_key.public}" in host.wg("show", DEVICE),
        "node-2's device re-keyed",
        timeout=INTERVAL * 5,
    )
    assert cluster.ping(1, 2).returncode != 0  # node-1 still knows the old key only
    passes_before = metric(cluster.hosts[1], "node_services_overlay_reconcile_seconds_count")
    cluster.write_snapshot(*NODES)  # the new public key, as node-2's annotation would carry
    took = wait_until(
        lambda: cluster.converged(1, 2, 3) and cluster.converged(3, 1, 2),
        "node-1 and node-3 re-keyed node-2",
        timeout=INTERVAL * 5,
    )
    # the store change triggers a pass: one pass re-keys (plus slack on a busy machine)
    assert took <= INTERVAL + 2.0, took
    passes = metric(cluster.hosts[1], "node_services_overlay_reconcile_seconds_count")
    assert passes - passes_before <= 3, passes - passes_before
    for src, dst in ((1, 2), (2, 3)):
        ping = cluster.ping(src, dst)
        assert ping.returncode == 0, (src, dst, ping.stdout + ping.stderr)
    assert old not in cluster.hosts[1].wg("show", DEVICE)
    assert f"remove wireguard peer (key {old})" in cluster.hosts[1].output()
    assert f"add wireguard peer node-2 (key {new_key.public})" in cluster.hosts[1].output()


def test_the_private_key_is_0600_and_appears_in_no_log_metric_or_metadata(
    wg_cluster: Cluster,
) -> None:
    cluster = wg_cluster
    for n, host in cluster.hosts.items():
        assert os.stat(host.key_file).st_mode & 0o777 == 0o600, n
        secret = host.key_file.read_text().strip()
        assert public_of(base64.b64decode(secret)) == cluster.public_keys()[n]
        forms = (secret, base64.b64decode(secret).hex())
        _, metrics = host.get("/metrics")
        answers = [
            host.get(path, port=8080)[1]
            for path in ("/latest/hosts", "/latest/self/host", "/2015-12-19/hosts?format=json")
        ]
        for text in (host.output(), metrics, *answers):
            for form in forms:
                assert form not in text, n
        assert any(f"node-{n}" in answer for answer in answers), answers


def metric(host: Host, name: str) -> float:
    for line in host.get("/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_restarted_daemon_finds_its_wireguard_go_and_traffic_never_stops(
    wg_cluster: Cluster,
) -> None:
    cluster = wg_cluster
    host = cluster.hosts[1]
    (wireguard_go,) = host.wireguard_go
    host.stop()
    assert Path(f"/proc/{wireguard_go}").exists()  # the device outlives its daemon
    ping = cluster.ping(2, 1)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    started = host.output().count("started wireguard-go")
    host.start(mount_of=wireguard_go)
    host.wait_ready()
    assert host.wireguard_go == {wireguard_go}
    assert host.output().count("started wireguard-go") == started  # found running, reused
    assert cluster.converged(1, 2, 3)
    for src, dst in ((1, 2), (3, 1)):
        ping = cluster.ping(src, dst)
        assert ping.returncode == 0, (src, dst, ping.stdout + ping.stderr)


def test_drifted_and_foreign_peers_are_corrected_within_one_period_a_roamed_endpoint_kept(
    wg_cluster: Cluster,
) -> None:
    cluster = wg_cluster
    host = cluster.hosts[1]
    keys = cluster.public_keys()
    stranger = PrivateKey.generate().public
    replaced = f"replace wireguard peer node-2 (key {keys[2]})"
    before = host.output().count(replaced)
    # another endpoint, as WireGuard sets it from the source of a peer's packets (NAT,
    # multi-homed): not drift; the AllowedIPs are
    roamed = "10.78.0.99:51820"
    host.wg("set", DEVICE, "peer", keys[2], "endpoint", roamed,
            "allowed-ips", "10.245.2.0/24,10.99.0.0/24")  # fmt: skip
    host.wg("set", DEVICE, "peer", stranger, "allowed-ips", "10.98.0.0/24")
    expected = cluster.expected_peers(1, 2, 3)
    expected[keys[2]] = (roamed, *expected[keys[2]][1:])
    routes = sorted(f"10.245.{p}.0/24 dev {DEVICE}" for p in (2, 3))

    def repaired() -> bool:
        return host.peers() == expected and host.routes() == routes

    try:
        assert not repaired()
        took = wait_until(repaired, "node-1's peers repaired", timeout=10)
        assert took <= INTERVAL + 2.0, took
        assert stranger not in host.wg("show", DEVICE)
        assert f"{replaced} allowed-ips 10.245.2.0/24" in host.output()
        assert f"remove wireguard peer (key {stranger})" in host.output()
        time.sleep(3 * INTERVAL)  # more passes: the roamed endpoint stays, nothing replaced
        assert host.peers() == expected
        assert host.output().count(replaced) == before + 1
    finally:
        host.wg("set", DEVICE, "peer", keys[2], "endpoint", f"10.78.0.2:{PORT}")
