"""Metadata service benchmark: request rate against a minimal aiohttp handler, 10,000 parked
long-polls (daemon RSS growth), wake latency after a change, tree build time.

    python -m bench.metadata [--quick]

Everything runs on loopback: the real daemon as a subprocess fed a snapshot file (the recorded
Cattle scenario plus synthetic stacks), wrk (Debian ``wrk``) as the load generator, and a
minimal aiohttp app (uvloop, one route, fixed body, access log off) as the floor measured in
the same run. The machine is small and shared: numbers are noisy, compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench._common import record

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "tests" / "fixtures" / "cattle" / "recorded-scenario.json"

TARGET_RATIO = 1.5
"""Our requests per server CPU-second over the floor's, on /latest/services (the Go
rancher-metadata measured about 1.2-1.3x here)."""
TARGET_LATENCY_P99 = 0.005
"""p99 latency at 50 connections, seconds."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# With 2+ cores, servers on CPU 1 and wrk on CPU 0, so they do not trade places mid-run.
_PIN = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
PIN_SERVER = ["taskset", "-c", "1"] if _PIN else []
PIN_CLIENT = ["taskset", "-c", "0"] if _PIN else []
TARGET_P99 = 0.100

MINIMAL_SERVER = textwrap.dedent(
    """
    import json, sys, uvloop
    from aiohttp import web

    BODIES = {path: body.encode() for path, body in json.load(open(sys.argv[2])).items()}

    async def handle(request):
        return web.Response(body=BODIES.get(request.path, b"web-nginx-1"),
                            content_type="text/plain")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                handle_signals=True)
    """
)
"""The floor: one route answering each path with the same bytes as the daemon, from a dict."""


DEEP_LEAF = "/latest/stacks/web/services/nginx/containers/0/labels/io.rancher.stack.name"
"""A leaf eight keys deep: a walk through a stack, its service and a container's labels."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def metric(admin: str, name: str) -> float:
    for line in get(admin + "/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def make_snapshot(path: Path, stacks: int, services_per_stack: int, containers: int) -> None:
    """The recorded scenario with Web-nginx-1 on 127.0.0.1 (wrk cannot pick its source
    address, so the load generator is that container), plus synthetic stacks."""
    resources: list[dict[str, Any]] = json.loads(SCENARIO.read_text())
    for resource_ in resources:
        if resource_.get("name") == "Web-nginx-1":
            resource_["primaryIpAddress"] = "127.0.0.1"
    n = 0
    for s in range(stacks):
        stack_id = f"1st{1000 + s}"
        resources.append({"id": stack_id, "type": "stack", "name": f"stack{s}", "uuid": stack_id})
        for v in range(services_per_stack):
            service_id = f"1s{10000 + s * 100 + v}"
            resources.append(
                {
                    "id": service_id,
                    "type": "service",
                    "name": f"svc{v}",
                    "uuid": service_id,
                    "stackId": stack_id,
                    "scale": containers,
                    "launchConfig": {"ports": ["8080:80/tcp"], "labels": {"app": f"svc{v}"}},
                    "metadata": {"tier": "bench"},
                }
            )
            for c in range(containers):
                n += 1
                resources.append(
                    {
                        "id": f"1i{100000 + n}",
                        "type": "container",
                        "name": f"stack{s}-svc{v}-{c + 1}",
                        "uuid": f"c-bench-{n}",
                        "hostId": "1h1" if n % 2 else "1h2",
                        "primaryIpAddress": f"10.60.{n // 250}.{n % 250 + 1}",
                        "state": "running",
                        "healthState": "healthy",
                        "stackId": stack_id,
                        "serviceIds": [service_id],
                        "labels": {"io.rancher.stack.name": f"stack{s}"},
                    }
                )
    path.write_text(json.dumps(resources))


def bump(path: Path, value: str) -> None:
    resources = json.loads(path.read_text())
    resources[0]["labels"]["zone"] = value
    path.write_text(json.dumps(resources))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def wrk(url: str, seconds: int, connections: int, server_pid: int) -> tuple[float, float, float]:
    """(requests/s, requests per server CPU-second, p99 latency in seconds) of one wrk run."""
    before = cpu_seconds(server_pid)
    out = subprocess.run(
        [
            *PIN_CLIENT,
            "wrk",
            "--latency",
            "-t",
            "1",
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    used = cpu_seconds(server_pid) - before
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if match is None or total is None or p99 is None or errors is not None:
        raise RuntimeError(f"wrk failed against {url}:\n{out}")
    per_cpu = int(total.group(1)) / used if used > 0 else 0.0
    return float(match.group(1)), per_cpu, float(p99.group(1)) * _UNITS[p99.group(2)]


def park(url: str, count: int) -> list[socket.socket]:
    host, _, rest = url.removeprefix("http://").partition("/")
    address, _, port = host.partition(":")
    request = f"GET /{rest} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((address, int(port)), timeout=10)
        sock.sendall(request)
        sockets.append(sock)
    return sockets


def collect(sockets: list[socket.socket], timeout: float) -> list[float]:
    """The arrival time of each socket's answer (the 200s only). Every answer in a batch
    epoll reports had arrived when it returned: all are stamped with that time. Per event the
    loop only notes the stamp (one-shot registrations need no unregister call; the answers
    are read and checked after the last one arrived), so the client's own work delays the
    next stamp as little as it can."""
    by_fd = {sock.fileno(): sock for sock in sockets}
    poller = select.epoll()
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN | select.EPOLLONESHOT)
    stamped: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(stamped) < len(sockets) and time.monotonic() < deadline:
            events = poller.poll(0.5, len(sockets))
            at = time.monotonic()
            for fd, _ in events:
                stamped[fd] = at
    finally:
        poller.close()
    arrivals = []
    for fd, at in stamped.items():
        sock = by_fd[fd]
        sock.settimeout(5)
        if sock.recv(65536).startswith(b"HTTP/1.1 200"):
            arrivals.append(at)
    return arrivals


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def long_poll_round(
    base: str, admin: str, pid: int, snapshot: Path, count: int, label: str
) -> dict[str, float]:
    version = int(metric(admin, "node_services_store_version"))
    url = f"{base}/latest/version?wait=true&value={version}&maxWait=110"
    rss_before = rss_kib(pid)
    started = time.monotonic()
    sockets = park(url, count)
    deadline = time.monotonic() + 60
    while metric(admin, "node_services_metadata_waiters") < count:
        if time.monotonic() > deadline:
            raise RuntimeError("waiters did not all park")
        time.sleep(0.1)
    parked = time.monotonic() - started
    rss_after = rss_kib(pid)
    bump(snapshot, label)
    sent = time.monotonic()
    os.kill(pid, signal.SIGHUP)
    arrivals = collect(sockets, timeout=60)
    for sock in sockets:
        sock.close()
    if len(arrivals) != count:
        raise RuntimeError(f"only {len(arrivals)} of {count} waiters answered")
    first = min(arrivals)
    after_first = [a - first for a in arrivals]
    after_sighup = [a - sent for a in arrivals]
    return {
        "sighup_p99": quantile(after_sighup, 0.99),
        "parked_seconds": parked,
        "rss_growth_mib": (rss_after - rss_before) / 1024,
        "rss_per_waiter_kib": (rss_after - rss_before) / count,
        "sighup_to_first": first - sent,
        "p50": quantile(after_first, 0.50),
        "p99": quantile(after_first, 0.99),
        "max": max(after_first),
    }


def tree_build_seconds(pods: int) -> tuple[float, float]:
    """(build seconds of the latest tree, render seconds of /latest JSON) for a synthetic
    Kubernetes snapshot of ``pods`` pods in 100 namespaces, each 10 pods a service."""
    sys.path.insert(0, str(ROOT))
    from node_services.metadata import render
    from node_services.metadata.tree import V3, Environment, build_tree
    from node_services.state.records import Endpoint, Endpoints, Host, Service, Stack, Workload
    from node_services.state.store import Store

    records: list[Any] = [Host(key="k8s:Node/n1", source="b", name="n1", addresses=("10.0.0.1",))]
    for ns in range(100):
        records.append(Stack(key=f"k8s:Namespace/ns{ns}", source="b", name=f"ns{ns}"))
    for i in range(pods):
        svc = i // 10
        ns = svc % 100
        pod_key = f"k8s:Pod/ns{ns}/pod{i}"
        records.append(
            Workload(
                key=pod_key,
                source="b",
                namespace=f"ns{ns}",
                name=f"pod{i}",
                stack_key=f"k8s:Namespace/ns{ns}",
                ips=(f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",),
                host_key="k8s:Node/n1",
                state="running",
                ready=True,
            )
        )
        if i % 10 == 0:
            records.append(
                Service(
                    key=f"k8s:Service/ns{ns}/svc{svc}",
                    source="b",
                    namespace=f"ns{ns}",
                    name=f"svc{svc}",
                    stack_key=f"k8s:Namespace/ns{ns}",
                    cluster_ips=(f"172.16.{svc // 256 % 256}.{svc % 256}",),
                )
            )
        records.append(
            Endpoints(
                key=f"k8s:EndpointSlice/ns{ns}/e{i}",
                source="b",
                namespace=f"ns{ns}",
                service=f"svc{svc}",
                service_key=f"k8s:Service/ns{ns}/svc{svc}",
                endpoints=(Endpoint(addresses=("10.1.1.1",), target_key=pod_key),),
            )
        )
    store = Store()
    store.replace("b", records)
    started = time.perf_counter()
    tree = build_tree(store.snapshot, V3, environment=Environment(), node_name="n1")
    built = time.perf_counter() - started
    started = time.perf_counter()
    render.json_body(tree.root)
    return built, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metadata", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench.metadata: wrk is not installed (Debian package wrk); skipped")
        return 0
    seconds = 1 if args.quick else 3
    waiters = 1000 if args.quick else 10_000
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the daemon inherits it
    if hard < waiters + 200:  # the daemon and this process each hold one socket per waiter
        waiters = max(100, hard - 200)

    with tempfile.TemporaryDirectory(prefix="bench-metadata-") as tmp:
        snapshot = Path(tmp) / "snapshot.json"
        make_snapshot(snapshot, stacks=5 if args.quick else 20, services_per_stack=5, containers=4)
        md_port, admin_port, peer_port = free_port(), free_port(), free_port()
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("NODE_SERVICES_", "CATTLE_"))
        }
        env["NODE_SERVICES_SNAPSHOT_POLL_INTERVAL"] = "0"
        daemon = subprocess.Popen(
            [
                *PIN_SERVER,
                sys.executable,
                "-m",
                "node_services",
                "run",
                "--snapshot",
                str(snapshot),
                "--node-name",
                "node1",
                "--metadata-listen",
                f"127.0.0.1:{md_port}",
                "--admin-listen",
                f"127.0.0.1:{admin_port}",
                "--dns-listen",
                f"127.0.0.1:{free_port()}",
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=ROOT,
        )
        peer: subprocess.Popen[bytes] | None = None
        try:
            base = f"http://127.0.0.1:{md_port}"
            admin = f"http://127.0.0.1:{admin_port}"
            wait_http(admin + "/readyz")
            paths = (
                "/latest/self/container/name",
                "/latest/services",
                DEEP_LEAF,
            )
            bodies = Path(tmp) / "bodies.json"
            bodies.write_text(json.dumps({p: get(base + p) for p in paths}))
            peer = subprocess.Popen(
                [*PIN_SERVER, sys.executable, "-c", MINIMAL_SERVER, str(peer_port), str(bodies)],
                env=env,
            )
            wait_http(f"http://127.0.0.1:{peer_port}/")
            assert get(base + "/latest/self/container/name") == "web-nginx-1"
            services = get(base + "/latest/services").count("\n")
            print(
                f"metadata benchmark ({'quick' if args.quick else 'full'}); machine: "
                f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} (shared: numbers noisy)"
            )
            print(f"snapshot: {services} services in the tree")
            rounds = 3 if args.quick else 5
            print(
                f"\nwrk -t1 -c50 -d{seconds}s, best of {rounds} interleaved rounds; requests per"
                " server CPU-second (the server process's utime+stime from /proc), requests/s"
                " and p99\nlatency; floor = a minimal aiohttp handler returning the same bytes "
                "from a dict:"
            )
            for path in paths:
                ours = floor = (0.0, 0.0, float("inf"))
                for _ in range(rounds):
                    theirs = wrk(f"http://127.0.0.1:{peer_port}{path}", seconds, 50, peer.pid)
                    mine = wrk(base + path, seconds, 50, daemon.pid)
                    floor = (
                        max(floor[0], theirs[0]),
                        max(floor[1], theirs[1]),
                        min(floor[2], theirs[2]),
                    )
                    ours = (max(ours[0], mine[0]), max(ours[1], mine[1]), min(ours[2], mine[2]))
                ratio = ours[1] / floor[1] if floor[1] else 0.0
                judged = path == "/latest/services"
                passed = ratio >= TARGET_RATIO and ours[2] < TARGET_LATENCY_P99
                verdict = ("ok" if passed else "BELOW TARGET") if judged else "(not judged)"
                record(
                    f"{path} per CPU-second vs aiohttp floor",
                    ratio,
                    "x",
                    f">= {TARGET_RATIO}x, p99 < {TARGET_LATENCY_P99 * 1000:.0f} ms"
                    if judged
                    else "",
                    passed if judged else None,
                )
                print(
                    f"  {path}\n    ours  {ours[1]:8.0f} req/CPU-s {ours[0]:8.0f} req/s "
                    f"p99 {ours[2] * 1000:5.2f} ms\n    floor {floor[1]:8.0f} req/CPU-s "
                    f"{floor[0]:8.0f} req/s p99 {floor[2] * 1000:5.2f} ms\n    = {ratio:.2f}x "
                    f"per CPU-second (target >= {TARGET_RATIO}x on /latest/services, p99 < "
                    f"{TARGET_LATENCY_P99 * 1000:.0f} ms) {verdict}"
                )

            print(
                "\nlong-poll (raw HTTP/1.1 sockets). Wake latency = each client's answer arrival"
                "\n(stamped when select() reports it) minus the first answer's arrival, which "
                "stands\nfor the change being published; the SIGHUP-based p99 also includes "
                "re-reading\nthe snapshot file (an upper bound):"
            )
            for count in sorted({min(1000, waiters), waiters}):
                result = long_poll_round(base, admin, daemon.pid, snapshot, count, f"z{count}")
                verdict = "ok" if result["p99"] < TARGET_P99 else "ABOVE TARGET"
                record(
                    f"wake p99, {count} waiters",
                    result["p99"] * 1000,
                    "ms",
                    f"< {TARGET_P99 * 1000:.0f} ms",
                    result["p99"] < TARGET_P99,
                )
                print(
                    f"  {count:6d} waiters: parked in {result['parked_seconds']:.1f}s, daemon RSS "
                    f"+{result['rss_growth_mib']:.1f} MiB ({result['rss_per_waiter_kib']:.1f} KiB"
                    f"/waiter); SIGHUP->first answer {result['sighup_to_first'] * 1000:.0f} ms; "
                    f"wake p50 {result['p50'] * 1000:.0f} ms, p99 {result['p99'] * 1000:.0f} ms "
                    f"(target < {TARGET_P99 * 1000:.0f} ms) {verdict}, max "
                    f"{result['max'] * 1000:.0f} ms; from SIGHUP p99 "
                    f"{result['sighup_p99'] * 1000:.0f} ms"
                )
        finally:
            processes = [daemon] if peer is None else [daemon, peer]
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    pods = 2000 if args.quick else 20_000
    built, rendered = tree_build_seconds(pods)
    print(
        f"\ntree build (in process, {pods} pods, {pods // 10} services, latest): "
        f"{built * 1000:.0f} ms; /latest JSON render {rendered * 1000:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
