"""Benchmark of the live Cattle source against the test Cattle server in a separate process.

Environment (default): 1,000 services in 50 stacks, 10,000 containers (10 per service), 50
hosts, served by ``tests/fakes/cattle_server.py`` with v2-beta shapes (pages of 1000).

Measures, next to the issue's targets:
- initial sync: subscribe + list of every collection (all pages) + replace, until the source
  is synced, in this process (``CattleSource`` on a fresh ``Store``);
- cache memory: the deep size of the store (records and snapshot indexes) after the sync;
- event throughput (socket): a burst of resource.change events (full container objects, a
  new address each) sent back to back by the server, events/s applied to the store (the
  server, in its own process, shares the 2 cores with the source);
- event throughput (applied), the target: the same work without the network, for a backlog
  of websocket frames already read (JSON text, batches of 1000 as a burst arrives): each
  batch decoded and translated frame by frame (``_prepare``), resolved by the mirror and
  applied to the store as one version (``_commit``), exactly as the daemon's websocket loop
  does. Three backlogs, judged on the median; events/s by the wall clock, with the CPU time
  per event beside it (the figure to judge on a busy machine);
- event -> DNS answer: the real daemon (``python -m node_services run`` with ``CATTLE_URL``)
  against the same server; for each update of a container's address, the bench queries the
  daemon's DNS (UDP, loopback) for the container's name until the answer is the new address;
  p50/p99 from before the update request.

Run: ``python -m bench.cattle`` (``--quick`` for a small smoke run). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from dnslib import QTYPE, DNSRecord

from bench._common import record
from bench.kube import deep_size
from node_services.sources.cattle.client import Connection
from node_services.sources.cattle.source import CattleMetrics, CattleSource
from node_services.state.store import Store

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fakes" / "cattle_server.py"
ACCESS, SECRET = "AK0123", "sekret-0123"
PROJECT = "1a5"
TARGETS = {"sync_s": 5.0, "events_per_s": 10_000.0, "p99_ms": 100.0}
APPLIED_RUNS = 3
"""Backlogs applied for the applied throughput, judged on the median (a shared machine's
speed varies by a fifth from one second to the next)."""


def environment(services: int, per_service: int, hosts: int) -> list[dict[str, Any]]:
    """Cattle resources shaped as the v2-beta API returns them."""
    out: list[dict[str, Any]] = [
        {"id": PROJECT, "type": "project", "name": "Bench", "defaultNetworkId": "1n1"},
        {
            "id": "1n1",
            "type": "network",
            "kind": "cni",
            "name": "ipsec",
            "state": "active",
            "subnets": [{"type": "subnet", "networkAddress": "10.42.0.0/16"}],
        },
    ]
    for h in range(hosts):
        out.append(
            {
                "id": f"1h{h + 1}",
                "type": "host",
                "name": f"node-{h}",
                "hostname": f"node-{h}.bench.lan",
                "agentIpAddress": f"10.20.{h // 250}.{h % 250 + 1}",
                "state": "active",
                "agentState": "active",
                "labels": {"rack": f"r{h % 4}"},
                "memory": 16384,
                "milliCpu": 8000,
                "uuid": f"host-{h}",
            }
        )
    stacks = 50
    for s in range(stacks):
        out.append({"id": f"1st{s + 1}", "type": "stack", "name": f"stack-{s}", "state": "active"})
    c = 0
    for i in range(services):
        stack = i % stacks
        service_id = f"1s{i + 1}"
        out.append(
            {
                "id": service_id,
                "type": "service",
                "name": f"svc-{i}",
                "stackId": f"1st{stack + 1}",
                "state": "active",
                "healthState": "healthy",
                "scale": per_service,
                "launchConfig": {
                    "imageUuid": "docker:nginx:1.25",
                    "ports": ["8080:80/tcp"],
                    "labels": {"io.rancher.scheduler.global": "false", "app": f"svc-{i}"},
                },
                "metadata": {"tier": "bench"},
                "uuid": f"svc-{i}",
            }
        )
        for n in range(per_service):
            out.append(container(c, i, n, stack, hosts))
            c += 1
    return out


def container(c: int, service: int, n: int, stack: int, hosts: int) -> dict[str, Any]:
    return {
        "id": f"1i{c + 1}",
        "type": "container",
        "name": f"stack-{stack}-svc-{service}-{n + 1}",
        "state": "running",
        "healthState": "healthy",
        "hostId": f"1h{c % hosts + 1}",
        "primaryIpAddress": ip_of(c, 0),
        "stackId": f"1st{stack + 1}",
        "serviceIds": [f"1s{service + 1}"],
        "createIndex": n + 1,
        "externalId": f"{c:064x}",
        "imageUuid": "docker:nginx:1.25",
        "ports": ["8080:80/tcp"],
        "dns": ["169.254.169.250"],
        "dnsSearch": [f"stack-{stack}.rancher.internal", "rancher.internal"],
        "labels": {
            "io.rancher.stack.name": f"stack-{stack}",
            "io.rancher.stack_service.name": f"stack-{stack}/svc-{service}",
            "io.rancher.service.launch.config": "io.rancher.service.primary.launch.config",
            "io.rancher.container.ip": f"{ip_of(c, 0)}/16",
        },
        "uuid": f"c-{c}",
    }


def ip_of(c: int, generation: int) -> str:
    value = c + generation * 20_000
    return f"10.42.{(value // 250) % 250}.{value % 250 + 1}"


def post(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    import base64

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(f"{ACCESS}:{SECRET}".encode()).decode(),
        },
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def start_fake(tmp: Path, objects: list[dict[str, Any]]) -> tuple[subprocess.Popen[bytes], int]:
    fixture = tmp / "env.json"
    fixture.write_text(json.dumps(objects))
    port_file = tmp / "port"
    proc = subprocess.Popen(
        [sys.executable, str(FAKE), "--fixture", str(fixture), "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "fake.log").open("wb"),
    )
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the fake Cattle server did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


async def in_process(
    port: int, ids: list[str], events: int, templates: dict[str, dict[str, Any]]
) -> dict[str, float]:
    applied = 0
    first_at = 0.0

    def count(kind: str, n: int) -> None:
        nonlocal applied, first_at
        if kind != "ping":
            if not first_at:
                first_at = time.perf_counter()
            applied += n

    store = Store()
    url = f"http://127.0.0.1:{port}/v2-beta/projects/{PROJECT}"
    source = CattleSource(
        store, Connection(url, ACCESS, SECRET), metrics=CattleMetrics(event=count)
    )
    started = time.perf_counter()
    task = asyncio.create_task(source.run())
    await asyncio.wait_for(source.synced.wait(), 120)
    sync_s = time.perf_counter() - started
    cache_mb = deep_size(store) / 2**20
    records = sum(store.snapshot.counts().values())
    # throughput: a burst of address changes, back to back
    values = [ip_of(i % len(ids), 1 + i // len(ids)) for i in range(events)]
    before = applied
    version_before = store.version
    first_at = 0.0
    t0 = time.perf_counter()
    reply = asyncio.create_task(
        asyncio.to_thread(
            post, port, "/fake/burst", {"ids": ids, "field": "primaryIpAddress", "values": values}
        )
    )
    while applied - before < events:
        await asyncio.sleep(0.002)
        if time.perf_counter() - t0 > 120:
            break
    seconds = time.perf_counter() - (first_at or t0)
    done_wall = time.time()
    burst = await reply
    server_s = burst["written_at"] - burst["queued_at"]
    print(
        f"  (burst: the server wrote {len(values)} events in {server_s:.2f} s; "
        f"applied {done_wall - burst['queued_at']:.2f} s after its first write; "
        f"{store.version - version_before} store versions)",
        flush=True,
    )
    last = store.snapshot.get(f"cattle:container/{ids[(events - 1) % len(ids)]}")
    correct = last is not None and getattr(last, "ips", ()) == (values[-1],)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    received = applied - before
    # The same work without the network: decode + translate + mirror + store batch, for a
    # backlog of websocket frames already read (batches of 1000, as a burst arrives); three
    # backlogs (each a new address for every event), judged on the median.
    runs: list[tuple[float, float]] = []
    for backlog in range(APPLIED_RUNS):
        first = 100 + 10 * backlog
        frames = []
        for i in range(events):
            obj = dict(templates[ids[i % len(ids)]])
            obj["primaryIpAddress"] = ip_of(i % len(ids), first + i // len(ids))
            frames.append(json.dumps({"name": "resource.change", "data": {"resource": obj}}))
        t1, c1 = time.perf_counter(), time.process_time()
        for k in range(0, events, 1000):
            source._commit(source._prepare(frames[k : k + 1000]), {})
        runs.append(
            (events / (time.perf_counter() - t1), (time.process_time() - c1) / events * 1e6)
        )
        del frames
        newest = store.snapshot.get(f"cattle:container/{ids[(events - 1) % len(ids)]}")
        correct = (
            correct
            and newest is not None
            and getattr(newest, "ips", ())
            == (ip_of((events - 1) % len(ids), first + (events - 1) // len(ids)),)
        )
    print(
        "  (applied, "
        + ", ".join(f"{rate:,.0f} events/s ({cpu:.0f} us CPU/event)" for rate, cpu in runs)
        + f"; median of {len(runs)} judged)",
        flush=True,
    )
    apply_rate = statistics.median(rate for rate, _ in runs)
    apply_cpu_us = statistics.median(cpu for _, cpu in runs)
    return {
        "apply_per_s": apply_rate,
        "apply_cpu_us": apply_cpu_us,
        "sync_s": sync_s,
        "cache_mb": cache_mb,
        "records": records,
        "events": received,
        "events_per_s": received / seconds,
        "burst_correct": float(correct),
    }


def dns_a(port: int, name: str, sock: socket.socket) -> list[str]:
    query = DNSRecord.question(name, "A")
    sock.sendto(query.pack(), ("127.0.0.1", port))
    try:
        data, _ = sock.recvfrom(4096)
    except TimeoutError:
        return []
    reply = DNSRecord.parse(data)
    return sorted(str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A)


def event_to_dns(
    tmp: Path, port: int, samples: int, rate: float, containers: int
) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import free_port

    admin, dns, metadata = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_SERVICES_", "CATTLE_"))}
    env.update(
        CATTLE_URL=f"http://127.0.0.1:{port}/v2-beta/projects/{PROJECT}",
        CATTLE_ACCESS_KEY=ACCESS,
        CATTLE_SECRET_KEY=SECRET,
    )
    log = (tmp / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [
            sys.executable, "-m", "node_services", "run",
            "--admin-listen", f"127.0.0.1:{admin}",
            "--dns-listen", f"127.0.0.1:{dns}",
            "--metadata-listen", f"127.0.0.1:{metadata}",
            "--upstream", "127.0.0.1:1",
            "--node-name", "node-0",
            "--ipam", "off",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    delays: list[float] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("daemon not ready:\n" + (tmp / "daemon.log").read_text()[-2000:])
            time.sleep(0.1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            for i in range(samples):
                c = (i * 37) % containers
                stack, service, n = (c // 10) % 50, c // 10, c % 10
                name = f"stack-{stack}-svc-{service}-{n + 1}.rancher.internal"
                new = ip_of(c, 5 + i)
                t0 = time.perf_counter()
                post(port, "/fake/update", {"id": f"1i{c + 1}", "primaryIpAddress": new})
                while dns_a(dns, name, sock) != [new]:
                    if time.perf_counter() - t0 > 5:
                        raise RuntimeError(f"{name} never answered {new}")
                delays.append(time.perf_counter() - t0)
                time.sleep(1 / rate)
    finally:
        daemon.terminate()
        daemon.wait(15)
    delays.sort()
    return {
        "p50_ms": statistics.median(delays) * 1000,
        "p99_ms": delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000,
        "samples": float(len(delays)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cattle", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--per-service", type=int, default=10)
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--dns-samples", type=int, default=300)
    parser.add_argument("--dns-rate", type=float, default=50.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.services, args.events, args.dns_samples = 100, 3_000, 40
    objects = environment(args.services, args.per_service, args.hosts)
    containers = [o["id"] for o in objects if o["type"] == "container"]
    print(
        f"Cattle environment: {args.services} services, {len(containers)} containers, "
        f"{args.hosts} hosts (test Cattle server in its own process, pages of 1000)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-cattle-") as tmp_name:
        tmp = Path(tmp_name)
        fake, port = start_fake(tmp, objects)
        try:
            templates = {o["id"]: o for o in objects if o["type"] == "container"}
            local = asyncio.run(in_process(port, containers, args.events, templates))
            dns = event_to_dns(tmp, port, args.dns_samples, args.dns_rate, len(containers))
        finally:
            fake.terminate()
            fake.wait(15)
    judge = not args.quick
    rows = [
        ("initial sync", local["sync_s"], "s", f"< {TARGETS['sync_s']:g} s",
         local["sync_s"] < TARGETS["sync_s"], f"{local['sync_s']:.2f} s"),
        ("cache memory", local["cache_mb"], "MiB", "-", None,
         f"{local['cache_mb']:.1f} MiB ({local['records']:.0f} records)"),
        ("event throughput (socket)", local["events_per_s"], "events/s", "-", None,
         f"{local['events_per_s']:,.0f} events/s ({local['events']:.0f} events)"),
        ("event throughput (applied)", local["apply_per_s"], "events/s",
         f">= {TARGETS['events_per_s']:,.0f} events/s",
         local["apply_per_s"] >= TARGETS["events_per_s"] and bool(local["burst_correct"]),
         f"{local['apply_per_s']:,.0f} events/s ({local['apply_cpu_us']:.0f} us CPU/event)"),
        ("event -> DNS answer p50", dns["p50_ms"], "ms", "-", None, f"{dns['p50_ms']:.1f} ms"),
        ("event -> DNS answer p99", dns["p99_ms"], "ms", f"< {TARGETS['p99_ms']:g} ms",
         dns["p99_ms"] < TARGETS["p99_ms"],
         f"{dns['p99_ms']:.1f} ms ({dns['samples']:.0f} samples)"),
    ]  # fmt: skip
    for name, value, unit, target, passed, shown in rows:
        ok = passed if judge else None
        mark = {True: "PASS", False: "FAIL", None: "-"}[ok]
        print(f"  {name:26} {shown:40} {target:22} {mark}", flush=True)
        record(f"cattle: {name}", value, unit, target, ok, shown=shown)
    if not local["burst_correct"]:
        print("  (the last state of the burst or of the backlog was NOT in the store)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
