"""The real daemon follows the test Cattle server (CATTLE_URL / CATTLE_ACCESS_KEY /
CATTLE_SECRET_KEY, the server in a thread): /readyz after the first list, live changes in
``dig`` answers (service, sidekick and container names) and in metadata ``self`` (curl from
the container's loopback address), and the last state kept while the API is down.
Loopback only; the upstream is a dead end (127.0.0.1:1), never queried here."""

from __future__ import annotations

import copy
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from dnshelpers import dig_short, needs_dig
from fakes.cattle_server import ThreadedCattle, read_fixture, serve_in_thread
from helpers import FIXTURES, DaemonProcess, free_port

Start = Callable[..., DaemonProcess]
SCENARIO = read_fixture(FIXTURES / "cattle" / "recorded-scenario.json")
R = "rancher.internal"


@pytest.fixture
def fake() -> Iterator[ThreadedCattle]:
    with serve_in_thread(max_limit=3) as threaded:
        threaded.call(lambda: threaded.server.load(SCENARIO))
        yield threaded


def start(daemon: Start, fake: ThreadedCattle, *, secret: str = "") -> tuple[DaemonProcess, int]:
    server = fake.server
    metadata_port = free_port()
    node = daemon(
        "--upstream",
        "127.0.0.1:1",
        "--metadata-listen",
        f"127.0.0.1:{metadata_port}",
        env={
            "CATTLE_URL": server.url,
            "CATTLE_ACCESS_KEY": server.access_key,
            "CATTLE_SECRET_KEY": secret or server.secret_key,
        },
    )
    return node, metadata_port


def metadata_self(port: int, source: str, path: str) -> str:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "5", "--interface", source, f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    ).stdout


def answers_soon(node: DaemonProcess, name: str, expected: list[str], what: str) -> float:
    started = time.monotonic()
    node.wait_for(lambda: dig_short(node.dns_port, name, "A") == expected, what=what, timeout=15)
    return time.monotonic() - started


@needs_dig
def test_daemon_follows_cattle_live(daemon: Start, fake: ThreadedCattle) -> None:
    server = fake.server
    node, metadata_port = start(daemon, fake)
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="ready", timeout=15)
    assert dig_short(node.dns_port, f"nginx.web.{R}", "A") == ["10.42.0.3", "127.0.0.2"]
    assert dig_short(node.dns_port, f"log.nginx.web.{R}", "A") == ["127.0.0.4"]
    assert dig_short(node.dns_port, f"web-nginx-1.{R}", "A") == ["127.0.0.2"]
    assert metadata_self(metadata_port, "127.0.0.2", "/2015-12-19/self/container/name") == (
        "Web-nginx-1"
    )

    # create: a third nginx container, on 127.0.0.7
    new = copy.deepcopy(next(o for o in SCENARIO if o["id"] == "1i10"))
    new.update(id="1i20", name="Web-nginx-3", primaryIpAddress="127.0.0.7", uuid="c-20")
    fake.call(lambda: server.put(new))
    answers_soon(node, f"nginx.web.{R}", ["10.42.0.3", "127.0.0.2", "127.0.0.7"], "create")
    assert dig_short(node.dns_port, f"web-nginx-3.{R}", "A") == ["127.0.0.7"]
    node.wait_for(
        lambda: (
            metadata_self(metadata_port, "127.0.0.7", "/2015-12-19/self/container/name")
            == "Web-nginx-3"
        ),
        what="metadata self of the new container",
    )
    # update: the sidekick moves to 127.0.0.8
    fake.call(lambda: server.update("1i13", primaryIpAddress="127.0.0.8"))
    answers_soon(node, f"log.nginx.web.{R}", ["127.0.0.8"], "update")
    node.wait_for(
        lambda: (
            metadata_self(metadata_port, "127.0.0.8", "/2015-12-19/self/container/name")
            == "Web-nginx-log-1"
        ),
        what="metadata self after the move",
    )
    # remove
    fake.call(lambda: server.remove("1i20"))
    answers_soon(node, f"nginx.web.{R}", ["10.42.0.3", "127.0.0.2"], "remove")
    assert dig_short(node.dns_port, f"web-nginx-3.{R}", "A") == []

    # the API goes away: every answer stays; it comes back with changes made meanwhile
    fake.call(lambda: setattr(server.faults, "refuse_subscribe", True))
    fake.call(server.drop_sockets)
    node.wait_for(
        lambda: node.metric("node_services_cattle_connected") == "0.0", what="disconnected"
    )
    fake.call(lambda: server.purge("1i11"))
    assert dig_short(node.dns_port, f"nginx.web.{R}", "A") == ["10.42.0.3", "127.0.0.2"]
    assert node.get("/readyz")[0] == 200
    fake.call(lambda: setattr(server.faults, "refuse_subscribe", False))
    answers_soon(node, f"nginx.web.{R}", ["127.0.0.2"], "purged while down")
    assert float(node.metric("node_services_cattle_lists_total")) >= 2
    assert "sekret" not in node.output()


def test_daemon_with_a_wrong_key_names_it_and_keeps_retrying(
    daemon: Start, fake: ThreadedCattle
) -> None:
    node, _ = start(daemon, fake, secret="not-the-secret")
    node.wait_for(
        lambda: fake.call(lambda: fake.server.counters.unauthorized) >= 3,
        what="retries",
        timeout=20,
    )
    assert node.get("/readyz")[0] == 503
    output = node.output()
    assert "401 Unauthorized: the API key AK0123 was refused" in output
    assert "not-the-secret" not in output
    assert float(node.metric('node_services_cattle_errors_total{reason="unauthorized"}')) >= 3
