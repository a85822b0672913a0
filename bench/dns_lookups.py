"""What autopath saves a pod: glibc lookups (getaddrinfo, as `getent ahosts`) from a pod's
network namespace with a pod's resolv.conf (ndots:5, three search domains), autopath off vs
on, in one run.

Two namespaces of the benchmark's own, joined by a veth pair: the daemon and a table upstream
(tests/fakes/dns_table_upstream.py) on the "node" one's loopback, the resolver in the "pod"
one. For an external and a short in-cluster name it reports the queries the daemon receives
per lookup (its request counters) and the lookup latency p50/p99 (each lookup timed in one
Python process in the pod namespace: no process start in the numbers). Bounded: a fixed
number of lookups per name and mode. Needs root, `ip` and glibc; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import ROOT, record

NODE_IP, POD_IP = "10.78.0.1", "10.78.0.5"
UPSTREAM = ("127.0.0.2", 5300)
TABLE = {"api.example.com": [["A", "192.0.2.10"]]}
NAMES = (("external", "api.example.com"), ("short in-cluster", "web.shop"))

_TIMER = """
import json, socket, sys, time
name, count = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(count):
    started = time.perf_counter()
    try:
        socket.getaddrinfo(name, None)
    except socket.gaierror:
        pass
    times.append(time.perf_counter() - started)
print(json.dumps(times))
"""

_RESOLVES = """
import socket, sys
try:
    socket.getaddrinfo(sys.argv[1], None)
    print("yes")
except socket.gaierror:
    print("no")
"""

_REQUESTS = """
import sys, urllib.request
body = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
print(sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
          if line.startswith("node_services_dns_requests_total{")))
"""


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120).stdout


def _snapshot(path: Path) -> None:
    items = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"]},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "client", "namespace": "shop", "uid": "uid-client"},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Running", "podIP": POD_IP, "podIPs": [{"ip": POD_IP}]},
        },
    ]
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_lookups(quick: bool) -> None:
    """Print the lookup table and record its headline numbers (skipped without root)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("bench.dns lookups: skipped (needs root and iproute2 for network namespaces)")
        return
    count = 20 if quick else 200
    label = f"bench-dnsl-{os.getpid()}"
    node, pod = f"{label}-n", f"{label}-p"
    etc = [Path("/etc/netns") / node, Path("/etc/netns") / pod]
    rows: list[tuple[str, str, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-dnsl-") as tmpdir:
        tmp = Path(tmpdir)
        snapshot = tmp / "cluster.json"
        _snapshot(snapshot)
        try:
            for name in (node, pod):
                _run("ip", "netns", "add", name)
                _run("ip", "-n", name, "link", "set", "lo", "up")
            for directory in etc:
                directory.mkdir(parents=True, exist_ok=True)
            (etc[0] / "resolv.conf").write_text(f"nameserver {UPSTREAM[0]}\n")
            (etc[1] / "resolv.conf").write_text(
                f"nameserver {NODE_IP}\n"
                "search shop.svc.cluster.local svc.cluster.local cluster.local\n"
                "options ndots:5\n"
            )
            _run("ip", "-n", node, "link", "add", "eth0", "type", "veth", "peer", "eth0",
                 "netns", pod)  # fmt: skip
            _run("ip", "-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
            _run("ip", "-n", pod, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
            _run("ip", "-n", node, "link", "set", "eth0", "up")
            _run("ip", "-n", pod, "link", "set", "eth0", "up")
            for autopath in ("off", "on"):
                rows.extend(_measure(node, pod, snapshot, tmp, autopath, count))
        finally:
            for name in (node, pod):
                subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
            for directory in etc:
                shutil.rmtree(directory, ignore_errors=True)
    print(
        f"glibc lookups from a pod (ndots:5, 3 search domains), {count} per name and mode, "
        "getaddrinfo(AF_UNSPEC) = A + AAAA"
    )
    print(f"{'name':<18}{'autopath':>9}{'queries/lookup':>16}{'p50 ms':>9}{'p99 ms':>9}")
    for kind, autopath, queries, p50, p99 in rows:
        print(f"{kind:<18}{autopath:>9}{queries:>16.1f}{p50 * 1000:>9.3f}{p99 * 1000:>9.3f}")
    by = {(kind, autopath): (queries, p50, p99) for kind, autopath, queries, p50, p99 in rows}
    for kind, _ in NAMES:
        for autopath in ("off", "on"):
            queries, p50, p99 = by[(kind, autopath)]
            record(f"{kind} lookup, autopath {autopath}: queries", queries, "", "", None)
            record(f"{kind} lookup, autopath {autopath}: p50", p50 * 1000, "ms", "", None)
            record(f"{kind} lookup, autopath {autopath}: p99", p99 * 1000, "ms", "", None)
    external_on = by[("external", "on")][0]
    record("external lookup with autopath: queries", external_on, "", "<= 2", external_on <= 2)


def _measure(
    node: str, pod: str, snapshot: Path, tmp: Path, autopath: str, count: int
) -> list[tuple[str, str, float, float, float]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_SERVICES_")}
    env["NODE_SERVICES_DNS_AUTOPATH"] = autopath
    upstream = subprocess.Popen(
        ["ip", "netns", "exec", node, sys.executable,
         str(ROOT / "tests" / "fakes" / "dns_table_upstream.py"),
         UPSTREAM[0], str(UPSTREAM[1]), json.dumps(TABLE)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    admin = "127.0.0.1:9153"  # inside the node namespace: nothing else listens there
    log = (tmp / f"daemon-{autopath}.log").open("wb")
    daemon = subprocess.Popen(
        ["ip", "netns", "exec", node, sys.executable, "-m", "node_services", "run",
         "--snapshot", str(snapshot), "--node-name", "node-a",
         "--dns-listen", f"{NODE_IP}:53", "--admin-listen", admin,
         "--metadata-listen", "127.0.0.1:8080",
         "--upstream", f"{UPSTREAM[0]}:{UPSTREAM[1]}", "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )  # fmt: skip
    rows = []
    try:
        assert upstream.stdout is not None and upstream.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while True:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start (autopath {autopath})")
            out = _run("ip", "netns", "exec", pod, sys.executable, "-c", _RESOLVES,
                       "web.shop.svc.cluster.local")  # fmt: skip
            if out.strip() == "yes":
                break
            time.sleep(0.2)
        for kind, name in NAMES:
            before = float(_run("ip", "netns", "exec", node, sys.executable, "-c", _REQUESTS,
                                f"http://{admin}/metrics"))  # fmt: skip
            times = json.loads(_run("ip", "netns", "exec", pod, sys.executable, "-c", _TIMER,
                                    name, str(count)))  # fmt: skip
            after = float(_run("ip", "netns", "exec", node, sys.executable, "-c", _REQUESTS,
                               f"http://{admin}/metrics"))  # fmt: skip
            rows.append(
                (
                    kind,
                    autopath,
                    (after - before) / count,
                    _percentile(times, 0.5),
                    _percentile(times, 0.99),
                )
            )
    finally:
        for process in (daemon, upstream):
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
    return rows
