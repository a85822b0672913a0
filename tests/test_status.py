"""`node-services status` against a running daemon: the admin /status JSON, the text summary
and --json, the default admin address from the settings, exit codes."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from dnshelpers import dig
from fakes.cattle_server import serve_in_thread
from helpers import DEMO_SNAPSHOT, DaemonProcess, free_port, http_get

Start = Callable[..., DaemonProcess]


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node_services", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


DEMO_RECORDS = {"endpoints": 4, "host": 3, "service": 6, "stack": 4, "workload": 6}


def test_status_summarises_a_running_daemon_in_text_and_json(daemon: Start) -> None:
    metadata_port = free_port()
    node = daemon(
        "--snapshot",
        str(DEMO_SNAPSHOT),
        "--upstream",
        "127.0.0.1:1",  # nothing listens: forwarded queries fail (SERVFAIL)
        "--metadata-listen",
        f"127.0.0.1:{metadata_port}",
    )
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="ready")
    assert "status: NOERROR" in dig(node.dns_port, "kubernetes.default.svc.cluster.local")
    assert "status: NXDOMAIN" in dig(node.dns_port, "nope.default.svc.cluster.local")
    assert "status: SERVFAIL" in dig(node.dns_port, "example.invalid", timeout=10)
    url = f"http://127.0.0.1:{metadata_port}/latest/self/host/hostname"
    assert http_get(url, timeout=10) == (200, "node-a")

    result = status("--admin", node.admin, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert node.proc is not None
    assert report["pid"] == node.proc.pid
    assert report["node"] == "node-a"
    assert report["ready"] is True and report["problems"] == []
    assert report["listeners"] == "bound"
    assert report["records"] == DEMO_RECORDS
    (source,) = report["sources"]
    assert source["name"] == f"static:{DEMO_SNAPSHOT}"
    assert (source["synced"], source["loads"], source["errors"]) == (True, 1, 0)
    assert source["last_change_age_seconds"] >= 0
    dns = report["dns"]
    assert dns["queries_total"] == 3
    assert dns["responses"] == {"NOERROR": 1, "NXDOMAIN": 1, "SERVFAIL": 1}
    assert dns["forward_errors"] >= 1
    assert dns["queries_per_second"] > 0
    assert report["metadata"] == {"waiters": 0, "requests_total": 1}
    assert report["ipam"] is None or report["ipam"] == {"pools": []}
    assert report["overlay"] is None
    assert report["lame_duck"] is False and report["handed_over_to"] is None

    text = status("--admin", node.admin)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert re.fullmatch(
        rf"node-services \S+ on node node-a \(pid {node.proc.pid}\), up \d+\S*: ready", lines[0]
    ), lines[0]
    assert "listeners: bound" in lines
    assert "sources:" in lines
    assert any(
        re.fullmatch(
            rf"  static:{re.escape(str(DEMO_SNAPSHOT))}: synced, changed \d+s ago, "
            r"1 loads, 0 errors",
            line,
        )
        for line in lines
    ), lines
    assert "records: host 3, stack 4, service 6, endpoints 4, workload 6" in lines
    (dns_line,) = [line for line in lines if line.startswith("dns: ")]
    assert re.fullmatch(
        r"dns: \d+\.\d queries/s \(last minute\), 3 in all; forward cache hit ratio \S+; "
        r"forward errors [1-9]\d*; SERVFAIL 1, NXDOMAIN 1",
        dns_line,
    ), dns_line
    assert "metadata: 0 waiting long-polls, 1 requests" in lines
    assert "overlay: off" in lines


def test_status_reads_the_configured_admin_address_and_says_not_ready(
    daemon: Start, tmp_path: Path
) -> None:
    broken = tmp_path / "snap.yaml"
    broken.write_text("kind: [broken\n")
    node = daemon("--snapshot", str(broken), "--upstream", "127.0.0.1:1")
    node.wait_for(lambda: "not valid YAML" in node.output(), what="the rejected snapshot")
    config = tmp_path / "config.yaml"
    config.write_text(f"admin_listen: 127.0.0.1:{node.admin_port}\n")
    result = status("--config", str(config))
    assert result.returncode == 1, result.stderr  # reachable, not ready
    assert ": NOT READY" in result.stdout.splitlines()[0]
    assert f"  problem: source static:{broken} has not synced" in result.stdout
    assert f"  static:{broken}: NOT SYNCED" in result.stdout


def test_status_of_an_unreachable_daemon_exits_2() -> None:
    port = free_port()
    result = status("--admin", f"http://127.0.0.1:{port}", "--timeout", "5")
    assert result.returncode == 2
    assert f"cannot read http://127.0.0.1:{port}/status" in result.stderr


def test_status_counts_answer_cache_hits(daemon: Start) -> None:
    node = daemon("--snapshot", str(DEMO_SNAPSHOT), "--upstream", "127.0.0.1:1")
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="ready")
    name = "kubernetes.default.svc.cluster.local"
    for _ in range(3):  # the same query bytes but the ID: answered from the cache twice
        assert "status: NOERROR" in dig(node.dns_port, "+nocookie", name)

    def hits() -> int:
        result = status("--admin", node.admin, "--json")
        assert result.returncode == 0, result.stderr
        return int(json.loads(result.stdout)["dns"]["answer_cache_hits"])

    node.wait_for(lambda: hits() == 2, what="two answer cache hits in /status")


def test_status_and_readyz_say_the_cattle_sources_last_error(daemon: Start) -> None:
    with serve_in_thread() as fake:
        server = fake.server
        node = daemon(
            "--upstream",
            "127.0.0.1:1",
            env={
                "CATTLE_URL": server.url,
                "CATTLE_ACCESS_KEY": server.access_key,
                "CATTLE_SECRET_KEY": "wrong-s3cret",
            },
        )
        refused = f"401 Unauthorized: the API key {server.access_key} was refused"
        node.wait_for(lambda: refused in node.get("/readyz")[1], what="the 401 in /readyz")
        status_code, body = node.get("/readyz")
        assert status_code == 503
        assert "  source cattle has not synced: last error: " in body
        result = status("--admin", node.admin, "--json")
        assert result.returncode == 1, result.stderr
        (problem,) = json.loads(result.stdout)["problems"]
        assert problem.startswith("source cattle has not synced: last error: ")
        assert refused in problem
        assert "wrong-s3cret" not in body + result.stdout + node.output()


def test_status_takes_an_admin_address_without_scheme(daemon: Start) -> None:
    node = daemon("--snapshot", str(DEMO_SNAPSHOT), "--upstream", "127.0.0.1:1")
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="ready")
    result = status("--admin", f"127.0.0.1:{node.admin_port}", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["records"] == DEMO_RECORDS


class _OtherJSON(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"status": "ok", "version": 3} if self.path == "/status" else [1])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_status_of_an_endpoint_that_is_not_ours_exits_2() -> None:
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _OtherJSON)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for admin in (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/elsewhere"):
            result = status("--admin", admin, "--timeout", "10")
            assert result.returncode == 2, (result.stdout, result.stderr)
            assert f"node-services: {admin}/status is not a node-services /status" in result.stderr
            assert "Traceback" not in result.stderr
        result = status("--admin", f"http://127.0.0.1:{port}/elsewhere", "--json")
        assert result.returncode == 2 and "Traceback" not in result.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
