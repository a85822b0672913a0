"""Requests the server will not read: ambiguous framing gets 400 and closes the connection
(the smuggled request behind it never runs); malformed requests cost one rate-limited log
line and a count each. A real daemon process, raw sockets on loopback."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator

import pytest
from helpers import FIXTURES
from metadata_helpers import MetadataDaemon, start_metadata_daemon
from prometheus_client import CollectorRegistry, Counter

from node_services.metadata.framing import WARNINGS_PER_INTERVAL, BadRequests

SCENARIO = FIXTURES / "cattle" / "recorded-scenario.json"
SMUGGLED = b"GET /latest/hosts HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetadataDaemon]:
    started = start_metadata_daemon(
        tmp_path_factory.mktemp("framing") / "daemon.log",
        "--snapshot",
        str(SCENARIO),
        "--node-name",
        "node1",
        env={"NODE_SERVICES_METADATA_ACCESS_LOG": "true"},
    )
    yield started
    started.process.stop()


def exchange(daemon: MetadataDaemon, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection and read until the server closes it."""
    host, port = daemon.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):  # a timeout here: the server kept the connection
            reply += chunk
    return reply


def metric(daemon: MetadataDaemon, name: str) -> float:
    try:
        return float(daemon.process.metric(name))
    except AssertionError:  # not there: never counted
        return 0.0


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (
            b"GET /latest/version HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity, chunked\r\n",
            b"Transfer-Encoding other than chunked is not accepted",
        ),
        (
            b"GET /latest/version HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n",
            b"Transfer-Encoding other than chunked is not accepted",
        ),
        (
            b"GET /latest/version HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\n",
            b"Transfer-Encoding is not accepted on HTTP/1.0",
        ),
        (  # refused by aiohttp's parser already
            b"GET /latest/version HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n",
            b"Transfer-Encoding can't be present with Content-Length",
        ),
        (
            b"GET /latest/version HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n"
            b"Transfer-Encoding: chunked\r\n",
            b"Duplicate 'Transfer-Encoding' header found.",
        ),
    ],
)
def test_ambiguous_framing_is_refused_and_the_smuggled_request_does_not_run(
    daemon: MetadataDaemon, head: bytes, reason: bytes
) -> None:
    hosts = 'node_services_metadata_requests_total{route="hosts",status="200"}'
    refused = 'node_services_metadata_bad_requests_total{reason="transfer_encoding"}'
    before = metric(daemon, refused)
    reply = exchange(daemon, head + b"\r\n0\r\n\r\n" + SMUGGLED)
    assert reply.startswith((b"HTTP/1.1 400 Bad Request\r\n", b"HTTP/1.0 400 Bad Request\r\n"))
    # one answer, then the connection was closed
    assert reply.count(b" 400 Bad Request\r\n") == 1
    assert b" 200 OK\r\n" not in reply
    assert reason in reply
    assert metric(daemon, refused) == before + 1
    # the request inside the body never ran: not counted, not in the access log
    assert metric(daemon, hosts) == 0
    assert "/latest/hosts" not in daemon.process.output()
    # a plain chunked GET on HTTP/1.1 is fine, pipelined request and all
    good = exchange(
        daemon,
        b"GET /latest/region_name HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /latest/name HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert good.startswith(b"HTTP/1.1 200 OK\r\n")
    assert good.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert good.endswith(b"\r\n\r\nDefault")


def test_malformed_chunked_requests_cost_a_bounded_log_and_are_counted(
    metadata_daemon: Callable[..., MetadataDaemon],
) -> None:
    daemon = metadata_daemon("--snapshot", str(SCENARIO), "--node-name", "node1")
    counted = 'node_services_metadata_bad_requests_total{reason="chunked_body"}'
    before = metric(daemon, counted)
    lines_before = daemon.process.output().count("\n")
    attempts = 300
    for _ in range(attempts):
        reply = exchange(
            daemon,
            b"GET /latest/version HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nhello\r\n0\r\n\r\n",
        )
        assert reply.startswith(b"HTTP/1.0 400 Bad Request\r\n")
        assert b"Invalid character in chunk size" in reply
    assert metric(daemon, counted) == before + attempts
    log = daemon.process.output()
    # a window's warnings (and a summary line) per 10 s; the loop takes a second or two
    warnings = [line for line in log.splitlines() if "bad request from 127.0.0.1" in line]
    assert 1 <= len(warnings) <= 2 * WARNINGS_PER_INTERVAL
    assert warnings[0].endswith("refused (chunked_body): Invalid character in chunk size")
    assert log.count("\n") - lines_before <= 2 * (WARNINGS_PER_INTERVAL + 1)
    assert "Traceback" not in log
    assert "ERROR" not in log
    assert exchange(daemon, b"GET /latest/name HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\nDefault")


def test_warnings_beyond_the_budget_are_summed_up_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    counter = Counter("bad", "bad requests", ["reason"], registry=CollectorRegistry())
    bad = BadRequests(counter, interval=10.0, per_interval=3, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="node_services.metadata"):
        for i in range(10):
            bad.report(f"127.0.0.{i}", "chunked_body", "Invalid character in chunk size")
        now[0] += 10.0
        bad.report("127.0.0.99", "header", "Invalid header value char")
    assert [r.getMessage() for r in caplog.records] == [
        "metadata: bad request from 127.0.0.0 refused (chunked_body): "
        "Invalid character in chunk size",
        "metadata: bad request from 127.0.0.1 refused (chunked_body): "
        "Invalid character in chunk size",
        "metadata: bad request from 127.0.0.2 refused (chunked_body): "
        "Invalid character in chunk size",
        "metadata: 7 more bad requests not logged in the last 10 s "
        "(node_services_metadata_bad_requests_total counts them all)",
        "metadata: bad request from 127.0.0.99 refused (header): Invalid header value char",
    ]
    assert counter.labels("chunked_body")._value.get() == 10
    assert counter.labels("header")._value.get() == 1
