"""Zero-loss restarts: a second instance takes over the first one's listening sockets (the
hand-over socket, SCM_RIGHTS), or systemd's fd store hands them to the next start, while a
steady DNS (UDP + TCP) and metadata load runs; not one query or request may fail.

Real daemon processes on loopback ports; the load is bounded in count and time; the
assertion is zero lost, not latency (generous client timeouts: 2 shared cores)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import pytest
from helpers import DEMO_SNAPSHOT, ROOT, DaemonProcess, free_port

from node_services import handover

NAME = "kubernetes.default.svc.cluster.local"
ADDRESS = "10.43.0.1"
CLIENT_TIMEOUT = 30.0
"""Seconds a client waits for one answer: a lost query fails, a slow one does not."""
MAX_SECONDS = 120.0
"""Every load loop ends by then whatever happens (bounded)."""


@dataclass
class Load:
    """Steady DNS (UDP and TCP) and metadata load against one address, in threads."""

    dns_port: int
    metadata_port: int
    rate: float = 60.0
    """Queries per second per DNS thread (two UDP + two TCP threads: 240 q/s)."""
    stop: threading.Event = field(default_factory=threading.Event)
    answered: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    last_answer: dict[str, float] = field(default_factory=dict)
    started: float = 0.0
    slowest: float = 0.0
    """Seconds of the slowest answer (reported, not asserted: the machine is shared)."""
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    host: str = "127.0.0.1"
    """The DNS address asked (the metadata load always asks 127.0.0.1)."""

    def _record(self, kind: str, error: str | None, seconds: float = 0.0) -> None:
        with self._lock:
            self.slowest = max(self.slowest, seconds)
            if error is None:
                self.answered[kind] = self.answered.get(kind, 0) + 1
                self.last_answer[kind] = time.monotonic()
            else:
                self.failures.append(f"{kind}: {error}")

    def _dns(self, kind: str) -> None:
        interval = 1 / self.rate
        deadline = self.started + MAX_SECONDS
        next_at = time.monotonic()
        for _ in range(int(self.rate * MAX_SECONDS)):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            query = dns.message.make_query(NAME, dns.rdatatype.A)
            sent = time.monotonic()
            try:
                if kind.startswith("udp"):
                    response = dns.query.udp(
                        query, self.host, port=self.dns_port, timeout=CLIENT_TIMEOUT
                    )
                else:
                    response = dns.query.tcp(
                        query, self.host, port=self.dns_port, timeout=CLIENT_TIMEOUT
                    )
                got = sorted(rr.to_text() for rrset in response.answer for rr in rrset)
                error = None if got == [ADDRESS] else f"answer {got} rcode {response.rcode()}"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            self._record(kind, error, time.monotonic() - sent)
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def _metadata(self) -> None:
        url = f"http://127.0.0.1:{self.metadata_port}/latest/self/host/hostname"
        deadline = self.started + MAX_SECONDS
        for _ in range(int(10 * MAX_SECONDS)):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            result = subprocess.run(
                ["curl", "-sS", "-m", str(CLIENT_TIMEOUT), url],
                capture_output=True,
                text=True,
                timeout=CLIENT_TIMEOUT + 10,
                check=False,
            )
            ok = result.returncode == 0 and result.stdout == "node-a"
            self._record(
                "metadata",
                None
                if ok
                else f"curl {result.returncode} {result.stdout!r} {result.stderr.strip()}",
            )
            time.sleep(0.05)

    def start(self) -> None:
        self.started = time.monotonic()
        for kind in ("udp-1", "udp-2", "tcp-1", "tcp-2"):
            self._threads.append(threading.Thread(target=self._dns, args=(kind,), daemon=True))
        self._threads.append(threading.Thread(target=self._metadata, daemon=True))
        for thread in self._threads:
            thread.start()

    def finish(self) -> float:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=CLIENT_TIMEOUT + 20)
            assert not thread.is_alive(), "a load thread did not end"
        return time.monotonic() - self.started


def wait_answers(load: Load, count: int) -> None:
    """Every load thread answers ``count`` more queries/requests from now on."""
    deadline = time.monotonic() + 90
    with load._lock:
        before = dict(load.answered)
    kinds = ("udp-1", "udp-2", "tcp-1", "tcp-2", "metadata")
    while time.monotonic() < deadline:
        with load._lock:
            if all(load.answered.get(k, 0) >= before.get(k, 0) + count for k in kinds):
                return
            assert not load.failures, load.failures[:10]
        time.sleep(0.05)
    raise AssertionError(f"load not answered: {load.answered}, failures {load.failures[:5]}")


class NotifySocket:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET: collects each message's
    fields and the descriptors that came with it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[dict[str, str], list[int]]] = []

    def receive(self, timeout: float) -> tuple[dict[str, str], list[int]] | None:
        self.sock.settimeout(timeout)
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 16)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append((fields, fds))
        return fields, fds

    def wait_for(self, key: str, value: str, timeout: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.receive(max(0.01, deadline - time.monotonic()))
            if got is not None and got[0].get(key) == value:
                return got[0]
        raise AssertionError(f"no {key}={value} in {[m for m, _ in self.messages]}")

    def close(self) -> None:
        for _fields, fds in self.messages:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(tmp_path / "notify.sock")
    yield receiver
    receiver.close()


@dataclass
class Pair:
    """Settings two instances share: the same ports, the same runtime directory."""

    tmp_path: Path
    runtime_dir: Path
    """Short: a unix socket path has at most 107 bytes, pytest's tmp_path is long."""
    dns_port: int = field(default_factory=free_port)
    metadata_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    started: list[DaemonProcess] = field(default_factory=list)

    def args(self) -> list[str]:
        return [
            "--snapshot",
            str(DEMO_SNAPSHOT),
            "--metadata-listen",
            f"127.0.0.1:{self.metadata_port}",
            "--upstream",
            "127.0.0.1:1",
        ]

    def env(self, **extra: str) -> dict[str, str]:
        return {"NODE_SERVICES_RUNTIME_DIR": str(self.runtime_dir), **extra}

    def systemd_start(
        self,
        fds: dict[str, int] | list[tuple[str, int]],
        log_path: Path,
        dns_listen: list[str] | None = None,
        **env: str,
    ) -> subprocess.Popen[bytes]:
        """An instance started as systemd starts a unit with stored sockets: ``fds`` (name,
        descriptor) from 3 on under LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID (see WRAPPER),
        no lame-duck grace."""
        named = list(fds.items()) if isinstance(fds, dict) else fds
        environment = {
            k: v for k, v in os.environ.items() if not k.startswith(("NODE_SERVICES_", "LISTEN_"))
        }
        environment.update(
            self.env(
                NODE_SERVICES_SHUTDOWN_GRACE="0",
                LISTEN_FDNAMES=":".join(name for name, _ in named),
                **env,
            )
        )
        listen = dns_listen or [f"127.0.0.1:{self.dns_port}"]
        command = [
            *(sys.executable, "-c", WRAPPER, *(str(fd) for _, fd in named), "--"),
            *(sys.executable, "-m", "node_services", "run", "--node-name", "node-a"),
            *(arg for address in listen for arg in ("--dns-listen", address)),
            *("--admin-listen", f"127.0.0.1:{self.admin_port}", *self.args()),
        ]
        with log_path.open("wb") as log:
            return subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                pass_fds=[fd for _, fd in named],
                cwd=ROOT,
            )

    def instance(self, **env: str) -> DaemonProcess:
        process = DaemonProcess(
            self.args(),
            self.tmp_path / f"instance-{len(self.started) + 1}.log",
            env=self.env(**env),
            admin_port=self.admin_port,
            dns_port=self.dns_port,
        )
        self.started.append(process)
        return process

    def first(self, **env: str) -> DaemonProcess:
        """Start instance 1, on new ports when a port free_port gave was taken meanwhile (an
        ephemeral port of another test's client: this machine runs several suites)."""
        for attempt in range(3):
            process = self.instance(**env)
            try:
                return process.start()
            except AssertionError as exc:
                if "already in use" not in str(exc).lower() or attempt == 2:
                    raise
            process.stop()
            self.started.remove(process)
            self.dns_port, self.metadata_port, self.admin_port = (free_port() for _ in "dma")
        raise AssertionError("unreachable")

    def stop(self) -> None:
        for process in self.started:
            if process.proc is not None:
                process.stop()
                print(f"--- {process.log_path.name}\n{process.output()}")  # shown on failure


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    runtime_dir = Path(tempfile.mkdtemp(prefix="ns-ho-", dir="/tmp"))
    both = Pair(tmp_path, runtime_dir)
    yield both
    both.stop()
    shutil.rmtree(runtime_dir, ignore_errors=True)


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def test_a_second_instance_takes_over_the_sockets_without_losing_a_query(
    pair: Pair, notify_socket: NotifySocket
) -> None:
    first = pair.first()
    first.wait_for(lambda: readyz(pair.admin_port)[0] == 200, what="instance 1 ready")
    load = Load(pair.dns_port, pair.metadata_port)
    load.start()
    try:
        wait_answers(load, 20)  # instance 1 answers the load
        second = pair.instance(NOTIFY_SOCKET=str(notify_socket.path)).start()
        assert second.proc is not None and first.proc is not None
        ready = notify_socket.wait_for("READY", "1")
        assert ready["MAINPID"] == str(second.proc.pid)
        assert "handed over by pid" in ready["STATUS"], ready
        with contextlib.suppress(ProcessLookupError):
            first.proc.send_signal(signal.SIGTERM)  # it may be leaving already
        assert first.proc.wait(timeout=60) == 0, first.output()
        gone_at = time.monotonic()
        wait_answers(load, 20)  # instance 2 alone answers the load
        seconds = load.finish()
    finally:
        load.stop.set()
    assert load.failures == [], load.failures[:20]
    assert all(at > gone_at for at in load.last_answer.values())
    dns_total = sum(v for k, v in load.answered.items() if k != "metadata")
    print(
        f"{dns_total} DNS queries in {seconds:.1f} s ({dns_total / seconds:.0f}/s), "
        f"{load.answered['metadata']} metadata requests, 0 lost, slowest {load.slowest:.3f} s"
    )
    assert second.proc.poll() is None, second.output()
    assert readyz(pair.admin_port) == (200, "ok\n")
    assert second.metric('node_services_handovers_total{result="taken"}') == "1.0"
    log = first.output()
    assert f"hand-over: pid {second.proc.pid} serves on our listeners" in log, log
    assert "Traceback" not in log and "Traceback" not in second.output()


def test_a_long_poll_is_answered_with_the_current_version_at_hand_over(
    pair: Pair, notify_socket: NotifySocket
) -> None:
    first = pair.first()
    first.wait_for(lambda: readyz(pair.admin_port)[0] == 200, what="instance 1 ready")
    base = f"http://127.0.0.1:{pair.metadata_port}/latest"
    with urllib.request.urlopen(f"{base}/version", timeout=10) as response:
        version = response.read().decode()
    answers: list[tuple[int, str, float]] = []

    def poll() -> None:
        url = f"{base}/version?wait=true&value={version}&maxWait=120"
        with urllib.request.urlopen(url, timeout=150) as response:
            answers.append((response.status, response.read().decode(), time.monotonic()))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    first.wait_for(
        lambda: first.metric("node_services_metadata_waiters") == "1.0", what="a parked poll"
    )
    second = pair.instance(NOTIFY_SOCKET=str(notify_socket.path)).start()
    notify_socket.wait_for("READY", "1")
    assert first.proc is not None and first.proc.wait(timeout=60) == 0, first.output()
    poller.join(timeout=60)
    assert answers and answers[0][:2] == (200, version)  # answered, not cut off
    assert second.proc is not None and second.proc.poll() is None


WRAPPER = """
import fcntl, os, sys
# systemd's way: the stored descriptors from 3 on, LISTEN_PID our own pid.
split = sys.argv.index("--")
fds = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for fd in sys.argv[1:split]]
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[split + 1], sys.argv[split + 1 :])
"""


def test_systemd_restart_keeps_the_sockets_in_the_fd_store(
    pair: Pair, notify_socket: NotifySocket, tmp_path: Path
) -> None:
    # No systemd runs as PID 1 here: the test is the service manager. It keeps what
    # FDSTORE=1 sends, stops the unit (SIGTERM, lame duck), starts it again with them.
    first = pair.first(NOTIFY_SOCKET=str(notify_socket.path), NODE_SERVICES_SHUTDOWN_GRACE="1")
    notify_socket.wait_for("READY", "1")
    stored: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(stored) < 4 and time.monotonic() < deadline:
        got = notify_socket.receive(1)
        if got is not None and got[0].get("FDSTORE") == "1":
            (fd,) = got[1]
            stored[got[0]["FDNAME"]] = fd
    assert sorted(stored) == ["admin", "dns-tcp", "dns-udp", "metadata"]
    with socket.socket(fileno=os.dup(stored["dns-udp"])) as probe:
        assert probe.type == socket.SOCK_DGRAM

    load = Load(pair.dns_port, pair.metadata_port)
    load.start()
    second: subprocess.Popen[bytes] | None = None
    log_path = tmp_path / "restarted.log"
    try:
        wait_answers(load, 20)
        assert first.proc is not None
        first.proc.send_signal(signal.SIGTERM)  # systemctl restart: stop ...
        assert first.proc.wait(timeout=60) == 0, first.output()
        assert "lame duck" in first.output()
        # ... and start, with the stored sockets
        second = pair.systemd_start({name: stored[name] for name in sorted(stored)}, log_path)
        wait_answers(load, 20)
        seconds = load.finish()
    finally:
        load.stop.set()
        if second is not None:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(timeout=20)
            except subprocess.TimeoutExpired:
                second.kill()
                second.wait()
    output = log_path.read_text()
    assert load.failures == [], load.failures[:20]
    dns_total = sum(v for k, v in load.answered.items() if k != "metadata")
    print(
        f"restart: {dns_total} DNS queries in {seconds:.1f} s ({dns_total / seconds:.0f}/s), "
        f"{load.answered['metadata']} metadata requests, 0 lost, slowest {load.slowest:.3f} s"
    )
    assert "from systemd" in output, output
    assert second.returncode == 0, output
    assert "Traceback" not in output


def test_a_successor_that_goes_away_before_serving_leaves_the_old_one_serving(
    pair: Pair,
) -> None:
    first = pair.first()
    first.wait_for(lambda: readyz(pair.admin_port)[0] == 200, what="instance 1 ready")
    (path,) = pair.runtime_dir.glob("handover-*.sock")
    assert path.name.endswith(f"-127.0.0.1-{pair.dns_port}.sock")
    # The test speaks the protocol as a successor would, and leaves before saying it serves.
    ask = {
        "pid": os.getpid(),
        "listeners": {
            "dns-udp": f"127.0.0.1:{pair.dns_port}",
            "dns-tcp": f"127.0.0.1:{pair.dns_port}",
            "metadata": f"127.0.0.1:{pair.metadata_port}",
            "admin": "127.0.0.1:1",  # not where it listens: not passed
        },
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(path))
        conn.sendall(json.dumps(ask).encode() + b"\n")
        data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 16)
        reply = json.loads(data)
        assert first.proc is not None
        assert reply == {"pid": first.proc.pid, "listeners": ["dns-udp", "dns-tcp", "metadata"]}
        got = [socket.socket(fileno=fd) for fd in fds]
        try:
            assert [(s.type, s.getsockname()) for s in got] == [
                (socket.SOCK_DGRAM, ("127.0.0.1", pair.dns_port)),
                (socket.SOCK_STREAM, ("127.0.0.1", pair.dns_port)),
                (socket.SOCK_STREAM, ("127.0.0.1", pair.metadata_port)),
            ]
        finally:
            for sock in got:
                sock.close()
    first.wait_for(
        lambda: first.metric('node_services_handovers_total{result="failed"}') == "1.0",
        what="the failed hand-over counted",
    )
    assert "failed, serving on: the peer closed the connection" in first.output()
    response = dns.query.udp(
        dns.message.make_query(NAME, dns.rdatatype.A), "127.0.0.1", port=pair.dns_port, timeout=30
    )
    assert [rr.to_text() for rrset in response.answer for rr in rrset] == [ADDRESS]
    assert readyz(pair.admin_port) == (200, "ok\n")
    assert path.exists()  # still offered to the next successor


def test_a_stored_socket_at_an_address_the_settings_no_longer_name_is_not_used(
    pair: Pair, tmp_path: Path
) -> None:
    # The settings changed the DNS port since systemd stored the sockets.
    old = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    old.bind(("127.0.0.1", free_port()))
    log_path = tmp_path / "started.log"
    started = pair.systemd_start({"dns-udp": old.fileno()}, log_path)
    old.close()
    try:
        deadline = time.monotonic() + 60
        while readyz(pair.admin_port)[0] != 200:
            assert started.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        response = dns.query.udp(
            dns.message.make_query(NAME, dns.rdatatype.A),
            "127.0.0.1",
            port=pair.dns_port,
            timeout=30,
        )
        assert [rr.to_text() for rrset in response.answer for rr in rrset] == [ADDRESS]
    finally:
        started.send_signal(signal.SIGTERM)
        try:
            started.wait(timeout=20)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait()
    output = log_path.read_text()
    assert "systemd passed dns-udp socket" in output and "not what the settings say" in output
    assert f"dns listening on 127.0.0.1:{pair.dns_port} (udp, tcp)" in output
    assert started.returncode == 0, output


def test_a_stale_stored_copy_is_removed_from_the_store_and_the_matching_copy_kept(
    pair: Pair, notify_socket: NotifySocket, tmp_path: Path
) -> None:
    # systemd's store holds two dns-udp copies: one at an address the settings no longer
    # name (first), one where they say (second). The daemon serves on the second and tells
    # systemd to drop the name before storing its socket again.
    old = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    old.bind(("127.0.0.1", free_port()))
    current = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    current.bind(("127.0.0.1", pair.dns_port))
    tcp = handover.bind_tcp("127.0.0.1", pair.dns_port, 16)
    log_path = tmp_path / "started.log"
    fds = [("dns-udp", old.fileno()), ("dns-udp", current.fileno()), ("dns-tcp", tcp.fileno())]
    started = pair.systemd_start(fds, log_path, NOTIFY_SOCKET=str(notify_socket.path))
    old.close()
    current.close()
    tcp.close()
    try:
        notify_socket.wait_for("READY", "1")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stores = [m for m, _ in notify_socket.messages if m.get("FDSTORE") == "1"]
            if len(stores) == 4:
                break
            notify_socket.receive(1)
        response = dns.query.udp(
            dns.message.make_query(NAME, dns.rdatatype.A),
            "127.0.0.1",
            port=pair.dns_port,
            timeout=30,
        )
        assert [rr.to_text() for rrset in response.answer for rr in rrset] == [ADDRESS]
    finally:
        started.send_signal(signal.SIGTERM)
        try:
            started.wait(timeout=20)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait()
    output = log_path.read_text()
    messages = [m for m, _ in notify_socket.messages]
    store_lines = [
        (key, m["FDNAME"]) for m in messages for key in ("FDSTOREREMOVE", "FDSTORE") if key in m
    ]
    # The stale copy's name is removed at start (before READY), then every name is removed
    # right before its socket is stored again.
    ready_at = next(i for i, m in enumerate(messages) if m.get("READY") == "1")
    assert [m.get("FDNAME") for m in messages[:ready_at] if "FDSTOREREMOVE" in m] == ["dns-udp"]
    assert store_lines[1:] == [
        (key, name)
        for name in ("admin", "dns-udp", "dns-tcp", "metadata")
        for key in ("FDSTOREREMOVE", "FDSTORE")
    ], store_lines
    assert "systemd passed dns-udp socket" in output and "not what the settings say" in output
    assert "serving on ['dns-tcp', 'dns-udp'] from systemd" in output, output
    assert started.returncode == 0, output


def _ask(pair: Pair) -> bytes:
    listeners = {"dns-udp": f"127.0.0.1:{pair.dns_port}", "dns-tcp": f"127.0.0.1:{pair.dns_port}"}
    return json.dumps({"pid": os.getpid(), "listeners": listeners}).encode() + b"\n"


def test_a_second_successor_asking_during_an_exchange_is_refused(pair: Pair) -> None:
    first = pair.first()
    first.wait_for(lambda: readyz(pair.admin_port)[0] == 200, what="instance 1 ready")
    assert first.proc is not None
    (path,) = pair.runtime_dir.glob("handover-*.sock")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as one,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as two,
    ):
        one.settimeout(30)
        two.settimeout(30)
        one.connect(str(path))
        one.sendall(_ask(pair))
        data, fds, _flags, _addr = socket.recv_fds(one, 65536, 16)
        for fd in fds:
            os.close(fd)
        assert json.loads(data) == {"pid": first.proc.pid, "listeners": ["dns-udp", "dns-tcp"]}
        two.connect(str(path))
        two.sendall(_ask(pair))
        data, fds, _flags, _addr = socket.recv_fds(two, 65536, 16)
        assert (json.loads(data), fds) == (
            {"pid": first.proc.pid, "listeners": [], "refused": "busy"},
            [],
        )
    first.wait_for(
        lambda: first.metric('node_services_handovers_total{result="failed"}') == "2.0",
        what="the refusal and the abandoned exchange counted",
    )
    assert "asks while another successor takes over: refused" in first.output()
    # Once the first exchange is over, the next successor gets the sockets again.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as three:
        three.settimeout(30)
        three.connect(str(path))
        three.sendall(_ask(pair))
        data, fds, _flags, _addr = socket.recv_fds(three, 65536, 16)
        for fd in fds:
            os.close(fd)
        assert (json.loads(data)["listeners"], len(fds)) == (["dns-udp", "dns-tcp"], 2)
    assert readyz(pair.admin_port) == (200, "ok\n")


def test_a_successor_not_released_by_its_predecessor_exits_1_and_leaves_its_socket(
    pair: Pair, tmp_path: Path
) -> None:
    # The test is the predecessor: it passes its sockets, hears "serving", and never says
    # "released" (as one does that gave up waiting and serves on).
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", pair.dns_port))
    tcp = handover.bind_tcp("127.0.0.1", pair.dns_port, 16)
    path = handover.socket_path(pair.runtime_dir, "127.0.0.1", pair.dns_port)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(60)
    inode = os.stat(path).st_ino
    heard: list[dict[str, object]] = []

    def predecessor() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as lines:
            conn.settimeout(60)
            heard.append(json.loads(lines.readline()))  # preparing
            heard.append(json.loads(lines.readline()))  # the request
            header = json.dumps({"pid": os.getpid(), "listeners": ["dns-udp", "dns-tcp"]})
            socket.send_fds(conn, [header.encode() + b"\n"], [udp.fileno(), tcp.fileno()])
            heard.append(json.loads(lines.readline()))

    thread = threading.Thread(target=predecessor, daemon=True)
    thread.start()
    log_path = tmp_path / "successor.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_SERVICES_", "LISTEN_"))}
    env.update(pair.env(NODE_SERVICES_SHUTDOWN_GRACE="0"))
    command = [
        *(sys.executable, "-m", "node_services", "run", "--node-name", "node-a"),
        *("--dns-listen", f"127.0.0.1:{pair.dns_port}"),
        *("--admin-listen", f"127.0.0.1:{pair.admin_port}", *pair.args()),
    ]
    try:
        with log_path.open("wb") as log:
            started = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        try:
            code = started.wait(timeout=120)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait()
            raise
        thread.join(timeout=60)
        output = log_path.read_text()
        assert code == 1, output
        assert heard[0] == {"pid": heard[1]["pid"], "preparing": True}, heard
        assert heard[2] == {"serving": True}, heard
        assert f"hand-over: pid {os.getpid()} did not release its listeners" in output
        assert "not serving on them" in output
        assert os.stat(path).st_ino == inode  # still the predecessor's socket file
        # The predecessor's sockets still work: it serves on.
        udp.sendto(b"x", ("127.0.0.1", pair.dns_port))
        udp.settimeout(10)
        assert udp.recv(16) == b"x"
    finally:
        server.close()
        udp.close()
        tcp.close()


def test_a_runtime_directory_others_may_write_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = Path(tempfile.mkdtemp(prefix="ns-ho-", dir="/tmp"))
    try:
        shared.chmod(0o777)
        path = shared / "handover-test.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as planted:
            planted.bind(str(path))  # a live socket someone else could have put there
            planted.listen(1)
            assert asyncio.run(handover.find_predecessor(path)) is None
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                server = handover.HandoverServer(
                    path, handover.Listeners({"dns-udp": udp}), {}, lambda pid: None
                )
                assert asyncio.run(_start(server)) is False
        assert f"runtime directory {shared}: mode 777 lets others write" in caplog.text
        assert path.exists()  # not replaced
    finally:
        shutil.rmtree(shared, ignore_errors=True)


async def _start(server: handover.HandoverServer) -> bool:
    started = server.start()
    await server.close()
    return started


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to listen as another uid")
def test_a_predecessor_socket_of_another_uid_is_not_trusted(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    path = pair.runtime_dir / "handover-test.sock"
    script = (
        "import os, socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o666)\n"
        "os.setuid(65534)\n"
        "s.listen(4); print('listening', flush=True)\n"
        "time.sleep(60)\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout is not None
        assert other.stdout.readline() == "listening\n"
        assert asyncio.run(handover.find_predecessor(path)) is None
        assert f"hand-over: {path} is served by another uid" in caplog.text
    finally:
        other.kill()
        other.wait()


def test_a_descriptor_that_is_no_socket_closes_every_passed_one_exactly_once() -> None:
    first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    read_end, write_end = os.pipe()
    last = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fds = [first.detach(), read_end, last.detach()]
    try:
        with pytest.raises(OSError):
            handover._wrap(["dns-udp", "dns-tcp", "metadata"], fds)
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)  # closed
        # The lowest number is reused at once: nothing may close it behind our back.
        reused = os.open("/dev/null", os.O_RDONLY)
        try:
            gc.collect()
            os.fstat(reused)
        finally:
            os.close(reused)
    finally:
        os.close(write_end)


def test_descriptors_the_kernel_truncated_fail_the_take() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        names = [f"l{i}" for i in range(handover.MAX_FDS + 4)]  # more than a take receives
        header = json.dumps({"pid": 1, "listeners": names}).encode() + b"\n"
        socket.send_fds(theirs, [header], [udp.fileno()] * len(names))
        predecessor = handover.Predecessor(Path("/nonexistent"), ours)
        with pytest.raises(handover.HandoverError, match=r"descriptors truncated \(MSG_CTRUNC\)"):
            asyncio.run(predecessor.take({"dns-udp": "127.0.0.1:53"}))


def test_an_idle_connection_does_not_stretch_the_lame_duck(pair: Pair) -> None:
    first = pair.first(NODE_SERVICES_SHUTDOWN_GRACE="1")
    first.wait_for(lambda: readyz(pair.admin_port)[0] == 200, what="instance 1 ready")
    (path,) = pair.runtime_dir.glob("handover-*.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(str(path))  # says nothing: not a successor
        time.sleep(0.5)
        assert first.proc is not None
        first.proc.send_signal(signal.SIGTERM)
        # 1 s of lame duck, not 1 + 150 s waiting for a successor that never asks.
        assert first.proc.wait(timeout=60) == 0, first.output()
    assert "lame duck: /readyz fails, serving 1s more" in first.output()
    assert "a successor is preparing" not in first.output()


def test_a_passed_socket_at_another_address_than_the_settings_is_not_served_on(
    pair: Pair, tmp_path: Path
) -> None:
    # The test is a predecessor that passes a dns-udp socket on another port than asked.
    wrong = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wrong.bind(("127.0.0.1", free_port()))
    tcp = handover.bind_tcp("127.0.0.1", pair.dns_port, 16)
    path = handover.socket_path(pair.runtime_dir, "127.0.0.1", pair.dns_port)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(60)

    def predecessor() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as lines:
            conn.settimeout(60)
            lines.readline()  # preparing
            lines.readline()  # the request
            header = json.dumps({"pid": os.getpid(), "listeners": ["dns-udp", "dns-tcp"]})
            socket.send_fds(conn, [header.encode() + b"\n"], [wrong.fileno(), tcp.fileno()])
            wrong.close()
            tcp.close()
            lines.readline()  # serving
            conn.sendall(b'{"released": true}\n')

    thread = threading.Thread(target=predecessor, daemon=True)
    thread.start()
    log_path = tmp_path / "successor.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_SERVICES_", "LISTEN_"))}
    env.update(pair.env(NODE_SERVICES_SHUTDOWN_GRACE="0"))
    command = [
        *(sys.executable, "-m", "node_services", "run", "--node-name", "node-a"),
        *("--dns-listen", f"127.0.0.1:{pair.dns_port}"),
        *("--admin-listen", f"127.0.0.1:{pair.admin_port}", *pair.args()),
    ]
    with log_path.open("wb") as log:
        started = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while readyz(pair.admin_port)[0] != 200:
            assert started.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        response = dns.query.udp(
            dns.message.make_query(NAME, dns.rdatatype.A),
            "127.0.0.1",
            port=pair.dns_port,
            timeout=30,
        )
        assert [rr.to_text() for rrset in response.answer for rr in rrset] == [ADDRESS]
    finally:
        started.send_signal(signal.SIGTERM)
        try:
            started.wait(timeout=20)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait()
        server.close()
        thread.join(timeout=10)
    output = log_path.read_text()
    assert f"pid {os.getpid()} passed dns-udp socket" in output, output
    assert "not what the settings say, closed" in output
    assert f"dns listening on 127.0.0.1:{pair.dns_port} (udp, tcp)" in output
    assert started.returncode == 0, output


# -- several DNS listen addresses (dns_listen as a list) ---------------------------------------


def listening(*dns_listen: str) -> list[str]:
    """Flags for DNS addresses beyond DaemonProcess's own first one (127.0.0.1:<dns_port>)."""
    return [arg for address in dns_listen for arg in ("--dns-listen", address)]


def instance_on(pair: Pair, dns_listen: list[str], **env: str) -> DaemonProcess:
    """An instance of the pair that also serves DNS on ``dns_listen``."""
    process = DaemonProcess(
        [*pair.args(), *listening(*dns_listen)],
        pair.tmp_path / f"instance-{len(pair.started) + 1}.log",
        env=pair.env(**env),
        admin_port=pair.admin_port,
        dns_port=pair.dns_port,
    )
    pair.started.append(process)
    return process


def answer_at(host: str, port: int, *, tcp: bool = False) -> list[str]:
    query = dns.message.make_query(NAME, dns.rdatatype.A)
    ask = dns.query.tcp if tcp else dns.query.udp
    response = ask(query, host, port=port, timeout=30)
    return [rr.to_text() for rrset in response.answer for rr in rrset]


def closed(host: str, port: int) -> bool:
    """Nothing listens there any more: both UDP and TCP can be bound."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
    ):
        try:
            udp.bind((host, port))
            tcp.bind((host, port))
        except OSError:
            return False
    return True


def test_a_successor_takes_over_every_dns_address_without_losing_a_query(pair: Pair) -> None:
    second_port = free_port("127.0.0.3")
    extra = [f"127.0.0.3:{second_port}"]
    first = instance_on(pair, extra).start()
    first.wait_for(lambda: readyz(pair.admin_port)[0] == 200, what="instance 1 ready")
    loads = [
        Load(pair.dns_port, pair.metadata_port, rate=30),
        Load(second_port, pair.metadata_port, rate=30, host="127.0.0.3"),
    ]
    for load in loads:
        load.start()
    try:
        for load in loads:
            wait_answers(load, 10)  # instance 1 answers on both addresses
        second = instance_on(pair, extra).start()
        assert second.proc is not None and first.proc is not None
        second.wait_for(
            lambda: "node-services running" in second.output(), what="instance 2 serving"
        )
        with contextlib.suppress(ProcessLookupError):
            first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=60) == 0, first.output()
        gone_at = time.monotonic()
        for load in loads:
            wait_answers(load, 10)  # instance 2 alone answers on both
        for load in loads:
            load.finish()
    finally:
        for load in loads:
            load.stop.set()
    for load in loads:
        assert load.failures == [], (load.host, load.failures[:20])
        assert all(at > gone_at for at in load.last_answer.values()), load.host
    names = ["dns-udp", "dns-tcp", "dns-udp-2", "dns-tcp-2", "metadata", "admin"]
    assert (
        f"hand-over: pid {second.proc.pid} asks for the listeners; passing {names}"
        in first.output()
    )
    log = second.output()
    assert f"serving on {sorted(names)} from handed over by pid {first.proc.pid}" in log, log
    for host, port in (("127.0.0.1", pair.dns_port), ("127.0.0.3", second_port)):
        for proto in ("udp", "tcp"):
            line = f'node_services_dns_listening{{listener="{host}:{port}",proto="{proto}"}}'
            assert second.metric(line) == "1.0"
    assert "Traceback" not in first.output() and "Traceback" not in log


def test_an_address_added_moved_or_removed_between_instances_is_opened_kept_or_closed(
    pair: Pair,
) -> None:
    # Instance 1: A (127.0.0.1), B, C. Instance 2: A, D, B: B moves from the second place
    # to the third (dns-udp-2 -> dns-udp-3: matched by address, not name), C is gone, D new.
    b = f"127.0.0.3:{free_port('127.0.0.3')}"
    c_port = free_port("127.0.0.4")
    c = f"127.0.0.4:{c_port}"
    d_port = free_port("127.0.0.5")
    d = f"127.0.0.5:{d_port}"
    b_port = int(b.rsplit(":", 1)[1])
    first = instance_on(pair, [b, c]).start()
    first.wait_for(lambda: readyz(pair.admin_port)[0] == 200, what="instance 1 ready")
    assert answer_at("127.0.0.4", c_port) == [ADDRESS]
    load = Load(b_port, pair.metadata_port, rate=30, host="127.0.0.3")
    load.start()
    try:
        wait_answers(load, 10)
        second = instance_on(pair, [d, b]).start()
        assert second.proc is not None and first.proc is not None
        second.wait_for(
            lambda: "node-services running" in second.output(), what="instance 2 serving"
        )
        with contextlib.suppress(ProcessLookupError):
            first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=60) == 0, first.output()
        gone_at = time.monotonic()
        wait_answers(load, 10)  # B, moved, answered by instance 2 alone
        load.finish()
    finally:
        load.stop.set()
    assert load.failures == [], load.failures[:20]
    assert all(at > gone_at for at in load.last_answer.values())
    for tcp in (False, True):
        assert answer_at("127.0.0.1", pair.dns_port, tcp=tcp) == [ADDRESS]
        assert answer_at("127.0.0.5", d_port, tcp=tcp) == [ADDRESS]  # D: bound by instance 2
    assert closed("127.0.0.4", c_port)  # C: closed with instance 1
    passed = ["dns-udp", "dns-tcp", "dns-udp-3", "dns-tcp-3", "metadata", "admin"]
    assert f"asks for the listeners; passing {passed}" in first.output(), first.output()
    log = second.output()
    assert f"serving on {sorted(passed)} from handed over by pid {first.proc.pid}" in log, log
    assert f"dns listening on {d} (udp, tcp): listeners dns-udp-2, dns-tcp-2" in log
    assert f"dns listening on {b} (udp, tcp): listeners dns-udp-3, dns-tcp-3" in log
    assert "not what the settings say" not in log
    assert second.proc.poll() is None, log


def test_a_successor_with_its_dns_addresses_in_another_order_takes_over(pair: Pair) -> None:
    # Instance 1: A (127.0.0.1), B. Instance 2: B, A: its own hand-over path is B's, its
    # predecessor's is A's; it looks at both, takes every socket and loses no query.
    b_port = free_port("127.0.0.3")
    b = f"127.0.0.3:{b_port}"
    first = instance_on(pair, [b]).start()
    first.wait_for(lambda: readyz(pair.admin_port)[0] == 200, what="instance 1 ready")
    load = Load(pair.dns_port, pair.metadata_port, rate=30)
    load.start()
    try:
        wait_answers(load, 10)
        second = DaemonProcess(
            [*pair.args(), *listening(b, f"127.0.0.1:{pair.dns_port}")],
            pair.tmp_path / f"instance-{len(pair.started) + 1}.log",
            env=pair.env(),
            admin_port=pair.admin_port,
            dns_port=pair.dns_port,
            own_dns=False,
        )
        pair.started.append(second)
        second.start()
        assert second.proc is not None and first.proc is not None
        second.wait_for(
            lambda: "node-services running" in second.output(), what="instance 2 serving"
        )
        with contextlib.suppress(ProcessLookupError):
            first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=60) == 0, first.output()
        gone_at = time.monotonic()
        wait_answers(load, 10)
        load.finish()
    finally:
        load.stop.set()
    assert load.failures == [], load.failures[:20]
    assert all(at > gone_at for at in load.last_answer.values())
    log = second.output()
    assert f"from handed over by pid {first.proc.pid}" in log, log
    for tcp in (False, True):
        assert answer_at("127.0.0.1", pair.dns_port, tcp=tcp) == [ADDRESS]
        assert answer_at("127.0.0.3", b_port, tcp=tcp) == [ADDRESS]
    assert second.proc.poll() is None, log


def test_systemd_restart_keeps_every_dns_address_when_their_order_changes(
    pair: Pair, notify_socket: NotifySocket, tmp_path: Path
) -> None:
    # Instance 1 listens on A (127.0.0.1) then B and stores six sockets; it is restarted
    # with B then A: each stored socket is served under its new name, none rebound.
    b_port = free_port("127.0.0.3")
    b = f"127.0.0.3:{b_port}"
    a = f"127.0.0.1:{pair.dns_port}"
    first = instance_on(
        pair, [b], NOTIFY_SOCKET=str(notify_socket.path), NODE_SERVICES_SHUTDOWN_GRACE="1"
    ).start()
    notify_socket.wait_for("READY", "1")
    stored: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(stored) < 6 and time.monotonic() < deadline:
        got = notify_socket.receive(1)
        if got is not None and got[0].get("FDSTORE") == "1":
            (fd,) = got[1]
            stored[got[0]["FDNAME"]] = fd
    names = sorted(stored)
    assert names == ["admin", "dns-tcp", "dns-tcp-2", "dns-udp", "dns-udp-2", "metadata"]
    loads = [
        Load(pair.dns_port, pair.metadata_port, rate=30),
        Load(b_port, pair.metadata_port, rate=30, host="127.0.0.3"),
    ]
    for load in loads:
        load.start()
    second: subprocess.Popen[bytes] | None = None
    log_path = tmp_path / "restarted.log"
    # The manager reads every notification at once (13 datagrams at READY with two DNS
    # addresses; a unix datagram queue holds 10): so does the test, in a thread.
    reading = threading.Event()

    def read() -> None:
        while not reading.is_set():
            notify_socket.receive(0.2)

    reader = threading.Thread(target=read, daemon=True)
    try:
        for load in loads:
            wait_answers(load, 10)
        assert first.proc is not None
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=60) == 0, first.output()
        seen = len(notify_socket.messages)
        reader.start()
        second = pair.systemd_start(
            [(name, stored[name]) for name in names],
            log_path,
            [b, a],
            NOTIFY_SOCKET=str(notify_socket.path),
        )
        for load in loads:
            wait_answers(load, 10)
        deadline = time.monotonic() + 60
        while not any(m.get("READY") == "1" for m, _ in notify_socket.messages[seen:]):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        for load in loads:
            load.finish()
    finally:
        reading.set()
        if reader.is_alive():
            reader.join(timeout=10)
        for load in loads:
            load.stop.set()
        if second is not None:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(timeout=20)
            except subprocess.TimeoutExpired:
                second.kill()
                second.wait()
    output = log_path.read_text()
    for load in loads:
        assert load.failures == [], (load.host, load.failures[:20])
    assert "from systemd" in output, output
    for old, new in (("dns-udp-2", "dns-udp"), ("dns-udp", "dns-udp-2")):
        assert f"systemd passed {old} socket" in output and f"serving it as {new}" in output
    assert f"dns listening on {b} (udp, tcp): listeners dns-udp, dns-tcp" in output
    assert f"dns listening on {a} (udp, tcp): listeners dns-udp-2, dns-tcp-2" in output
    # systemd's copies under the old names are dropped before READY (stored again after).
    later = [m for m, _ in notify_socket.messages[seen:]]
    ready_at = next(i for i, m in enumerate(later) if m.get("READY") == "1")
    removed = [m["FDNAME"] for m in later[:ready_at] if "FDSTOREREMOVE" in m]
    assert removed == ["dns-tcp", "dns-tcp-2", "dns-udp", "dns-udp-2"], later
    assert second.returncode == 0, output
    assert "Traceback" not in output


def test_a_store_too_small_for_every_listener_is_named_at_ready(
    pair: Pair, notify_socket: NotifySocket
) -> None:
    b = f"127.0.0.3:{free_port('127.0.0.3')}"
    first = instance_on(pair, [b], NOTIFY_SOCKET=str(notify_socket.path), FDSTORE="4").start()
    notify_socket.wait_for("READY", "1")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len([m for m, _ in notify_socket.messages if m.get("FDSTORE") == "1"]) == 6:
            break
        notify_socket.receive(1)
    first.wait_for(lambda: "FileDescriptorStoreMax" in first.output(), what="the warning")
    assert (
        "systemd keeps 4 descriptors (FileDescriptorStoreMax=) and there are 6 listeners "
        "(admin, dns-udp, dns-tcp, dns-udp-2, dns-tcp-2, metadata): set "
        "FileDescriptorStoreMax=6 or more, or a restart binds the rest anew and loses the "
        "queries sent meanwhile"
    ) in first.output()


def test_a_take_receives_every_listener_of_the_most_dns_addresses_allowed() -> None:
    from node_services.config import MAX_DNS_LISTEN

    assert 2 * MAX_DNS_LISTEN + 2 <= handover.MAX_FDS
