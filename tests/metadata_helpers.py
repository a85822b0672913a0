"""Metadata test helpers: curl bound to a loopback source address, a daemon runner."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from helpers import DaemonProcess, free_port, http_get


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lowercased names
    body: bytes


Curl = Callable[..., Reply]


def run_curl(
    url: str,
    *,
    interface: str = "127.0.0.1",
    accept: str | None = None,
    headers: tuple[str, ...] = (),
) -> Reply:
    """GET with the real curl, from ``interface`` (a loopback source address)."""
    command = ["curl", "-s", "-i", "--max-time", "10", "--interface", interface]
    if accept is not None:
        command += ["-H", f"Accept: {accept}"]
    for header in headers:
        command += ["-H", header]
    out = subprocess.run([*command, url], capture_output=True, check=True, timeout=15).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return Reply(int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body)


@dataclass
class MetadataDaemon:
    """A daemon process with its metadata URL."""

    process: DaemonProcess
    url: str

    def store_version(self) -> int:
        return int(float(self.process.metric("node_services_store_version")))


def start_metadata_daemon(
    log_path: Path, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 10
) -> MetadataDaemon:
    port = free_port()
    process = DaemonProcess(
        ["--metadata-listen", f"127.0.0.1:{port}", *args], log_path, env=dict(env or {})
    )
    process.start()
    process.wait_for(lambda: _ready(process), what="readiness", timeout=ready_timeout)
    url = f"http://127.0.0.1:{port}"
    process.wait_for(lambda: _answers(url), what="the metadata listener")
    return MetadataDaemon(process, url)


def _ready(process: DaemonProcess) -> bool:
    try:  # a large first load keeps the admin endpoint busy for a while: ask again
        return process.get("/readyz")[0] == 200
    except OSError:
        return False


def _answers(url: str) -> bool:
    try:
        return http_get(url + "/", timeout=1)[0] == 200
    except OSError:
        return False
