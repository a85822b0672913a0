"""Every answer rancher-metadata v0.10.4 gave on the second recorded scenario, asked again.

The daemon serves ``cattle-resources.json`` as a snapshot on node worker-a; each of the
14,502 recorded cases is asked from its caller's source address and compared (see
``metadata_recording.py``). Only the differences the README lists are allowed.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import metadata_recording
import pytest
from metadata_helpers import MetadataDaemon, start_metadata_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetadataDaemon]:
    started = start_metadata_daemon(
        tmp_path_factory.mktemp("metadata_recording") / "daemon.log",
        "--snapshot",
        str(metadata_recording.RESOURCES),
        "--node-name",
        metadata_recording.NODE,
        env=metadata_recording.ENVIRONMENT,
        ready_timeout=30,
    )
    yield started
    started.process.stop()


def test_every_recorded_answer_matches_but_the_listed_differences(
    daemon: MetadataDaemon,
) -> None:
    port = int(daemon.url.rsplit(":", 1)[1])
    asked, mismatches = metadata_recording.run(metadata_recording.Asker(port))
    assert asked == len(metadata_recording.cases()) == 14_502  # none left out
    assert not mismatches, metadata_recording.summary(mismatches)


def test_repeated_slashes_are_redirected_to_the_clean_path(daemon: MetadataDaemon) -> None:
    port = int(daemon.url.rsplit(":", 1)[1])
    asker = metadata_recording.Asker(port)
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=10, source_address=("127.0.1.10", 0)
    )
    try:
        connection.request("GET", "//latest//self/container/name?x=1")
        response = connection.getresponse()
        response.read()
        assert (response.status, response.getheader("Location")) == (
            301,
            "/latest/self/container/name?x=1",
        )
    finally:
        connection.close()
    assert asker.ask("127.0.1.10", "GET", "/latest/self/container/name", None).body == (
        "shop-web-1"
    )


def test_container_links_name_the_target_containers(daemon: MetadataDaemon) -> None:
    asker = metadata_recording.Asker(int(daemon.url.rsplit(":", 1)[1]))
    reply = asker.ask("127.0.1.60", "GET", "/latest/self/container/links", "application/json")
    postgres_1 = asker.ask("host", "GET", "/latest/containers/payments-postgres-1/uuid", None)
    alertmanager = asker.ask("host", "GET", "/latest/containers/infraops-alertmanager-1/uuid", None)
    assert json.loads(reply.body) == {"alerts": alertmanager.body, "pg": postgres_1.body}
    assert postgres_1.body == "3344a9ad-ae6f-5165-be58-c4db5b089224"


def test_head_of_a_long_answer_has_no_content_length(daemon: MetadataDaemon) -> None:
    asker = metadata_recording.Asker(int(daemon.url.rsplit(":", 1)[1]))
    long = asker.ask("host", "HEAD", "/latest/services", "application/json")
    short = asker.ask("host", "HEAD", "/latest/services/web/name", "application/json")
    assert (long.status, long.content_length, long.body) == (200, None, "")
    assert (short.status, short.content_length) == (200, "5")
