"""The test Cattle server speaks the v2-beta wire shapes to real clients: curl for the REST
collections (Basic auth, pagination.next), aiohttp's websocket client for subscribe."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from fakes.cattle_server import ThreadedCattle, read_fixture, serve_in_thread
from helpers import FIXTURES

SCENARIO = read_fixture(FIXTURES / "cattle" / "recorded-scenario.json")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


@pytest.fixture
def fake() -> Iterator[ThreadedCattle]:
    with serve_in_thread(max_limit=2) as threaded:
        threaded.call(lambda: threaded.server.load(SCENARIO))
        yield threaded


def curl(*args: str) -> tuple[int, Any]:
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    body, _, code = out.rpartition("\n")
    return int(code), json.loads(body)


@needs_curl
def test_curl_lists_a_paginated_collection_with_basic_auth(fake: ThreadedCattle) -> None:
    server = fake.server
    key = f"{server.access_key}:{server.secret_key}"
    status, page = curl("-u", key, f"{server.url}/containers?limit=1000")
    assert status == 200
    assert page["type"] == "collection" and page["resourceType"] == "container"
    assert [o["id"] for o in page["data"]] == ["1i10", "1i11"]
    assert page["pagination"] == {
        "first": None,
        "previous": None,
        "next": f"{server.url}/containers?limit=2&marker=m2",
        "limit": 2,
        "total": None,
        "partial": True,
    }
    first = page["data"][0]
    assert first["links"]["self"] == f"{server.url}/containers/1i10"
    assert (first["baseType"], first["primaryIpAddress"]) == ("instance", "127.0.0.2")
    status, last = curl("-u", key, page["pagination"]["next"])
    assert [o["id"] for o in last["data"]] == ["1i12", "1i13"]
    assert last["pagination"]["next"] is None and last["pagination"]["partial"] is False
    # every service kind is under services; one by id; 404 and 401 as Cattle's error bodies
    status, services = curl("-u", key, f"{server.url}/services?limit=100")
    assert len(services["data"]) == 2
    status, alias = curl("-u", key, f"{server.url}/dnsservices/1s6")
    assert (status, alias["type"], alias["name"]) == (200, "dnsService", "alias")
    status, missing = curl("-u", key, f"{server.url}/containers/1i99")
    assert (status, missing["type"], missing["code"]) == (404, "error", "NotFound")
    status, refused = curl("-u", f"{server.access_key}:wrong", f"{server.url}/containers")
    assert (status, refused["code"]) == (401, "Unauthorized")
    status, project = curl("-u", key, server.url)
    assert (project["type"], project["id"]) == ("project", "1a5")


async def test_subscribe_sends_pings_and_full_resource_change_events(
    fake: ThreadedCattle,
) -> None:
    server = fake.server
    pair = base64.b64encode(f"{server.access_key}:{server.secret_key}".encode()).decode()
    headers = {"Authorization": f"Basic {pair}"}
    url = f"ws://{server.host}:{server.port}{server.prefix}/subscribe?eventNames=resource.change"
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.ws_connect(url) as ws:
            first = json.loads((await ws.receive(timeout=5)).data)
            assert first["name"] == "ping"
            fake.call(lambda: server.update("1i11", primaryIpAddress="127.0.0.9"))
            event = json.loads((await ws.receive(timeout=5)).data)
            assert event["name"] == "resource.change"
            assert (event["resourceType"], event["resourceId"]) == ("container", "1i11")
            resource = event["data"]["resource"]
            assert resource["primaryIpAddress"] == "127.0.0.9"
            assert resource["name"] == "Web-nginx-2" and resource["serviceIds"] == ["1s3"]
            assert resource["links"]["self"].endswith("/v2-beta/projects/1a5/containers/1i11")
            fake.call(lambda: setattr(server.faults, "close_after_pings", 1))
        # the next socket is closed by the server after its first ping, with a close frame
        async with session.ws_connect(url) as ws:
            assert json.loads((await ws.receive(timeout=5)).data)["name"] == "ping"
            closing = await ws.receive(timeout=5)
            assert closing.type == aiohttp.WSMsgType.CLOSE
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with aiohttp.ClientSession() as anonymous:
                await anonymous.ws_connect(url)
        assert refused.value.status == 401
    await asyncio.sleep(0)
