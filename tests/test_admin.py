"""Admin endpoint in-process on a real loopback socket; a failed task fails readiness."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp.test_utils import TestServer

from node_services.admin import make_admin_app
from node_services.app import Supervisor
from node_services.state import Service, Store


async def get(server: TestServer, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(server.make_url(path)) as response:
        return response.status, await response.text()


async def test_readiness_names_unsynced_sources_and_failed_tasks() -> None:
    store = Store()
    store.register("static:/a.yaml")
    store.register("static:/b.yaml")
    supervisor = Supervisor()

    async def crashes() -> None:
        raise RuntimeError("boom")

    async def returns() -> None:
        return None

    supervisor.start("crasher", crashes)
    supervisor.start("quitter", returns)
    await asyncio.sleep(0.01)
    server = TestServer(make_admin_app(store, task_problems=supervisor.problems), host="127.0.0.1")
    await server.start_server()
    try:
        assert await get(server, "/readyz") == (
            503,
            "not ready:\n"
            "  source static:/a.yaml has not synced\n"
            "  source static:/b.yaml has not synced\n"
            "  task crasher failed: RuntimeError: boom\n"
            "  task quitter failed: ended unexpectedly\n",
        )
        assert await get(server, "/healthz") == (200, "ok\n")
        store.replace("static:/a.yaml", [])
        store.replace("static:/b.yaml", [])
        supervisor.failures.clear()
        assert await get(server, "/readyz") == (200, "ok\n")
    finally:
        await server.close()
        await supervisor.stop()


async def test_metrics_follow_the_store() -> None:
    store = Store()
    server = TestServer(make_admin_app(store), host="127.0.0.1")
    await server.start_server()
    try:
        store.replace(
            "s",
            [Service(key="k8s:Service/a/b", source="s", namespace="a", name="b")],
        )
        status, body = await get(server, "/metrics")
        assert status == 200
        lines = set(body.splitlines())
        assert f"node_services_store_version {float(store.version)}" in lines
        assert 'node_services_store_records{kind="service"} 1.0' in lines
        assert 'node_services_store_records{kind="endpoints"} 0.0' in lines
        assert 'node_services_source_synced{source="s"} 1.0' in lines
    finally:
        await server.close()
