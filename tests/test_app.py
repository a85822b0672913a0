"""The daemon as a real process: readiness, metrics, SIGHUP reload, clean SIGTERM shutdown."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from helpers import DEMO_SNAPSHOT, FIXTURES, DaemonProcess

KUBE = FIXTURES / "kube"
Start = Callable[..., DaemonProcess]


def test_demo_snapshot_daemon_is_ready_and_reports_metrics(daemon: Start) -> None:
    node = daemon("--snapshot", str(DEMO_SNAPSHOT))
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="readiness")
    assert node.get("/readyz") == (200, "ok\n")
    assert node.get("/healthz") == (200, "ok\n")
    assert node.metric('node_services_store_records{kind="service"}') == "6.0"
    assert node.metric('node_services_store_records{kind="workload"}') == "6.0"
    assert node.metric(f'node_services_source_synced{{source="static:{DEMO_SNAPSHOT}"}}') == "1.0"
    assert (
        node.metric(f'node_services_source_loads_total{{source="static:{DEMO_SNAPSHOT}"}}') == "1.0"
    )


def test_not_ready_until_a_bad_snapshot_is_fixed_and_the_body_names_it(
    daemon: Start, tmp_path: Path
) -> None:
    path = tmp_path / "snap.yaml"
    path.write_text("kind: [broken\n")
    node = daemon("--snapshot", str(path), env={"NODE_SERVICES_SNAPSHOT_POLL_INTERVAL": "0.05"})
    node.wait_for(lambda: "not valid YAML" in node.output(), what="the error log line")
    status, body = node.get("/readyz")
    assert status == 503
    assert body.startswith(
        f"not ready:\n  source static:{path} has not synced: last error: {path}: not valid YAML: "
        "while parsing a flow sequence"
    )
    assert f"snapshot rejected: {path}: not valid YAML" in node.output()
    assert (
        node.metric(f'node_services_source_reload_errors_total{{source="static:{path}"}}') == "1.0"
    )
    shutil.copy(KUBE / "multi-document.yaml", path)
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="readiness after the fix")


def test_sighup_reloads_and_a_bad_reload_keeps_serving_the_last_good_state(
    daemon: Start, tmp_path: Path
) -> None:
    path = tmp_path / "snap.yaml"
    shutil.copy(KUBE / "namespace.yaml", path)
    # polling off: only SIGHUP can make the daemon notice the change
    node = daemon("--snapshot", str(path), env={"NODE_SERVICES_SNAPSHOT_POLL_INTERVAL": "0"})
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="readiness")
    stacks = 'node_services_store_records{kind="stack"}'
    hosts = 'node_services_store_records{kind="host"}'
    assert node.metric(stacks) == "1.0"

    path.write_text(
        (KUBE / "namespace.yaml").read_text() + "---\n" + (KUBE / "node.yaml").read_text()
    )
    assert node.metric(hosts) == "0.0"
    node.signal(signal.SIGHUP)
    node.wait_for(lambda: node.metric(hosts) == "1.0", what="the reload")

    node_b = (KUBE / "node-b.yaml").read_text().replace("192.168.10.12", "192.168.10.999")
    path.write_text(node_b)
    node.signal(signal.SIGHUP)
    node.wait_for(lambda: "192.168.10.999" in node.output(), what="the rejection")
    assert (
        "Node node-b: status.addresses[0].address: '192.168.10.999' is not an IP" in node.output()
    )
    assert (node.metric(stacks), node.metric(hosts)) == ("1.0", "1.0")
    assert node.get("/readyz")[0] == 200


def test_sigterm_stops_cleanly(daemon: Start) -> None:
    node = daemon("--snapshot", str(DEMO_SNAPSHOT))
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="readiness")
    assert node.stop() == 0
    assert node.output().rstrip().endswith("node_services.app: stopped")


def test_sigint_stops_cleanly(daemon: Start) -> None:
    node = daemon("--snapshot", str(DEMO_SNAPSHOT))
    node.signal(signal.SIGINT)
    assert node.proc is not None
    assert node.proc.wait(timeout=10) == 0


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node_services", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def test_cattle_url_is_accepted_and_readyz_waits_for_the_first_list(daemon: Start) -> None:
    # Nothing listens on 127.0.0.1:9: the source retries, /readyz names it, nothing crashes.
    node = daemon(env={"CATTLE_URL": "http://127.0.0.1:9/v2-beta/projects/1a5"})
    node.wait_for(lambda: "cattle" in node.get("/readyz")[1], what="readyz names cattle")
    assert node.get("/readyz")[0] == 503
    node.wait_for(
        lambda: float(node.metric('node_services_cattle_errors_total{reason="transport"}')) >= 2,
        what="retries",
    )


def test_readyz_names_the_overlay_until_its_first_reconcile(daemon: Start) -> None:
    # no source at all: the overlay waits (and touches no kernel state) instead of routing
    node = daemon("--overlay", "vxlan")
    waiting = "  overlay vxlan has not reconciled yet: waiting for every source to sync\n"
    node.wait_for(lambda: waiting in node.get("/readyz")[1], what="the overlay's first pass")
    assert node.get("/readyz") == (503, "not ready:\n" + waiting)


def test_admin_port_in_use_is_a_clear_error(daemon: Start) -> None:
    node = daemon("--snapshot", str(DEMO_SNAPSHOT))
    result = run_cli(
        "run", "--snapshot", str(DEMO_SNAPSHOT), "--admin-listen", f"127.0.0.1:{node.admin_port}"
    )
    assert result.returncode == 1
    assert "cannot start:" in result.stderr
    assert "address already in use" in result.stderr.lower()
