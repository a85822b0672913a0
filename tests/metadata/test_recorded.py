"""The daemon, fed the recorded Cattle scenario, answers as rancher-metadata v0.10 did.

Input: tests/fixtures/cattle/recorded-scenario.json, the same scenario as the one recorded in
/work/shared/reference/rancher-1x-recorded.md, as Cattle v2-beta resources. Every expected body
below is the recorded one, byte for byte, unless a comment says why ours differs. Queries go
through the real curl bound to loopback source addresses: Web-nginx-1 is 127.0.0.2,
db-mysql-1 127.0.0.3, the sidekick Web-nginx-log-1 127.0.0.4; 127.0.0.1 is no workload.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
from helpers import FIXTURES
from metadata_helpers import Curl, MetadataDaemon, start_metadata_daemon

SCENARIO = FIXTURES / "cattle" / "recorded-scenario.json"
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
YAML = "application/yaml"
NGINX, MYSQL, SIDEKICK, NOBODY, PROXY = (
    "127.0.0.2",
    "127.0.0.3",
    "127.0.0.4",
    "127.0.0.1",
    "127.0.0.5",
)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetadataDaemon]:
    daemon = start_metadata_daemon(
        tmp_path_factory.mktemp("recorded") / "daemon.log",
        "--snapshot",
        str(SCENARIO),
        "--node-name",
        "node1",
        env={
            "NODE_SERVICES_METADATA_ENVIRONMENT_UUID": "env-1",
            "NODE_SERVICES_METADATA_TRUSTED_PROXIES": PROXY,
        },
    )
    yield daemon
    daemon.process.stop()


LATEST_KEYS = (
    b"containers/\nenvironments/\nhosts/\nname\nnetworks/\nregion_name\nself/\nservices/\n"
    b"stacks/\nuuid\nversion\n"
)
CONTAINER_KEYS = (  # the null fields too: the first recording left them out
    b"create_index\ndns/\ndns_search/\nenvironment_uuid\nexternal_id\nhealth_check\n"
    b"health_check_hosts/\nhealth_state\nhost_uuid\nhostname\nips/\nlabels/\nlinks/\n"
    b"memory_reservation\nmetadata_kind\nmilli_cpu_reservation\nname\n"
    b"network_from_container_uuid\nnetwork_uuid\nports/\nprimary_ip\n"
    b"primary_mac_address\nservice_index\nservice_name\nservice_uuid\nstack_name\n"
    b"stack_uuid\nstart_count\nstate\nsystem\nuuid\n"
)
HOST_YAML = b"""agent_ip: 192.168.1.10
agent_state: active
environment_uuid: env-1
hostname: node1
labels:
  zone: a
local_storage_mb: null
memory: 2048
metadata_kind: host
milli_cpu: 2000
name: node1
state: active
uuid: host-1
"""

# (source address, path, Accept, recorded body); all 200.
RECORDED_200 = [
    (NOBODY, "/", None, b"2015-07-25\n2015-12-19\n2016-07-29\nlatest\n"),
    (NOBODY, "/latest", None, LATEST_KEYS),
    (NGINX, "/latest", None, LATEST_KEYS),
    (NGINX, "/latest/self/container", None, CONTAINER_KEYS),
    (NGINX, "/latest/self/container/name", None, b"web-nginx-1"),
    (NGINX, "/latest/self/service/name", None, b"nginx"),
    (NGINX, "/latest/self/stack/name", None, b"web"),
    (NGINX, "/latest/self/host/hostname", None, b"node1"),
    (MYSQL, "/latest/self/service/name", None, b"mysql"),
    (NOBODY, "/latest/self/host/hostname", None, b"node1"),
    # Recorded: "0=upstream\n1=nginx\n2=mysql\n", in Go map iteration order (random per run).
    # Ours is stable: by stack, then name, a sidekick after its primary. Our fixture also has
    # the dnsService "alias", the externalService "extip" and nginx's sidekick "log", which
    # Cattle's metadata listed as a service of its own (primary_service_name: nginx).
    (NOBODY, "/latest/services", None, b"0=alias\n1=extip\n2=nginx\n3=log\n4=upstream\n5=mysql\n"),
    (NOBODY, "/latest/services/nginx/containers", None, b"0=web-nginx-1\n1=web-nginx-2\n"),
    (NOBODY, "/2015-07-25/services/nginx/containers", None, b"0\n1\n"),
    (NOBODY, "/2015-07-25/services/nginx/containers", JSON, b'["Web-nginx-1","Web-nginx-2"]'),
    (NGINX, "/2015-12-19/self/container/ports", JSON, b'["192.168.1.10:80:80/tcp"]'),
    (NGINX, "/2016-07-29/self/container/ports", JSON, b'["0.0.0.0:80:80/tcp"]'),
    (NGINX, "/latest/self/service/links", JSON, b'{"db/mysql":"database"}'),
    (NGINX, "/latest/self/service/metadata", JSON, b'{"example":{"name":"hello","value":"world"}}'),
    (NGINX, "/latest/self/service/token", JSON, b'"s3cret"'),
    (NOBODY, "/latest/services/nginx/token", JSON, b"null"),
    (NOBODY, "/latest/hosts/node1", YAML, HOST_YAML),
    (NOBODY, "/latest/region_name", None, b"local"),
]


@pytest.mark.parametrize(("source", "path", "accept", "body"), RECORDED_200)
def test_recorded_answers(
    recorded: MetadataDaemon, curl: Curl, source: str, path: str, accept: str | None, body: bytes
) -> None:
    reply = curl(recorded.url + path, interface=source, accept=accept)
    assert (reply.status, reply.body) == (200, body)
    assert reply.headers["access-control-allow-origin"] == "*"
    assert (
        reply.headers["content-type"]
        == {None: TEXT, JSON: JSON, YAML: "application/x-yaml"}[accept]
    )


@pytest.mark.parametrize(
    ("source", "path", "accept", "body"),
    [
        (NOBODY, "/latest/self/container", None, b"Not found\n"),
        (NOBODY, "/latest/nope", None, b"Not found\n"),
        (NOBODY, "/latest/nope", JSON, b'{"code":404,"message":"Not found","type":"error"}\n'),
        (NOBODY, "/2099-01-01/", None, b"Invalid version\n"),
        (NOBODY, "/latest/nope", YAML, b"code: 404\nmessage: Not found\ntype: error\n\n"),
    ],
)
def test_recorded_not_found(
    recorded: MetadataDaemon, curl: Curl, source: str, path: str, accept: str | None, body: bytes
) -> None:
    reply = curl(recorded.url + path, interface=source, accept=accept)
    assert (reply.status, reply.body) == (404, body)
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["content-length"] == str(len(body))


def test_version_is_the_store_version_and_the_etag(recorded: MetadataDaemon, curl: Curl) -> None:
    # Recorded: a random UUID per reload; ours: the store version, also the ETag of any path.
    version = recorded.store_version()
    reply = curl(recorded.url + "/latest/version", accept=JSON)
    assert reply.body == f'"{version}"'.encode()
    assert curl(recorded.url + "/latest/version").body == str(version).encode()
    assert curl(recorded.url + "/latest/hosts").headers["etag"] == f'"{version}"'
    unchanged = curl(recorded.url + "/latest/hosts", headers=(f'If-None-Match: "{version}"',))
    assert (unchanged.status, unchanged.body) == (304, b"")
    changed = curl(recorded.url + "/latest/hosts", headers=('If-None-Match: "1"',))
    assert (changed.status, changed.body) == (200, b"0=node1\n1=node2\n")


@pytest.mark.parametrize(
    ("source", "path", "accept", "body"),
    [
        # v1 lists names (original case), v2 full objects, v3 lowercases names
        (
            NOBODY,
            "/2015-07-25/stacks/Web/services",
            JSON,
            b'["alias","extip","nginx","log","upstream"]',
        ),
        (
            NOBODY,
            "/2015-12-19/stacks/Web/services",
            None,
            b"0=alias\n1=extip\n2=nginx\n3=log\n4=upstream\n",
        ),
        (NOBODY, "/latest/stacks", None, b"0=web\n1=db\n"),
        (NOBODY, "/2015-12-19/stacks", None, b"0=Web\n1=db\n"),
        (NGINX, "/2015-12-19/self/container/name", None, b"Web-nginx-1"),
        (NGINX, "/2015-07-25/self/service/containers", JSON, b'["Web-nginx-1","Web-nginx-2"]'),
        (NOBODY, "/2015-07-25/hosts/node2/hostId", None, b"2"),
        # path walk: list index, list element by uuid, lowercase retry, URL-escaped keys
        (NOBODY, "/latest/hosts/1/name", None, b"node2"),
        (NOBODY, "/latest/services/svc-2/name", None, b"mysql"),
        (NGINX, "/latest/SELF/Container/NAME", None, b"web-nginx-1"),
        (NGINX, "/latest/self/container/labels/io.rancher.stack_service.name", None, b"Web/nginx"),
        (NOBODY, "/latest/services/upstream/hostname", None, b"www.example.com"),
        (NOBODY, "/latest/services/upstream/kind", None, b"externalService"),
        (NOBODY, "/latest/services/extip/external_ips", JSON, b'["127.0.0.50","127.0.0.51"]'),
        (
            NOBODY,
            "/latest/services/alias/links",
            JSON,
            b'{"db/mysql":"mysql","web/nginx":"nginx"}',  # unaliased: the target's name
        ),
        (NOBODY, "/latest/services/nginx/sidekicks", JSON, b'["log"]'),
        (SIDEKICK, "/latest/self/service", YAML, None),
        (SIDEKICK, "/latest/self/container/service_name", None, b"log"),
        (NOBODY, "/latest/self", None, b"host/\n"),
        (MYSQL, "/latest/self", None, b"container/\nhost/\nservice/\nstack/\n"),
        (NOBODY, "/latest/name", None, b"Default"),
        (NOBODY, "/latest/uuid", None, b"env-1"),
        (NOBODY, "/latest/services/nginx/scale", None, b"2"),
        (NOBODY, "/latest/stacks/web/system", None, b"false"),
        (NOBODY, "/latest/services/upstream/vip", None, b""),
    ],
)
def test_versions_and_path_walk(
    recorded: MetadataDaemon,
    curl: Curl,
    source: str,
    path: str,
    accept: str | None,
    body: bytes | None,
) -> None:
    reply = curl(recorded.url + path, interface=source, accept=accept)
    assert reply.status == 200
    if body is not None:
        assert reply.body == body
    else:  # the sidekick's own service entry, with the service's token: it is the owner
        assert reply.body == SIDEKICK_SERVICE_YAML


SIDEKICK_SERVICE_YAML = b"""containers:
- create_index: 1
  dns: []
  dns_search: []
  environment_uuid: env-1
  external_id: ""
  health_check: null
  health_check_hosts: []
  health_state: null
  host_uuid: host-1
  hostname: null
  ips:
  - 127.0.0.4
  labels:
    io.rancher.project.name: Web
    io.rancher.project_service.name: Web/nginx/log
    io.rancher.service.deployment.unit: 6a2c1f0e-1111-4000-8000-000000000001
    io.rancher.service.launch.config: log
    io.rancher.stack.name: Web
    io.rancher.stack_service.name: Web/nginx/log
  links: {}
  memory_reservation: null
  metadata_kind: container
  milli_cpu_reservation: null
  name: web-nginx-log-1
  network_from_container_uuid: null
  network_uuid: ""
  ports: []
  primary_ip: 127.0.0.4
  primary_mac_address: null
  service_index: "1"
  service_name: log
  service_uuid: svc-1
  stack_name: web
  stack_uuid: stack-1
  start_count: 1
  state: running
  system: false
  uuid: c-4
create_index: 2
environment_uuid: env-1
expose: []
external_ips: []
fqdn: null
health_check: null
hostname: null
kind: service
labels: {}
lb_config: null
links:
  db/mysql: database
metadata:
  example:
    name: hello
    value: world
metadata_kind: service
name: log
ports: []
primary_service_name: nginx
scale: 2
sidekicks:
- log
stack_name: web
stack_uuid: stack-1
state: active
system: false
token: s3cret
uuid: svc-1
vip: null
"""


def test_the_token_shows_only_under_its_owners_self(recorded: MetadataDaemon, curl: Curl) -> None:
    def everything(source: str) -> str:
        return curl(recorded.url + "/latest", interface=source, accept=JSON).body.decode()

    mine = json.loads(everything(NGINX))
    assert mine["self"]["service"]["token"] == "s3cret"
    assert [s["token"] for s in mine["services"]] == [None] * 6
    assert [s["token"] for s in mine["stacks"][0]["services"]] == [None] * 5
    # another service's workload and a stranger never see it, anywhere in the tree
    assert "s3cret" not in everything(MYSQL)
    assert "s3cret" not in everything(NOBODY)
    assert json.loads(everything(MYSQL))["self"]["service"]["token"] is None
    theirs = curl(recorded.url + "/latest/services/nginx/token", interface=MYSQL, accept=JSON)
    assert theirs.body == b"null"


def test_proxy_headers_are_refused_unless_the_peer_is_a_trusted_proxy(
    recorded: MetadataDaemon, curl: Curl
) -> None:
    forged = curl(
        recorded.url + "/latest/self/service/token",
        interface=MYSQL,
        headers=(f"X-Forwarded-For: {NGINX}",),
    )
    assert (forged.status, forged.body) == (403, b"X-Forwarded-For is not accepted\n")
    forged_json = curl(
        recorded.url + "/latest/self/container/name",
        interface=NOBODY,
        accept=JSON,
        headers=(f"X-Forwarded-For: {NGINX}",),
    )
    assert forged_json.status == 403
    assert json.loads(forged_json.body) == {
        "code": 403,
        "message": "X-Forwarded-For is not accepted",
        "type": "error",
    }
    # the configured proxy (127.0.0.5) speaks for its client: the rightmost untrusted hop
    proxied = curl(
        recorded.url + "/latest/self/container/name",
        interface=PROXY,
        headers=(f"X-Forwarded-For: 10.9.9.9, {NGINX}",),
    )
    assert (proxied.status, proxied.body) == (200, b"web-nginx-1")

    # The standard header (RFC 7239) the same way; it wins over X-Forwarded-For when both come.
    forged_std = curl(
        recorded.url + "/latest/self/service/token",
        interface=MYSQL,
        headers=(f'Forwarded: for="{NGINX}:4711";proto=http',),
    )
    assert (forged_std.status, forged_std.body) == (403, b"Forwarded is not accepted\n")
    proxied_std = curl(
        recorded.url + "/latest/self/container/name",
        interface=PROXY,
        headers=(
            f'Forwarded: for=10.9.9.9, for="{NGINX}:5555";by={PROXY}',
            f"X-Forwarded-For: {MYSQL}",
        ),
    )
    assert (proxied_std.status, proxied_std.body) == (200, b"web-nginx-1")
    hidden = curl(
        recorded.url + "/latest/self",
        interface=PROXY,
        headers=(f'Forwarded: for="_hidden", for={PROXY}',),
    )
    assert (hidden.status, hidden.body) == (200, b"host/\n")  # a caller that is no workload
    assert (
        recorded.process.metric(
            'node_services_metadata_requests_total{route="forbidden",status="403"}'
        )
        == "3.0"
    )


def test_bad_requests_get_clear_errors(recorded: MetadataDaemon, curl: Curl) -> None:
    bad_escape = curl(recorded.url + "/latest/services/%zz")
    assert (bad_escape.status, bad_escape.body) == (400, b"400 Bad Request")
    too_long = curl(recorded.url + "/latest/" + "a" * 5000)
    assert too_long.status in (400, 414)
    huge_header = curl(recorded.url + "/latest", headers=("X-Big: " + "b" * 5000,))
    assert huge_header.status in (400, 431)
    # and the service keeps answering
    assert curl(recorded.url + "/latest/region_name").body == b"local"


def test_head_is_get_without_a_body_and_other_methods_get_405(
    recorded: MetadataDaemon, curl: Curl
) -> None:
    url = recorded.url + "/latest/self/container/name"
    head = subprocess.run(
        ["curl", "-s", "-I", "--interface", NGINX, url], capture_output=True, check=True
    ).stdout
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 11\r\n" in head
    post = subprocess.run(
        ["curl", "-s", "-i", "-X", "POST", url], capture_output=True, check=True
    ).stdout
    assert post.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert post.endswith(b"\r\n\r\nMethod not allowed\n")
