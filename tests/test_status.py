"""`node-services status` against a running daemon: the admin /status JSON, the text summary
and --json, the default admin address from the settings, exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from dnshelpers import dig
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
