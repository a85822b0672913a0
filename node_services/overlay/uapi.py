"""Userspace WireGuard (``wireguard-go``): its UAPI text protocol and starting the process.

wireguard-go serves each device on the unix socket ``<socket dir>/<device>.sock`` (the
directory is ``/var/run/wireguard``, fixed when it is built, and not per network namespace:
several namespace "hosts" on one machine need one mount namespace each). The protocol
(https://www.wireguard.com/xplatform/) is ``key=value`` lines ended by an empty line: a
``get=1`` request answers the device's settings and peers, a ``set=1`` request changes them;
both answers end with ``errno=N``. Keys are hex there, base64 everywhere else.

The request builders and the answer parser are pure and unit-tested; :class:`Uapi` does the
socket I/O (blocking: the reconciler calls it from a worker thread). A private key passes
through :func:`set_request` only, into the socket: it is never logged or kept.
"""

from __future__ import annotations

import base64
import errno as errno_codes
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from node_services.overlay import wgkeys
from node_services.overlay.wireguard import REMOVE, PeerChange, WgPeer, WgState

SOCKET_DIR: Final = Path("/var/run/wireguard")
TIMEOUT: Final = 5.0  # seconds for one request; wireguard-go answers in well under one
START_TIMEOUT: Final = 10.0  # seconds for a started wireguard-go's socket to appear


class UapiError(Exception):
    """wireguard-go refused a request, or cannot be reached or started."""


def _hex(b64: str) -> str:
    return base64.b64decode(b64).hex()


def _b64(hex_text: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_text)).decode()


def get_request() -> bytes:
    return b"get=1\n\n"


def set_request(
    *,
    private_key: wgkeys.PrivateKey | None = None,
    listen_port: int | None = None,
    changes: Sequence[PeerChange] = (),
) -> bytes:
    """A ``set=1`` request: the device's key and port when given, then each peer change (an
    upsert replaces the peer's AllowedIPs and sets every other field we manage)."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.raw.hex()}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    for change in changes:
        peer = change.peer
        lines.append(f"public_key={_hex(peer.public_key)}")
        if change.op == REMOVE:
            lines.append("remove=true")
            continue
        if peer.endpoint:
            lines.append(f"endpoint={peer.endpoint}")
        lines.append(f"persistent_keepalive_interval={peer.keepalive}")
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={cidr}" for cidr in peer.allowed_ips)
    return ("\n".join(lines) + "\n\n").encode()


def answer_errno(text: str) -> int:
    """The ``errno=N`` of an answer; EPROTO when it has none."""
    for line in reversed(text.splitlines()):
        if line.startswith("errno="):
            try:
                return int(line[6:])
            except ValueError:
                break
    return errno_codes.EPROTO


def parse_get(text: str) -> WgState:
    """The device as a ``get=1`` answer describes it (its private key turned into the public
    key at once: the private key is not kept)."""
    public = ""
    port = 0
    peers: list[WgPeer] = []
    current: dict[str, str] | None = None
    allowed: list[str] = []

    def close_peer() -> None:
        if current is not None:
            peers.append(
                WgPeer(
                    public_key=current["public_key"],
                    endpoint=current.get("endpoint", ""),
                    allowed_ips=tuple(sorted(allowed)),
                    keepalive=int(current.get("persistent_keepalive_interval", "0")),
                )
            )

    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if not sep:
            continue
        if name == "public_key":
            close_peer()
            current, allowed = {"public_key": _b64(value)}, []
        elif current is None:
            if name == "private_key" and value.strip("0"):
                public = wgkeys.public_of(bytes.fromhex(value))
            elif name == "listen_port":
                port = int(value)
        elif name == "allowed_ip":
            allowed.append(value)
        elif name in ("endpoint", "persistent_keepalive_interval"):
            current[name] = value
    close_peer()
    return WgState(public, port, frozenset(peers))


class Uapi:
    """wireguard-go's devices, through their sockets in ``socket_dir``."""

    def __init__(self, socket_dir: Path = SOCKET_DIR, program: str = "wireguard-go") -> None:
        self.socket_dir = socket_dir
        self.program = program
        self.children: list[subprocess.Popen[bytes]] = []  # kept: reaped when they exit

    def socket_path(self, device: str) -> Path:
        return self.socket_dir / f"{device}.sock"

    def _request(self, device: str, request: bytes) -> str:
        path = self.socket_path(device)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect(str(path))
                sock.sendall(request)
                data = bytearray()
                while not data.endswith(b"\n\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError as exc:
            raise UapiError(f"wireguard-go socket {path}: {exc.strerror or exc}") from None
        return data.decode(errors="replace")

    def running(self, device: str) -> bool:
        """Whether a wireguard-go answers for ``device``."""
        if not self.socket_path(device).exists():
            return False
        try:
            self.get(device)
        except UapiError:
            return False
        return True

    def get(self, device: str) -> WgState:
        text = self._request(device, get_request())
        code = answer_errno(text)
        if code:
            raise UapiError(f"wireguard-go {device}: get failed: errno {code}")
        return parse_get(text)

    def set(self, device: str, request: bytes) -> None:
        code = answer_errno(self._request(device, request))
        if code:
            raise UapiError(
                f"wireguard-go {device}: set refused: errno {code} ({os.strerror(abs(code))})"
            )

    def start(self, device: str) -> int:
        """Start ``wireguard-go -f <device>`` in its own session (so, like a kernel device, it
        outlives a restart of the daemon, which finds it running); its PID once it answers."""
        program = shutil.which(self.program)
        if program is None:
            raise UapiError(f"{self.program} is not installed (and no wireguard kernel module)")
        proc = subprocess.Popen(
            [program, "-f", device],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"},
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise UapiError(f"{self.program} -f {device} exited with status {proc.returncode}")
            if self.running(device):
                self.children = [child for child in self.children if child.poll() is None]
                self.children.append(proc)
                return proc.pid
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        raise UapiError(f"{self.program} -f {device}: no socket after {START_TIMEOUT:g}s")
