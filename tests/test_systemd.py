"""systemd/node-services.service and its example config: systemd accepts the unit, and the
unit's own commands, run in a network namespace of the test's, give a daemon that serves DNS on
port 53 and metadata on the Rancher metadata address."""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import DEMO_SNAPSHOT, ROOT, network_namespace

UNIT = ROOT / "systemd" / "node-services.service"
EXAMPLE = ROOT / "systemd" / "config.yaml"
NODE_SERVICES = Path(sys.executable).parent / "node-services"


def directives(name: str) -> list[str]:
    """The values of ``name=`` lines in the unit's [Service] section, in order."""
    values = []
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line.startswith(f"{name}="):
            values.append(line.split("=", 1)[1])
    return values


def command(value: str) -> tuple[str, list[str]]:
    """(prefixes, argv) of an Exec line: systemd's special prefixes come off the path."""
    argv = shlex.split(value)
    path = argv[0].lstrip("@-:+!")
    return argv[0][: len(argv[0]) - len(path)], [path, *argv[1:]]


def test_the_unit_runs_node_services_with_the_example_config_path() -> None:
    (start,) = directives("ExecStart")
    prefixes, argv = command(start)
    assert prefixes == ""
    assert argv == [
        "/usr/local/bin/node-services",
        "run",
        "--config",
        "/etc/node-services/config.yaml",
    ]
    assert directives("ExecReload") == ["/bin/kill -HUP $MAINPID"]  # SIGHUP re-reads snapshots
    example = yaml.safe_load(EXAMPLE.read_text())
    assert example["metadata_listen"] == "169.254.169.250:80"
    assert example["ipam_dir"].startswith("/var/lib/node-services/")  # the StateDirectory
    assert directives("StateDirectory") == ["node-services"]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze (Debian package systemd) is not installed",
)
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    # verify also checks that every command exists: point ExecStart at this checkout's.
    text = UNIT.read_text().replace("/usr/local/bin/node-services", str(NODE_SERVICES))
    unit = tmp_path / "node-services.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert str(unit) not in result.stderr and "node-services.service" not in result.stderr


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=30, check=check
    )


@pytest.fixture
def netns() -> Iterator[str]:
    with network_namespace("unit", "curl", "dig") as name:
        yield name


def test_the_units_commands_serve_dns_and_metadata_in_a_namespace(
    netns: str, tmp_path: Path
) -> None:
    # ExecStartPre, twice: a restart finds the interface and address already there.
    for _ in range(2):
        for value in directives("ExecStartPre"):
            prefixes, argv = command(value)
            result = in_ns(netns, *argv, check=False)
            assert result.returncode == 0 or "-" in prefixes, (argv, result.stderr)
    shown = in_ns(netns, "ip", "-4", "-o", "address", "show", "dev", "lo").stdout
    assert "169.254.169.250/32" in shown

    # The example config, with this test's snapshot, node and directories.
    config = yaml.safe_load(EXAMPLE.read_text())
    config.update(
        snapshots=[str(DEMO_SNAPSHOT)],
        node_name="node-a",
        upstreams=["127.0.0.1:1"],  # nothing is forwarded anywhere
        ipam_dir=str(tmp_path / "ipam"),
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    checked = in_ns(netns, str(NODE_SERVICES), "check-config", str(config_file), check=False)
    assert checked.returncode == 0, checked.stderr

    (start,) = directives("ExecStart")
    _, argv = command(start)
    argv = [str(NODE_SERVICES), *argv[1:]]
    argv[argv.index("--config") + 1] = str(config_file)
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(["ip", "netns", "exec", netns, *argv], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        readyz = ("curl", "-s", "http://127.0.0.1:9254/readyz")
        while in_ns(netns, *readyz, check=False).stdout.strip() != "ok":
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, "not ready in 30 s"
            time.sleep(0.1)
        hostname = in_ns(netns, "curl", "-s", "http://169.254.169.250/latest/self/host/hostname")
        assert hostname.stdout == "node-a"
        answer = in_ns(
            netns, "dig", "+short", "@127.0.0.1", "-p", "53", "kubernetes.default.svc.cluster.local"
        )
        assert answer.stdout.split() == ["10.43.0.1"]
        daemon.send_signal(signal.SIGHUP)  # ExecReload
        time.sleep(0.2)
        assert daemon.poll() is None
        daemon.send_signal(signal.SIGTERM)  # systemctl stop
        assert daemon.wait(timeout=20) == 0  # a clean stop: Restart=on-failure leaves it
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()


def test_the_unit_is_type_notify_with_a_watchdog_and_keeps_its_sockets() -> None:
    assert directives("Type") == ["notify"]  # READY=1 once listening and synced
    assert directives("NotifyAccess") == ["main"]
    (watchdog,) = directives("WatchdogSec")
    assert int(watchdog) >= 10  # pinged at half of it
    assert int(directives("FileDescriptorStoreMax")[0]) >= 4  # dns-udp, dns-tcp, metadata, admin
    assert directives("RuntimeDirectory") == ["node-services"]  # the default runtime_dir
    assert directives("RuntimeDirectoryPreserve") == ["restart"]
    # The stop timeout leaves room for the lame duck (shutdown_grace, 5 s by default).
    assert int(directives("TimeoutStopSec")[0]) > 5


def test_wireguard_gos_socket_directory_is_made_and_writable() -> None:
    # ProtectSystem=strict leaves /run read-only: wireguard-go could not make its socket
    assert directives("ProtectSystem") == ["strict"]
    assert "/run/wireguard" in directives("ReadWritePaths")
    made = [command(value) for value in directives("ExecStartPre")]
    assert ("+", ["/bin/mkdir", "-p", "/run/wireguard"]) in made
    # before the daemon runs, and never removed on stop (not a RuntimeDirectory)
    assert "wireguard" not in " ".join(directives("RuntimeDirectory"))
