"""DNS benchmark: dnsperf against node-services and against dnsmasq, same names, one run.

Both servers run on loopback. node-services loads a snapshot of 10,000 ClusterIP services
(100 namespaces) with 100,000 endpoints; dnsmasq serves the same 10,000 names from a hosts
file with ``--local=/cluster.local/`` (authoritative NXDOMAIN for the rest, no upstream).
The query mix is 50% hits and 50% ndots:5 search-path misses (NXDOMAIN), the way a pod's
resolver expands a short name. Prints QPS, queries per server CPU-second (utime + stime of
the server process over the run), latency, the ratio, and node-services' RSS. The two servers
take turns in short rounds (dnsmasq, node-services, dnsmasq, ...) and each one's rounds are
summed, so a change in the machine's background load during the run hits both alike.

Targets: node-services >= 1.0x dnsmasq's queries per CPU-second with per-client views on
(issue 13; issue 3 asked 0.9x without them); RSS < 150 MB.

Then ``bench/dns_lookups.py`` (glibc lookups, autopath off and on) and
``bench/dns_forward.py`` (forwarded names: cache hits and serve-stale, next to dnsmasq).

Run: ``python -m bench.dns`` (``--quick`` for a short smoke run). The machine is shared and
small: expect noise of 10-20% between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench._common import record
from bench.dns_lookups import run_lookups

ZONE = "cluster.local"
LOCAL_PODS = 250
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A loopback port free for both UDP and TCP."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port")


def names(services: int, namespaces: int) -> list[tuple[str, str, str]]:
    """(namespace, service, cluster IP) for every service."""
    out = []
    for i in range(services):
        ns = f"ns-{i % namespaces}"
        out.append((ns, f"svc-{i}", f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"))
    return out


def write_snapshot(path: Path, services: list[tuple[str, str, str]], endpoints: int) -> None:
    """A kubectl-style JSON List: namespaces, services and one EndpointSlice per service."""
    per_service = max(endpoints // max(len(services), 1), 0)
    items: list[dict[str, Any]] = []
    for ns in sorted({ns for ns, _, _ in services}):
        items.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    for index, (ns, name, ip) in enumerate(services):
        items.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": ip,
                    "clusterIPs": [ip],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                    "selector": {"app": name},
                },
            }
        )
        if per_service:
            items.append(
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "addressType": "IPv4",
                    "metadata": {
                        "name": f"{name}-abcde",
                        "namespace": ns,
                        "labels": {"kubernetes.io/service-name": name},
                    },
                    "endpoints": [
                        {
                            "addresses": [
                                f"10.{(index * per_service + j) // 65536 % 64 + 128}."
                                f"{(index * per_service + j) // 256 % 256}."
                                f"{(index * per_service + j) % 256}"
                            ],
                            "conditions": {"ready": True},
                            "nodeName": "node-a",
                        }
                        for j in range(per_service)
                    ],
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                }
            )
    # A node's worth of pods on this node (node-a): with autopath on, each gets a per-client
    # view, so the index the server consults per query is populated as in production.
    for index in range(LOCAL_PODS):
        ns = f"ns-{index % 100}"
        ip = f"10.200.{index // 256}.{index % 256}"
        items.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"pod-{index}", "namespace": ns, "uid": f"uid-{index}"},
                "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "x"}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
            }
        )
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def write_queries(path: Path, services: list[tuple[str, str, str]], count: int) -> None:
    """50% hits; 50% misses a pod in namespace X makes before (or instead of) the hit."""
    rng = random.Random(7)
    lines = []
    for i in range(count):
        ns, name, _ = rng.choice(services)
        if i % 2 == 0:
            lines.append(f"{name}.{ns}.svc.{ZONE} A")
        else:
            own = f"ns-{rng.randrange(100)}"
            lines.append(
                rng.choice(
                    [
                        f"{name}.{ns}.{own}.svc.{ZONE} A",  # "name.ns" + <own>.svc.zone
                        f"{name}.{ns}.svc.{ZONE} A".replace(".svc.", ".svc.svc.", 1),
                        f"{name}.{ns}.svc.{ZONE}.{own}.svc.{ZONE} A",
                        f"{name}.{ns}.svc.{ZONE}.svc.{ZONE} A",
                        f"{name}.{own}.svc.{ZONE} A",  # short name in the wrong namespace
                    ]
                )
            )
    path.write_text("\n".join(lines) + "\n")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ask_a(port: int, name: str, timeout: float) -> bytes | None:
    """The reply to one A query for ``name`` at 127.0.0.1:``port`` (a tiny UDP client; None
    when none came within ``timeout`` s)."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    packet = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, ("127.0.0.1", port))
        try:
            return sock.recv(4096)
        except TimeoutError:
            return None


def answers(port: int, name: str) -> bool:
    """Whether the server answers NOERROR with an answer for ``name``."""
    reply = ask_a(port, name, 0.5)
    return reply is not None and reply[3] & 0xF == 0 and reply[6:8] != b"\x00\x00"


def wait_until(check: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the server exited with {proc.returncode}")
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def dnsperf(
    port: int, queries: Path, seconds: float, pid: int, *, once: bool = False
) -> dict[str, float]:
    """One dnsperf run for ``seconds`` (``once``: through the file one time instead) and the
    server's CPU seconds over it."""
    limit = ["-n", "1"] if once else ["-l", str(seconds)]
    before = cpu_seconds(pid)
    command = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), *limit]
    result = subprocess.run(
        [*command, "-q", "64", "-t", "2"],
        capture_output=True,
        text=True,
        timeout=(seconds or 60) + 30,
        check=True,
    )
    cpu = cpu_seconds(pid) - before
    out = result.stdout

    def number(label: str) -> float:
        match = re.search(rf"{label}:\s+([0-9.]+)", out)
        if match is None:
            raise RuntimeError(f"dnsperf output lacks {label!r}:\n{out}")
        return float(match.group(1))

    def rcode(name: str) -> float:
        match = re.search(rf"\b{name} (\d+)", out)
        return float(match.group(1)) if match else 0.0

    completed = number("Queries completed")
    return {
        "completed": completed,
        "lost": number("Queries lost"),
        "qps": number("Queries per second"),
        "latency_ms": number(r"Average Latency \(s\)") * 1000,
        "cpu": cpu,
        "per_cpu_second": completed / cpu if cpu > 0 else float("inf"),
        "noerror": rcode("NOERROR"),
        "nxdomain": rcode("NXDOMAIN"),
        "servfail": rcode("SERVFAIL"),
        "refused": rcode("REFUSED"),
    }


def combine(runs: list[dict[str, float]]) -> dict[str, float]:
    """One server's rounds as one run: counts and CPU summed, rates over the whole time."""
    completed = sum(r["completed"] for r in runs)
    cpu = sum(r["cpu"] for r in runs)
    elapsed = sum(r["completed"] / r["qps"] for r in runs if r["qps"] > 0)
    return {
        "completed": completed,
        "lost": sum(r["lost"] for r in runs),
        "qps": completed / elapsed if elapsed > 0 else 0.0,
        "latency_ms": sum(r["latency_ms"] * r["completed"] for r in runs) / max(1.0, completed),
        "cpu": cpu,
        "per_cpu_second": completed / cpu if cpu > 0 else float("inf"),
        "noerror": sum(r["noerror"] for r in runs),
        "nxdomain": sum(r["nxdomain"] for r in runs),
    }


def start_daemon(
    snapshots: list[Path], port: int, admin_port: int, log: Path
) -> subprocess.Popen[bytes]:
    args = [arg for path in snapshots for arg in ("--snapshot", str(path))]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node_services",
            "run",
            *args,
            "--node-name",
            "node-a",
            "--dns-listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
            "--metadata-listen",
            f"127.0.0.1:{free_port()}",
            "--upstream",
            "127.0.0.1:1",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        env={**os.environ, "NODE_SERVICES_DNS_AUTOPATH": "on"},
    )


def client_views(admin_port: int) -> int:
    """The per-client views the daemon holds (its node_services_dns_client_views gauge)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("node_services_dns_client_views "):
                return int(float(line.split()[1]))
    return 0


def split_snapshot(snapshot: Path, count: int) -> list[Path]:
    items = json.loads(snapshot.read_text())["items"]
    paths = []
    for index in range(count):
        part = items[index * len(items) // count : (index + 1) * len(items) // count]
        path = snapshot.with_name(f"part-{index}.json")
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": part}))
        paths.append(path)
    return paths


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dns", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=12, help="dnsperf time per server")
    parser.add_argument("--rounds", type=int, default=3, help="turns each server takes")
    args = parser.parse_args(argv)
    if args.quick:
        args.services, args.endpoints, args.seconds, args.rounds = 1000, 10_000, 2, 1
    per_round = max(1, args.seconds // max(1, args.rounds))
    missing = [tool for tool in ("dnsperf", "dnsmasq") if shutil.which(tool) is None]
    if missing:
        print(
            f"bench.dns: skipped: {', '.join(missing)} not installed (Debian: dnsperf, "
            "dnsmasq-base)"
        )
        return 0

    services = names(args.services, 100)
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmpdir:
        tmp = Path(tmpdir)
        snapshot = tmp / "snapshot.json"
        write_snapshot(snapshot, services, args.endpoints)
        hosts = tmp / "hosts"
        hosts.write_text("".join(f"{ip} {n}.{ns}.svc.{ZONE}\n" for ns, n, ip in services))
        queries = tmp / "queries.txt"
        write_queries(queries, services, 100_000)
        probe = f"{services[-1][1]}.{services[-1][0]}.svc.{ZONE}"

        ours_port, admin_port = free_port(), free_port()
        started = time.monotonic()
        ours = start_daemon([snapshot], ours_port, admin_port, tmp / "daemon.log")
        dnsmasq_port = free_port()
        dnsmasq = subprocess.Popen(
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                f"--port={dnsmasq_port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                f"--addn-hosts={hosts}",
                f"--local=/{ZONE}/",
                "--user=root",
                "--pid-file=",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "dnsmasq.log").open("wb"),
        )
        try:
            wait_until(lambda: answers(ours_port, probe), 180, "node-services to load", ours)
            load_seconds = time.monotonic() - started
            wait_until(lambda: answers(dnsmasq_port, probe), 30, "dnsmasq to load", dnsmasq)
            time.sleep(0.5)
            rss = rss_mb(ours.pid)
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=5) as r:
                ready = r.status == 200
            views = client_views(admin_port)
            rounds: dict[str, list[dict[str, float]]] = {"dnsmasq": [], "node-services": []}
            for _ in range(max(1, args.rounds)):
                rounds["dnsmasq"].append(dnsperf(dnsmasq_port, queries, per_round, dnsmasq.pid))
                rounds["node-services"].append(dnsperf(ours_port, queries, per_round, ours.pid))
            results = {server: combine(runs) for server, runs in rounds.items()}
            rss_after = rss_mb(ours.pid)
        finally:
            stop(ours)
            stop(dnsmasq)
        # The same records in 50 smaller files: no parse peak of one 14 MB document, closer to
        # how a list/watch source feeds the store (pages and events).
        parts = split_snapshot(snapshot, 50)
        split_port = free_port()
        split = start_daemon(parts, split_port, free_port(), tmp / "daemon-split.log")
        try:
            wait_until(lambda: answers(split_port, probe), 180, "node-services (50 files)", split)
            time.sleep(0.5)
            rss_split = rss_mb(split.pid)
        finally:
            stop(split)

    print(
        f"DNS benchmark: {args.services} services, {args.endpoints} endpoints, "
        f"50% hits / 50% search-path NXDOMAIN, dnsperf -q 64, {args.rounds} alternating "
        f"rounds of {per_round} s per server, loopback; node-services with autopath on and "
        f"{views} per-client views (dnsperf's own address has none)"
    )
    print("(shared 2-core machine: numbers are noisy; dnsperf itself competes for the CPU)")
    header = f"{'server':<14}{'QPS':>10}{'q/CPU-s':>10}{'CPU s':>8}{'lat ms':>8}{'lost':>7}"
    header += f"{'NOERROR':>9}{'NXDOMAIN':>9}"
    print(header)
    for server, r in results.items():
        print(
            f"{server:<14}{r['qps']:>10.0f}{r['per_cpu_second']:>10.0f}{r['cpu']:>8.2f}"
            f"{r['latency_ms']:>8.3f}{r['lost']:>7.0f}{r['noerror']:>9.0f}{r['nxdomain']:>9.0f}"
        )
    ours_r, peer = results["node-services"], results["dnsmasq"]
    ratio_cpu = ours_r["per_cpu_second"] / peer["per_cpu_second"]
    ratio_qps = ours_r["qps"] / peer["qps"]
    verdict = "meets" if ratio_cpu >= 1.0 else "MISSES"
    record("queries per CPU-second vs dnsmasq", ratio_cpu, "x", ">= 1.0x", ratio_cpu >= 1.0)
    record("QPS vs dnsmasq", ratio_qps, "x", "", None)
    record("daemon RSS after the run", rss_after, "MB", "< 150 MB", rss_after < 150)
    record("daemon RSS, 50 files", rss_split, "MB", "< 150 MB", rss_split < 150)
    print(
        f"ratio node-services/dnsmasq: QPS {ratio_qps:.2f}x, queries per CPU-second "
        f"{ratio_cpu:.2f}x (target >= 1.0x: {verdict})"
    )
    print(
        f"node-services RSS: {rss:.0f} MB loaded from one file, {rss_after:.0f} MB after the run "
        f"(target < 150 MB: {'meets' if rss_after < 150 else 'MISSES'}); "
        f"{rss_split:.0f} MB when the same records come in 50 files "
        f"({'meets' if rss_split < 150 else 'MISSES'}); "
        f"loaded and answering after {load_seconds:.1f} s; readyz {'200' if ready else 'not ready'}"
    )
    run_lookups(args.quick)
    from bench.dns_forward import run_forward  # it imports this module's helpers

    run_forward(args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
