"""Forwarded names: cache-hit throughput, then serve-stale with the upstream down, for
node-services next to dnsmasq (``--all-servers``, a cache as large, ``--use-stale-cache``
when this dnsmasq has it), in one run.

Both servers forward to the same fake upstream: a small Python UDP responder on
127.0.0.77 (a thread of this benchmark, started and stopped by it) that answers every A
query with an address, TTL 3600 for the ``hit-*`` names and TTL 1 for the ``stale-*`` ones.
Both caches are warmed (dnsperf through every name once), then dnsperf asks the cached
``hit-*`` names; then the responder is stopped (its port answers ICMP unreachable), the
``stale-*`` entries expire, and dnsperf asks those: node-services answers them stale (TTL
30, RFC 8767); dnsmasq answers what it answers (stale with ``--use-stale-cache``, SERVFAIL
or REFUSED without it), counted by rcode. QPS, queries per CPU-second of the server process
(utime + stime from /proc) and the ratios; the servers take turns in short rounds.

Run: ``python -m bench.dns_forward`` (``--quick``: small), or as part of ``python -m
bench.dns``. The machine is shared and small: absolute numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench._common import record
from bench.dns import ask_a, combine, dnsperf, free_port, stop, wait_until

UPSTREAM_HOST = "127.0.0.77"
DOMAIN = "bench.example"
HIT_TTL, STALE_TTL = 3600, 1


class Responder:
    """The fake upstream: one UDP socket on ``host``, answered from a thread until stopped."""

    def __init__(self, host: str = UPSTREAM_HOST) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((host, 0))
        self.address = (host, int(self.sock.getsockname()[1]))
        self.queries = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-upstream", daemon=True)

    def start(self) -> Responder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if not ready:
                continue
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                continue
            reply = answer(data)
            if reply is not None:
                self.queries += 1
                self.sock.sendto(reply, addr)


def answer(query: bytes) -> bytes | None:
    """NOERROR with one A record for an A question (TTL by the name's kind), else empty."""
    if len(query) < 17:
        return None
    pos, labels = 12, []
    while pos < len(query) and query[pos]:
        labels.append(query[pos + 1 : pos + 1 + query[pos]])
        pos += 1 + query[pos]
    end = pos + 5
    if end > len(query):
        return None
    qtype = struct.unpack_from("!H", query, pos + 1)[0]
    flags = 0x8180 | (query[2] & 0x01) << 8
    if qtype != 1:
        return query[0:2] + struct.pack("!HHHHH", flags, 1, 0, 0, 0) + query[12:end]
    first = labels[0] if labels else b""
    ttl = STALE_TTL if first.startswith(b"stale-") else HIT_TTL
    number = int(first.rsplit(b"-", 1)[-1]) if first[-1:].isdigit() else 0
    address = bytes([10, 77, number >> 8 & 0xFF, number & 0xFF])
    record_ = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, ttl, 4) + address
    return query[0:2] + struct.pack("!HHHHH", flags, 1, 1, 0, 0) + query[12:end] + record_


def ask(port: int, name: str) -> tuple[int, list[int]]:
    """(rcode, answer TTLs) of one A query to 127.0.0.1:``port`` ((-1, []) on no answer)."""
    reply = ask_a(port, name, 3)
    if reply is None:
        return -1, []
    ancount = struct.unpack_from("!H", reply, 6)[0]
    pos = 12 + len(name) + 2 + 4  # the question's name as labels, its type and class
    ttls = []
    for _ in range(ancount):
        pos += 2  # a compression pointer: the answers are to the question's name
        _, _, ttl, rdlen = struct.unpack_from("!HHIH", reply, pos)
        ttls.append(ttl)
        pos += 10 + rdlen
    return reply[3] & 0xF, ttls


def _combine(runs: list[dict[str, float]]) -> dict[str, float]:
    out = combine(runs)
    out["servfail"] = sum(r["servfail"] for r in runs)
    out["refused"] = sum(r["refused"] for r in runs)
    return out


def _metric(admin_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            one = line.startswith(name + " ")
            if one or line.startswith(name + '{zone="."}'):  # one series, or zone "."
                return float(line.rsplit(None, 1)[1])
    return float("nan")


def _start_ours(
    tmp: Path, port: int, admin_port: int, upstream: tuple[str, int], cache: int
) -> subprocess.Popen[bytes]:
    snapshot = tmp / "empty.json"
    snapshot.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": []}))
    command = [sys.executable, "-m", "node_services", "run", "--snapshot", str(snapshot)]
    command += ["--node-name", "node-a", "--dns-listen", f"127.0.0.1:{port}"]
    command += ["--admin-listen", f"127.0.0.1:{admin_port}"]
    command += ["--metadata-listen", f"127.0.0.1:{free_port()}"]
    command += ["--upstream", f"{upstream[0]}:{upstream[1]}", "--log-level", "warning"]
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "daemon-forward.log").open("wb"),
        env={**os.environ, "NODE_SERVICES_DNS_CACHE_SIZE": str(cache)},
    )


def _start_dnsmasq(
    tmp: Path, port: int, upstream: tuple[str, int], cache: int, stale: bool
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            f"--server={upstream[0]}#{upstream[1]}",
            "--all-servers",
            f"--cache-size={cache}",
            *(["--use-stale-cache"] if stale else []),
            "--user=root",
            "--pid-file=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "dnsmasq-forward.log").open("wb"),
    )


def _has_stale_option() -> bool:
    result = subprocess.run(
        ["dnsmasq", "--help"], capture_output=True, text=True, timeout=10, check=False
    )
    return "--use-stale-cache" in result.stdout + result.stderr


def _table(title: str, results: dict[str, dict[str, float]]) -> None:
    print(title)
    header = f"{'server':<14}{'QPS':>10}{'q/CPU-s':>10}{'CPU s':>8}{'lat ms':>8}{'lost':>7}"
    print(header + f"{'NOERROR':>9}{'SERVFAIL':>9}{'REFUSED':>9}")
    for server, r in results.items():
        print(
            f"{server:<14}{r['qps']:>10.0f}{r['per_cpu_second']:>10.0f}{r['cpu']:>8.2f}"
            f"{r['latency_ms']:>8.3f}{r['lost']:>7.0f}{r['noerror']:>9.0f}"
            f"{r['servfail']:>9.0f}{r['refused']:>9.0f}"
        )


def run_forward(quick: bool, *, names: int = 5000, seconds: int = 8, rounds: int = 2) -> None:
    """Print both runs' tables and record their ratios (skipped without dnsperf/dnsmasq)."""
    missing = [tool for tool in ("dnsperf", "dnsmasq") if shutil.which(tool) is None]
    if missing:
        print(f"bench.dns forward: skipped: {', '.join(missing)} not installed")
        return
    if quick:
        names, seconds, rounds = 500, 2, 1
    per_round = max(1, seconds // max(1, rounds))
    stale_option = _has_stale_option()
    cache = 4 * names
    with tempfile.TemporaryDirectory(prefix="bench-dns-forward-") as tmpdir:
        tmp = Path(tmpdir)
        hits, stale = tmp / "hits.txt", tmp / "stale.txt"
        hits.write_text("".join(f"hit-{i}.{DOMAIN} A\n" for i in range(names)))
        stale.write_text("".join(f"stale-{i}.{DOMAIN} A\n" for i in range(names)))
        upstream = Responder().start()
        upstream_running = True
        ours_port, admin_port, peer_port = free_port(), free_port(), free_port()
        ours = _start_ours(tmp, ours_port, admin_port, upstream.address, cache)
        dnsmasq = _start_dnsmasq(tmp, peer_port, upstream.address, cache, stale_option)
        servers = {"dnsmasq": (peer_port, dnsmasq), "node-services": (ours_port, ours)}
        probe = f"hit-0.{DOMAIN}"
        try:
            wait_until(lambda: ask(ours_port, probe)[0] == 0, 60, "node-services", ours)
            wait_until(lambda: ask(peer_port, probe)[0] == 0, 30, "dnsmasq", dnsmasq)
            warm: dict[str, float] = {}
            for server, (port, proc) in servers.items():
                before = upstream.queries
                for path in (hits, stale):
                    dnsperf(port, path, 0, proc.pid, once=True)
                warm[server] = upstream.queries - before
            hit_runs: dict[str, list[dict[str, float]]] = {s: [] for s in servers}
            asked_before = upstream.queries
            for _ in range(max(1, rounds)):
                for server, (port, proc) in servers.items():
                    hit_runs[server].append(dnsperf(port, hits, per_round, proc.pid))
            asked_during_hits = upstream.queries - asked_before
            upstream.stop()
            upstream_running = False
            time.sleep(STALE_TTL + 0.5)  # every stale-* entry has expired
            # The first query for an expired name finds the outage out (node-services asks
            # the upstream first: a timeout, dns_forward_timeout); timed apart from the runs.
            first: dict[str, tuple[float, int, list[int]]] = {}
            for server, (port, _) in servers.items():
                asked = time.perf_counter()
                code, ttls = ask(port, f"stale-0.{DOMAIN}")
                first[server] = (time.perf_counter() - asked, code, ttls)
            stale_runs: dict[str, list[dict[str, float]]] = {s: [] for s in servers}
            for _ in range(max(1, rounds)):
                for server, (port, proc) in servers.items():
                    stale_runs[server].append(dnsperf(port, stale, per_round, proc.pid))
            samples = {
                server: ask(port, f"stale-1.{DOMAIN}") for server, (port, _) in servers.items()
            }
            stale_answers = _metric(admin_port, "node_services_dns_cache_stale_answers_total")
        finally:
            if upstream_running:
                upstream.stop()
            stop(ours)
            stop(dnsmasq)

    hit_results = {server: _combine(runs) for server, runs in hit_runs.items()}
    stale_results = {server: _combine(runs) for server, runs in stale_runs.items()}
    print(
        f"DNS forwarding benchmark: {names} cached names + {names} expired names, one fake "
        f"upstream on {UPSTREAM_HOST} (a Python responder); dnsperf -q 64, {rounds} alternating "
        f"rounds of {per_round} s per server, loopback; dnsmasq --all-servers "
        f"--cache-size={cache}"
        + (" --use-stale-cache" if stale_option else " (this dnsmasq has no --use-stale-cache)")
    )
    print("(shared 2-core machine: numbers are noisy; dnsperf itself competes for the CPU)")
    print(
        f"warm-up: upstream queries from dnsmasq {warm['dnsmasq']:.0f}, from node-services "
        f"{warm['node-services']:.0f} (for {2 * names} names); during the cache-hit run the "
        f"upstream was asked {asked_during_hits} times"
    )
    _table("cache hits (upstream up):", hit_results)
    _table("serve-stale (upstream stopped, entries expired):", stale_results)
    for server, (took, code, ttls) in first.items():
        print(
            f"  first stale-* query to {server} once the upstream was down: {took * 1000:.0f} ms, "
            f"rcode {code}, TTLs {ttls}"
        )
    for server, (code, ttls) in samples.items():
        print(f"  one stale-* query to {server} after the run: rcode {code}, TTLs {ttls}")
    print(f"  node-services stale answers counted: {stale_answers:.0f}")
    for label, results in (("cache hits", hit_results), ("serve-stale", stale_results)):
        ours_r, peer = results["node-services"], results["dnsmasq"]
        ratio_qps = ours_r["qps"] / peer["qps"] if peer["qps"] else float("nan")
        ratio_cpu = ours_r["per_cpu_second"] / peer["per_cpu_second"]
        print(
            f"ratio node-services/dnsmasq, {label}: QPS {ratio_qps:.2f}x, queries per "
            f"CPU-second {ratio_cpu:.2f}x"
        )
        record(f"forwarded {label}: q/CPU-s vs dnsmasq", ratio_cpu, "x", "", None)
        record(f"forwarded {label}: QPS vs dnsmasq", ratio_qps, "x", "", None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dns_forward", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--names", type=int, default=5000, help="names per run")
    parser.add_argument("--seconds", type=int, default=8, help="dnsperf time per server and run")
    parser.add_argument("--rounds", type=int, default=2, help="turns each server takes")
    args = parser.parse_args(argv)
    run_forward(args.quick, names=args.names, seconds=args.seconds, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
