"""Listening sockets passed from a running instance to its successor (SCM_RIGHTS).

A new instance started with the same settings while an old one runs finds the old one's
hand-over socket in the runtime directory (``handover-<netns>-<dns host>-<dns port>.sock``).
Once it is ready (sources synced, zone built) it asks for the listeners over that connection;
the old one sends the descriptors of every listener whose address the new one names, the new
one starts serving on them and says so, and only then does the old one stop reading, answer
what it already received and exit. The sockets are never closed in between: a query queued in
them is read by whichever process reads first, so none is lost.

Wire format (one unix stream connection, lines of JSON):

    new -> old   {"pid": 123, "preparing": true}   (at once: it syncs its sources meanwhile;
                                                  a connection that says nothing is dropped)
    new -> old   {"pid": 123, "listeners": {"dns-udp": "127.0.0.1:53", ...}}
    old -> new   {"pid": 45, "listeners": ["dns-udp", ...]}  + the descriptors, in order
    new -> old   {"serving": true}
    old -> new   {"released": true}     (the old one has removed its socket file: the new one
                                         may put its own there)

The old one passes, for each listener asked for, one of its own of the same kind (dns-udp,
dns-tcp, metadata, admin: :func:`kind_of`) at the same address, under the name the new one
asked with: with several DNS addresses (``dns-udp``, ``dns-udp-2``...), their order may change
between the two. An address only one of them names is bound (new) or closed (old) as usual.

Only a peer of our own uid (or root) may connect (``SO_PEERCRED``); the directory is 0700.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

DNS_UDP: Final = "dns-udp"
DNS_TCP: Final = "dns-tcp"
METADATA: Final = "metadata"
ADMIN: Final = "admin"
NAMES: Final = (DNS_UDP, DNS_TCP, METADATA, ADMIN)
"""The listeners of one DNS address (also the FDNAME= of systemd's store); the DNS
listeners of the second and later dns_listen addresses are ``dns-udp-2``, ``dns-tcp-2``...
(:func:`dns_names`)."""


def dns_names(index: int) -> tuple[str, str]:
    """The UDP and TCP listener names of the ``index``-th (from 0) DNS address: the first's
    are ``dns-udp``/``dns-tcp``, as before several addresses could be named, so that an
    instance of an older build hands over to this one and back."""
    if index == 0:
        return DNS_UDP, DNS_TCP
    return f"{DNS_UDP}-{index + 1}", f"{DNS_TCP}-{index + 1}"


def kind_of(name: str) -> str:
    """What listener ``name`` is (dns-udp, dns-tcp, metadata, admin), "" for a name this
    build does not know. Listeners are matched by kind and address, never by name alone: the
    order of dns_listen may change between two instances."""
    if name in NAMES:
        return name
    base, _, number = name.rpartition("-")
    if base in (DNS_UDP, DNS_TCP) and number.isdigit() and not number.startswith("0"):
        return base
    return ""


MAX_MESSAGE: Final = 64 * 1024
MAX_FDS: Final = 136
"""Descriptors a take receives in its one message: every listener (two per DNS address, at most
config.MAX_DNS_LISTEN of them, + metadata + admin), with room; the kernel's own cap is 253."""
CONNECT_TIMEOUT: Final = 5.0
PREPARE_TIMEOUT: Final = 150.0
"""Seconds a successor that said "preparing" may take until it asks (it waits up to 120 s for
its sources, app.HANDOVER_READY_TIMEOUT)."""
EXCHANGE_TIMEOUT: Final = 30.0
"""Seconds each step of the exchange may take once the new instance asks (generous: the
machine may be loaded; the old instance keeps serving meanwhile)."""


class HandoverError(Exception):
    """The hand-over exchange failed; the message names the socket and the step."""


def network_namespace() -> int:
    """The inode of this process's network namespace (0 when /proc does not say)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def socket_path(runtime_dir: Path, dns_host: str, dns_port: int) -> Path:
    """The hand-over socket of the instance serving DNS on ``dns_host:dns_port`` in this
    network namespace: instances serving different addresses, or the same address in other
    namespaces (sharing the file system), never meet."""
    host = dns_host.replace(":", "_").replace("/", "_") or "any"
    return runtime_dir / f"handover-{network_namespace()}-{host}-{dns_port}.sock"


@dataclass(eq=False)
class Listeners:
    """The listening sockets of this instance by name; the originals of what the servers
    serve on (each server holds a ``dup`` of its own)."""

    sockets: dict[str, socket.socket] = field(default_factory=dict)
    origin: str = "bound"
    """How they came: bound, handed over (pid N), systemd."""

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()


def bind_tcp(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket as aiohttp's TCPSite makes one (SO_REUSEADDR, v6-only for an
    IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _peer_allowed(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


def check_directory(path: Path) -> None:
    """Raise HandoverError unless ``path`` is a directory (not a symlink) owned by us that
    neither group nor others may write: else another user could put a socket there that we
    would take listeners from, or replace ours."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise HandoverError(f"runtime directory {path}: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise HandoverError(f"runtime directory {path}: not a directory")
    if st.st_uid != os.getuid():
        raise HandoverError(f"runtime directory {path}: owned by uid {st.st_uid}, not us")
    if st.st_mode & 0o022:
        raise HandoverError(
            f"runtime directory {path}: mode {stat.S_IMODE(st.st_mode):o} lets others write"
        )


def _read_line(conn: socket.socket, fds: list[int] | None = None) -> dict[str, Any]:
    """One JSON line from a blocking socket; descriptors that came with it into ``fds``."""
    data = b""
    while not data.endswith(b"\n"):
        if fds is not None:
            chunk, received, flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, MAX_FDS)
            fds.extend(received)
            if flags & socket.MSG_CTRUNC:
                raise HandoverError("descriptors truncated (MSG_CTRUNC)")
        else:
            chunk = conn.recv(MAX_MESSAGE)
        if not chunk:
            raise HandoverError("the peer closed the connection")
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise HandoverError("message too long")
    message = json.loads(data)
    if not isinstance(message, dict):
        raise HandoverError("message is not a JSON object")
    return message


def _wrap(names: list[Any], fds: list[int]) -> dict[str, socket.socket]:
    """One socket object per descriptor; on an error the objects made so far are closed and
    the descriptors not yet wrapped closed raw (each exactly once)."""
    sockets: dict[str, socket.socket] = {}
    made: list[socket.socket] = []
    try:
        for name, fd in zip(names, fds, strict=True):
            sock = socket.socket(fileno=fd)
            made.append(sock)
            if str(name) in sockets:
                raise HandoverError(f"listener {name} passed twice")
            sockets[str(name)] = sock
    except BaseException:
        for sock in made:
            sock.close()
        for fd in fds[len(made) :]:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    return sockets


# -- the new instance -------------------------------------------------------------------------


@dataclass(eq=False)
class Predecessor:
    """A connection to the running instance we take over from."""

    path: Path
    conn: socket.socket
    pid: int = 0

    def _take(self, wanted: Mapping[str, str]) -> dict[str, socket.socket]:
        conn = self.conn
        conn.settimeout(EXCHANGE_TIMEOUT)
        conn.sendall(json.dumps({"pid": os.getpid(), "listeners": dict(wanted)}).encode() + b"\n")
        fds: list[int] = []
        try:
            reply = _read_line(conn, fds)
            if reply.get("refused"):
                raise HandoverError(f"refused: {reply['refused']}")
            names = reply.get("listeners")
            if not isinstance(names, list) or len(names) != len(fds):
                raise HandoverError(f"{len(fds)} descriptors for listeners {names!r}")
            self.pid = int(reply.get("pid", 0))
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        return _wrap(names, fds)

    async def take(self, wanted: Mapping[str, str]) -> dict[str, socket.socket]:
        """Ask for the listeners named in ``wanted`` (name -> configured address); returns
        those the predecessor holds at the same address."""
        try:
            sockets = await asyncio.to_thread(self._take, wanted)
        except (OSError, ValueError, HandoverError) as exc:
            self.close()
            raise HandoverError(f"hand-over from {self.path}: {exc}") from exc
        for sock in sockets.values():
            sock.setblocking(False)
        return sockets

    def _release(self) -> None:
        self.conn.sendall(b'{"serving": true}\n')
        reply = _read_line(self.conn)  # it has removed its socket file
        if reply.get("released") is not True:
            raise HandoverError(f"no release but {reply!r}")

    async def release(self) -> bool:
        """Tell the predecessor we serve on its sockets: it stops reading and exits. True
        once it has given up the hand-over socket's path; False (logged) when it did not say
        so (it gave up waiting for us, or went away): it may serve on, so we must not."""
        try:
            await asyncio.to_thread(self._release)
        except (OSError, ValueError, HandoverError) as exc:
            log.error("hand-over: pid %d did not release its listeners: %s", self.pid, exc)
            return False
        finally:
            self.close()
        return True

    def close(self) -> None:
        self.conn.close()


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(CONNECT_TIMEOUT)
    try:
        conn.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None  # no instance, or a stale socket file of one that died
    except OSError:
        conn.close()
        raise
    return conn


async def find_predecessor(path: Path) -> Predecessor | None:
    """A connection to the instance listening at ``path``, or None when none runs (or the
    directory or the peer is not to be trusted: logged)."""
    try:
        check_directory(path.parent)
    except HandoverError as exc:
        if path.parent.exists():
            log.warning("hand-over: %s: not looking for a predecessor", exc)
        return None
    try:
        conn = await asyncio.to_thread(_connect, path)
    except OSError as exc:
        log.warning("hand-over: cannot reach %s (%s): binding the listeners", path, exc)
        return None
    if conn is None:
        return None
    try:
        allowed = _peer_allowed(conn)
    except OSError:
        allowed = False
    if not allowed:
        log.warning("hand-over: %s is served by another uid: not taking over from it", path)
        conn.close()
        return None
    try:  # it serves on (and waits for us in its lame duck) while our sources sync
        hello = json.dumps({"pid": os.getpid(), "preparing": True}).encode() + b"\n"
        await asyncio.to_thread(conn.sendall, hello)
    except OSError as exc:
        log.warning("hand-over: %s: %s: binding the listeners", path, exc)
        conn.close()
        return None
    return Predecessor(path, conn)


# -- the running instance ---------------------------------------------------------------------


@dataclass(eq=False)
class HandoverServer:
    """Offers this instance's listeners at ``path`` until a successor takes them; then calls
    ``on_handed_over(successor_pid)`` once (the daemon drains and exits)."""

    path: Path
    listeners: Listeners
    addresses: Mapping[str, str]
    """Name -> configured address of each listener (what a successor must ask for)."""
    on_handed_over: Callable[[int], None]
    handed_over: bool = False
    failures: int = 0
    """Exchanges that did not complete (refused peer, protocol error, successor gone)."""
    _sock: socket.socket | None = None
    _inode: int = 0
    _task: asyncio.Task[None] | None = None
    _exchanges: set[asyncio.Task[None]] = field(default_factory=set)
    _preparing: int = 0
    """Connected successors that said they prepare (sources syncing) and have not asked yet."""
    _busy: bool = False
    """An exchange has passed the descriptors and waits for its successor: later requests
    are refused (two successors must not both serve)."""

    def start(self) -> bool:
        """Listen at :attr:`path`; False (logged) when the directory is not usable."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            check_directory(self.path.parent)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a predecessor's (it handed over) or a dead one's
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(self.path))
                os.chmod(self.path, 0o600)
                sock.listen(4)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
        except (OSError, HandoverError) as exc:
            log.warning(
                "hand-over: cannot listen on %s (%s): a successor will not take over these "
                "sockets (set runtime_dir to a writable directory)",
                self.path,
                exc,
            )
            return False
        self._sock = sock
        self._inode = os.stat(self.path).st_ino
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="handover")
        log.info("hand-over socket %s", self.path)
        return True

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while not self.handed_over:
            conn, _ = await loop.sock_accept(self._sock)
            task = loop.create_task(self._exchange(conn), name="handover-exchange")
            self._exchanges.add(task)
            task.add_done_callback(self._exchanges.discard)

    async def _exchange(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            conn.setblocking(False)
            if not _peer_allowed(conn):
                log.warning("hand-over: refused a peer of another uid on %s", self.path)
                self.failures += 1
                return
            try:
                buffer = bytearray()
                # An idle connection is dropped: only a successor that says so counts.
                request = await self._receive(loop, conn, EXCHANGE_TIMEOUT, buffer)
                if request.get("preparing") is True:
                    self._preparing += 1
                    try:
                        request = await self._receive(loop, conn, PREPARE_TIMEOUT, buffer)
                    finally:
                        self._preparing -= 1
                wanted = request.get("listeners")
                pid = int(request.get("pid", 0))
                if not isinstance(wanted, dict):
                    raise HandoverError("no listeners asked for")
                if self._busy or self.handed_over:
                    log.warning(
                        "hand-over: pid %d asks while another successor takes over: refused", pid
                    )
                    refusal = {"pid": os.getpid(), "listeners": [], "refused": "busy"}
                    await loop.sock_sendall(conn, json.dumps(refusal).encode() + b"\n")
                    self.failures += 1
                    return
                matched = self._matching(wanted)
                names = list(matched)
                log.info("hand-over: pid %d asks for the listeners; passing %s", pid, names)
                header = json.dumps({"pid": os.getpid(), "listeners": names}).encode() + b"\n"
                fds = [self.listeners.sockets[own].fileno() for own in matched.values()]
                self._busy = True
                try:
                    socket.send_fds(conn, [header], fds)
                    reply = await self._receive(loop, conn, EXCHANGE_TIMEOUT * 4, buffer)
                finally:
                    self._busy = False
            except (OSError, ValueError, HandoverError, TimeoutError) as exc:
                log.warning("hand-over on %s failed, serving on: %s", self.path, exc)
                self.failures += 1
                return
            if reply.get("serving") is True and not self.handed_over:
                self.handed_over = True
                log.info("hand-over: pid %d serves on our listeners", pid)
                await self._close_listener()  # before the successor puts its own there
                with contextlib.suppress(OSError):
                    conn.send(b'{"released": true}\n')  # a few bytes: never blocks
                self.on_handed_over(pid)

    def _matching(self, wanted: Mapping[str, Any]) -> dict[str, str]:
        """Each listener asked for (its name as the successor calls it -> our name for it):
        one of ours of the same kind at the same address, each passed once."""
        matched: dict[str, str] = {}
        given: set[str] = set()
        for name, address in wanted.items():
            kind = kind_of(str(name))
            for own, sock in self.listeners.sockets.items():
                if (
                    own not in given
                    and kind
                    and kind_of(own) == kind
                    and self.addresses.get(own) == address
                    and sock.fileno() >= 0
                ):
                    matched[str(name)] = own
                    given.add(own)
                    break
        return matched

    @staticmethod
    async def _receive(
        loop: asyncio.AbstractEventLoop,
        conn: socket.socket,
        timeout: float,  # noqa: ASYNC109
        buffer: bytearray,
    ) -> dict[str, Any]:
        """The next line (JSON object); what came after it stays in ``buffer``."""
        async with asyncio.timeout(timeout):
            while b"\n" not in buffer:
                chunk = await loop.sock_recv(conn, MAX_MESSAGE)
                if not chunk:
                    raise HandoverError("the peer closed the connection")
                buffer += chunk
                if len(buffer) > MAX_MESSAGE:
                    raise HandoverError("message too long")
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        message = json.loads(line)
        if not isinstance(message, dict):
            raise HandoverError("message is not a JSON object")
        return message

    @property
    def successor_waiting(self) -> bool:
        """A new instance said it prepares to take over ("preparing"), or has the
        descriptors: an idle connection does not count (it is dropped after
        EXCHANGE_TIMEOUT), nor does a preparing one after PREPARE_TIMEOUT."""
        return (self._preparing > 0 or self._busy) and not self.handed_over

    async def close(self) -> None:
        """Stop offering; remove the socket file unless a successor has replaced it."""
        for task in self._exchanges:
            if task is not asyncio.current_task():
                task.cancel()
        await self._close_listener()

    async def _close_listener(self) -> None:
        # The accept loop first, awaited: its pending sock_accept drops its reader (by fd
        # number) only as the cancellation runs; after close() that number may be a new
        # socket's, whose reader it would remove.
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    self.path.unlink()
