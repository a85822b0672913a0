"""Who is asking: proxy headers are believed only from a trusted proxy, and then every line.

The daemon runs the recorded Cattle scenario (tests/fixtures/cattle/recorded-scenario.json):
Web-nginx-1 is 127.0.0.2 and owns the service token ``s3cret``, db-mysql-1 is 127.0.0.3, and
127.0.0.5 is the configured trusted proxy.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from helpers import FIXTURES
from metadata_helpers import Curl, MetadataDaemon, start_metadata_daemon

from node_services.metadata.callers import forwarded_for

SCENARIO = FIXTURES / "cattle" / "recorded-scenario.json"
NGINX, MYSQL, PROXY = "127.0.0.2", "127.0.0.3", "127.0.0.5"


@pytest.fixture(scope="module")
def behind_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetadataDaemon]:
    daemon = start_metadata_daemon(
        tmp_path_factory.mktemp("callers") / "daemon.log",
        "--snapshot",
        str(SCENARIO),
        "--node-name",
        "node1",
        env={"NODE_SERVICES_METADATA_TRUSTED_PROXIES": PROXY},
    )
    yield daemon
    daemon.process.stop()


def raw_get(daemon: MetadataDaemon, path: str, header_lines: list[str], source: str) -> bytes:
    """One GET on a real socket from ``source``, with the header lines exactly as given."""
    host, port = daemon.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0)) as s:
        head = "".join(f"{line}\r\n" for line in header_lines)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{head}\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize(
    "forged",
    [
        # what the client sent (first line), then the line the proxy appended (the client's
        # real address, db-mysql-1)
        [f"X-Forwarded-For: {NGINX}", f"X-Forwarded-For: {MYSQL}"],
        [f"Forwarded: for={NGINX}", f"Forwarded: for={MYSQL};proto=http"],
        [f'Forwarded: for="{NGINX}:4711", for={NGINX}', f"Forwarded: for={MYSQL}"],
    ],
)
def test_a_forged_first_header_line_behind_the_proxy_gives_no_other_services_token(
    behind_proxy: MetadataDaemon, forged: list[str]
) -> None:
    token = raw_get(behind_proxy, "/latest/self/service/token", forged, PROXY)
    assert token.startswith(b"HTTP/1.1 200 OK\r\n")
    assert token.endswith(b"\r\n\r\n")  # mysql's token: empty, never nginx's s3cret
    assert b"s3cret" not in token
    name = raw_get(behind_proxy, "/latest/self/service/name", forged, PROXY)
    assert name.endswith(b"\r\n\r\nmysql")  # the caller is the address the proxy appended
    everything = raw_get(
        behind_proxy, "/latest", [*forged, "Accept: application/json"], PROXY
    ).partition(b"\r\n\r\n")[2]
    assert json.loads(everything)["self"]["container"]["name"] == "db-mysql-1"
    assert b"s3cret" not in everything


def test_header_lines_are_joined_in_order_and_walked_from_the_right(
    behind_proxy: MetadataDaemon, curl: Curl
) -> None:
    # curl sends a header given twice as two lines; the proxy's own hops are skipped
    proxied = curl(
        behind_proxy.url + "/latest/self/container/name",
        interface=PROXY,
        headers=(f"X-Forwarded-For: {MYSQL}", f"X-Forwarded-For: {NGINX}, {PROXY}"),
    )
    assert (proxied.status, proxied.body) == (200, b"web-nginx-1")
    # and a stranger's two lines are refused like one
    refused = curl(
        behind_proxy.url + "/latest/self/service/token",
        interface=MYSQL,
        headers=(f"Forwarded: for={NGINX}", f"Forwarded: for={NGINX}"),
    )
    assert (refused.status, refused.body) == (403, b"Forwarded is not accepted\n")


@pytest.mark.parametrize(
    ("header", "hops"),
    [
        ("for=192.0.2.60;proto=http;by=203.0.113.43", ["192.0.2.60"]),
        ('For="[2001:db8:cafe::17]:4711"', ["2001:db8:cafe::17"]),
        ('for="192.0.2.60:8080"', ["192.0.2.60"]),
        ("for=192.0.2.43, for=198.51.100.17", ["192.0.2.43", "198.51.100.17"]),
        ('for="_gazonk", for=unknown', ["_gazonk", "unknown"]),
        ("proto=https;by=10.0.0.1", ["unknown"]),  # an element without for=
        ('for="a,b;c", for=10.0.0.2', ["a,b;c", "10.0.0.2"]),  # separators inside quotes
        ("for=10.0.0.1 ; proto=http,,for=10.0.0.2", ["10.0.0.1", "10.0.0.2"]),
    ],
)
def test_forwarded_header_hops(header: str, hops: list[str]) -> None:
    assert forwarded_for(header) == hops
