"""systemd's notify protocol and socket passing, implemented directly (no libsystemd).

A notification is one datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET`` (a path, or an
abstract socket when it starts with ``@``), optionally carrying descriptors (``FDSTORE=1``).
Descriptors systemd passes back on start come as ``LISTEN_FDS`` from fd 3, named by
``LISTEN_FDNAMES``, meant for us when ``LISTEN_PID`` is our pid (sd_listen_fds(3)).
Without ``$NOTIFY_SOCKET`` every call here does nothing.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

log = logging.getLogger(__name__)

LISTEN_FDS_START: Final = 3


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it in MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    return value


@dataclass(eq=False)
class Notifier:
    """Sends notifications to the service manager; a no-op without one."""

    address: str | bytes | None = None
    sent: int = 0
    errors: int = 0
    _sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        return cls(_address(value) if value else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str, fds: Sequence[int] = ()) -> bool:
        """Send ``lines`` (``KEY=value``) in one datagram, with ``fds`` attached; False when
        there is no manager or the send failed (logged and counted, never raised)."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        payload = "\n".join(lines).encode()
        try:
            if fds:
                # Not socket.send_fds: it drops the address argument (Python < 3.13).
                rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())
                self._sock.sendmsg([payload], [rights], 0, self.address)
            else:
                self._sock.sendto(payload, self.address)
        except OSError as exc:
            self.errors += 1
            log.warning("sd_notify to %r failed (%s): %s", self.address, lines[0], exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading")

    def stopping(self, status: str = "stopping") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def store_fds(self, named: Mapping[str, int]) -> None:
        """Keep these descriptors in the manager's store (FDSTORE=1, one FDNAME each), to be
        passed back on the next start of the unit. Each name's earlier copies are removed
        first (FDSTOREREMOVE=1): the store keeps one socket per name, the current one."""
        for name, fd in named.items():
            self.remove_fds(name)
            self.notify("FDSTORE=1", f"FDNAME={name}", fds=[fd])

    def remove_fds(self, name: str) -> None:
        """Drop every descriptor called ``name`` from the manager's store (FDSTOREREMOVE=1):
        the manager's copy of a socket we no longer use would keep its address bound."""
        self.notify("FDSTOREREMOVE=1", f"FDNAME={name}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of ``WATCHDOG_USEC``; None when the manager
    wants none (unset, 0, or ``WATCHDOG_PID`` names another process)."""
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


@dataclass(eq=False)
class Watchdog:
    """Pings WATCHDOG=1 every ``interval`` seconds from the event loop, only while
    ``healthy()`` holds: a stalled loop sends nothing (its ping never runs), and neither does
    one with a dead supervised task, so the manager restarts the daemon."""

    notifier: Notifier
    interval: float
    healthy: Callable[[], bool]
    pings: int = 0
    withheld: int = 0
    _logged: bool = field(default=False)

    async def run(self) -> None:
        while True:
            if self.healthy():
                if self.notifier.notify("WATCHDOG=1"):
                    self.pings += 1
                self._logged = False
            else:
                self.withheld += 1
                if not self._logged:
                    log.error("watchdog: not healthy, withholding WATCHDOG=1 pings")
                    self._logged = True
            await asyncio.sleep(self.interval)


def listen_fd_list(environ: dict[str, str] | None = None) -> list[tuple[str, int]]:
    """Every descriptor the manager passed us as (name, fd), in order, duplicates of a name
    included (a store that kept several copies), and the LISTEN_* variables removed so that
    no child takes them for its own. Unnamed ones are called ``unknown``."""
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", "0"))
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    passed: list[tuple[str, int]] = []
    for i in range(count):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        passed.append((names[i] if i < len(names) and names[i] else "unknown", fd))
    return passed


def listen_fds(environ: dict[str, str] | None = None) -> dict[str, int]:
    """Like :func:`listen_fd_list`, one descriptor per name: the first; later copies of a
    name are closed."""
    fds: dict[str, int] = {}
    for name, fd in listen_fd_list(environ):
        if name in fds:
            os.close(fd)
            continue
        fds[name] = fd
    return fds
