"""Test helpers: free loopback ports, HTTP GET, and the daemon run as a real process."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
DEMO_SNAPSHOT = ROOT / "demo" / "snapshot.yaml"


_HANDED_OUT: set[int] = set()
_PICK = random.Random(os.getpid() ^ time.monotonic_ns())


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_FREE_RANGE = (10000, max(10001, _ephemeral_floor() - 1))
"""Ports for the daemons tests start: below the kernel's ephemeral range, so no client
connection of any process (and no ``bind(0)``) can take one between our check and the
daemon's bind; picked at random, so parallel test runs rarely meet."""


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port free for TCP and UDP, never one this test run handed out before."""
    for _ in range(1000):
        port = _PICK.randint(*_FREE_RANGE)
        if port in _HANDED_OUT:
            continue
        with (
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        ):
            try:
                tcp.bind((host, port))
                udp.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port on {host} after 1000 tries")


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class DaemonProcess:
    """A node-services daemon started by a test, on loopback ports; ended by its PID."""

    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    admin_port: int = field(default_factory=free_port)
    dns_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    own_dns: bool = True
    """Listen on 127.0.0.1:<dns_port> first; False: ``args`` name every DNS address."""

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> DaemonProcess:
        command = [
            sys.executable,
            "-m",
            "node_services",
            "run",
            "--admin-listen",
            f"127.0.0.1:{self.admin_port}",
            *(("--dns-listen", f"127.0.0.1:{self.dns_port}") if self.own_dns else ()),
            "--metadata-listen",
            f"127.0.0.1:{free_port()}",
            "--node-name",
            "node-a",
            *self.args,
        ]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NODE_SERVICES_", "CATTLE_", "KUBERNETES_SERVICE_"))
        }
        # No lame duck at SIGTERM (tests stop hundreds of daemons), and a hand-over socket of
        # this daemon's own: a test that wants either sets it in self.env.
        env["NODE_SERVICES_SHUTDOWN_GRACE"] = "0"
        env["NODE_SERVICES_RUNTIME_DIR"] = str(self.log_path.with_suffix(".run"))
        env.update(self.env)
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.wait_for(lambda: self._answers("/healthz"), what="/healthz")
        return self

    def _answers(self, path: str) -> bool:
        try:
            http_get(self.admin + path, timeout=1)
        except OSError:
            return False
        return True

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.admin + path)

    def wait_for(self, check: Callable[[], bool], *, what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n{self.output()}")
            if check():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()}")

    def metric(self, line_prefix: str) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        for line in body.splitlines():
            if line.startswith(line_prefix + " "):
                return line[len(line_prefix) + 1 :]
        raise AssertionError(f"no metric {line_prefix!r} in:\n{body}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@contextlib.contextmanager
def network_namespace(label: str, *tools: str) -> Iterator[str]:
    """A network namespace of the test's own, loopback up, deleted afterwards; the test is
    skipped (with the reason) without root or without one of ``tools`` (and ``ip``)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for tool in ("ip", *tools):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: iproute2, curl, bind9-dnsutils)")
    name = f"nsvc-{label}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def exported_names(node: DaemonProcess) -> set[str]:
    """Sample and family names on the daemon's /metrics, counters with and without `_total`,
    histograms with their `_bucket`, `_sum` and `_count` series."""
    status, body = node.get("/metrics")
    assert status == 200
    names: set[str] = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "counter":
                names.add(name if name.endswith("_total") else name + "_total")
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names
