"""systemd's notify protocol on a real datagram socket: READY / RELOADING + MONOTONIC_USEC /
READY / STOPPING from a running daemon, watchdog pings at half WATCHDOG_USEC and none from a
stalled event loop or with a dead task; the lame duck on SIGTERM."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dnshelpers import dig_short
from helpers import DEMO_SNAPSHOT, DaemonProcess, free_port, http_get

from node_services import sdnotify

Start = Callable[..., DaemonProcess]


class Receiver:
    """The service manager's end: a bound datagram socket, messages with arrival times."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 16)
        except TimeoutError:
            return None
        for fd in fds:
            os.close(fd)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append((time.monotonic(), fields))
        return fields

    def pending(self) -> list[dict[str, str]]:
        """Every message already queued, without waiting."""
        got = []
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    data = self.sock.recv(65536)
                except BlockingIOError:
                    return got
                got.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        finally:
            self.sock.setblocking(True)

    def wait_for(self, key: str, timeout: float = 60) -> dict[str, str]:
        """The next message with ``key`` (the ones before it are kept in :attr:`messages`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.receive(max(0.01, deadline - time.monotonic()))
            if fields is not None and key in fields:
                return fields
        raise AssertionError(f"no {key} in {[m for _, m in self.messages]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    got = Receiver(str(tmp_path / "notify.sock"))
    yield got
    got.close()


def test_the_daemon_notifies_ready_reloading_ready_stopping_and_pings_the_watchdog(
    daemon: Start, receiver: Receiver, tmp_path: Path
) -> None:
    snapshot = tmp_path / "snapshot.yaml"
    snapshot.write_bytes(DEMO_SNAPSHOT.read_bytes())
    node = daemon(
        "--snapshot",
        str(snapshot),
        "--upstream",
        "127.0.0.1:1",
        env={
            "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
            "WATCHDOG_USEC": "400000",  # a ping every 0.2 s
            "NODE_SERVICES_SNAPSHOT_POLL_INTERVAL": "0",
        },
    )
    assert node.proc is not None
    ready = receiver.wait_for("READY")
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(node.proc.pid)
    assert ready["STATUS"].startswith("ready; 23 records from 1 source(s)"), ready

    # Pings at the expected period: half of WATCHDOG_USEC, never faster.
    pings: list[float] = []
    deadline = time.monotonic() + 60
    while len(pings) < 8 and time.monotonic() < deadline:
        fields = receiver.receive(5)
        if fields is not None and fields.get("WATCHDOG") == "1":
            pings.append(receiver.messages[-1][0])
    assert len(pings) == 8
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert 0.15 <= statistics.median(gaps) <= 1.0, gaps  # 0.2 s, whatever the load adds

    node.signal(signal.SIGHUP)
    before = sdnotify.monotonic_usec()
    reloading = receiver.wait_for("RELOADING")
    assert reloading["RELOADING"] == "1"
    stamp = int(reloading["MONOTONIC_USEC"])  # CLOCK_MONOTONIC is the same in every process
    assert before - 30_000_000 < stamp < sdnotify.monotonic_usec()
    assert receiver.wait_for("READY")["READY"] == "1"

    node.signal(signal.SIGTERM)
    stopping = receiver.wait_for("STOPPING")
    assert stopping["STOPPING"] == "1"
    assert node.proc.wait(timeout=30) == 0
    # While starting: EXTEND_TIMEOUT_USEC= (the first message, maybe more than one).
    assert receiver.messages[0][1] == {"EXTEND_TIMEOUT_USEC": "30000000", "STATUS": "starting"}
    kinds = [
        next(iter(m))
        for _, m in receiver.messages
        if "WATCHDOG" not in m and "EXTEND_TIMEOUT_USEC" not in m
    ]
    assert kinds == [
        *("READY", *("FDSTOREREMOVE", "FDSTORE") * 4),
        *("RELOADING", "READY", "STOPPING"),
    ]


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"node-services-test-{os.getpid()}-{time.monotonic_ns()}"
    got = Receiver(b"\0" + name.encode())
    try:
        notifier = sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        notifier.status("hello")
        assert got.receive(10) == {"STATUS": "hello"}
        notifier.close()
    finally:
        got.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = sdnotify.Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None


def test_listen_fds_of_another_process_are_not_taken() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert sdnotify.listen_fds(env) == {}
    assert env == {}  # no child takes them for its own either


def test_before_the_first_ready_the_start_is_extended_and_a_sighup_notifies_nothing(
    daemon: Start, receiver: Receiver, tmp_path: Path
) -> None:
    # The Kubernetes API is down (nothing listens at its address): no READY=1 yet.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    node = daemon(
        *("--kubeconfig", str(kubeconfig), "--upstream", "127.0.0.1:1"),
        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "NODE_SERVICES_SHUTDOWN_GRACE": "0"},
    )
    assert receiver.wait_for("EXTEND_TIMEOUT_USEC") == {
        "EXTEND_TIMEOUT_USEC": "30000000",
        "STATUS": "starting",
    }
    assert node.get("/readyz")[0] == 503
    node.signal(signal.SIGHUP)
    node.wait_for(lambda: "reloading 0 snapshot file(s)" in node.output(), what="the reload")
    node.signal(signal.SIGTERM)
    assert node.proc is not None
    assert node.proc.wait(timeout=60) == 0, node.output()
    messages = [m for _, m in receiver.messages] + receiver.pending()
    assert [m for m in messages if "READY" in m or "RELOADING" in m] == [], messages
    assert messages[-1] == {"STOPPING": "1", "STATUS": "stopping"}, messages


def test_storing_a_socket_first_removes_the_earlier_copies_of_its_name(
    receiver: Receiver, tmp_path: Path
) -> None:
    notifier = sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        notifier.store_fds({"dns-udp": udp.fileno()})
        notifier.remove_fds("admin")
    notifier.close()
    got = [receiver.receive(10) for _ in range(3)]
    assert got == [
        {"FDSTOREREMOVE": "1", "FDNAME": "dns-udp"},
        {"FDSTORE": "1", "FDNAME": "dns-udp"},
        {"FDSTOREREMOVE": "1", "FDNAME": "admin"},
    ]


def test_a_stalled_event_loop_or_a_dead_task_sends_no_watchdog_ping(receiver: Receiver) -> None:
    address = receiver.sock.getsockname()
    healthy = [True]

    async def scenario() -> tuple[int, int, int, int]:
        notifier = sdnotify.Notifier(address)
        watchdog = sdnotify.Watchdog(notifier, 0.05, lambda: healthy[0])
        task = asyncio.create_task(watchdog.run())
        await asyncio.sleep(0.5)
        before = len(receiver.pending())
        time.sleep(1.0)  # noqa: ASYNC251 - the loop stalls: a blocking call
        during = len(receiver.pending())
        await asyncio.sleep(0.5)
        after = len(receiver.pending())
        healthy[0] = False  # a supervised task died
        await asyncio.sleep(0.2)
        receiver.pending()
        await asyncio.sleep(0.5)
        dead = len(receiver.pending())
        task.cancel()
        notifier.close()
        return before, during, after, dead

    before, during, after, dead = asyncio.run(scenario())
    assert before >= 1
    assert during == 0  # nothing pinged while the loop was stuck
    assert after >= 1  # and pings resume once it runs again
    assert dead == 0


def test_sigterm_without_a_successor_is_a_lame_duck_then_exit_0(
    daemon: Start, tmp_path: Path
) -> None:
    metadata_port = free_port()
    node = daemon(
        "--snapshot",
        str(DEMO_SNAPSHOT),
        "--upstream",
        "127.0.0.1:1",
        "--metadata-listen",
        f"127.0.0.1:{metadata_port}",
        env={"NODE_SERVICES_SHUTDOWN_GRACE": "3"},
    )
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="ready")
    node.signal(signal.SIGTERM)
    node.wait_for(lambda: node.get("/readyz")[0] == 503, what="/readyz failing")
    assert node.get("/readyz") == (503, "not ready:\n  shutting down (lame duck)\n")
    # ... while DNS and metadata still answer
    assert dig_short(node.dns_port, "kubernetes.default.svc.cluster.local") == ["10.43.0.1"]
    url = f"http://127.0.0.1:{metadata_port}/latest/self/host/hostname"
    assert http_get(url, timeout=10) == (200, "node-a")
    assert node.proc is not None
    assert node.proc.poll() is None
    assert node.proc.wait(timeout=60) == 0
    assert "lame duck: /readyz fails, serving 3s more" in node.output()
