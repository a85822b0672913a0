"""Fixtures for the Kubernetes source: the test API server in-process, loaded with fixtures."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fakes.kube_apiserver import KIND_TO_RESOURCE, FakeKubeAPIServer
from fakes.kube_helpers import fixture_objects, wait_until

from node_services.sources.kube.client import load_connection
from node_services.sources.kube.source import KubeSource
from node_services.state.store import Store


@dataclass
class KubeHarness:
    server: FakeKubeAPIServer
    store: Store
    source: KubeSource
    tmp: Path
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks.append(asyncio.create_task(self.source.run()))

    async def synced(self) -> None:
        """Every initial list landed and every watch is open."""
        await wait_until(lambda: self.store.snapshot.all_synced, what="all lists")
        await wait_until(
            lambda: len(self.server.watchers) == len(self.source.resources), what="all watches"
        )

    def rv_of(self, kind: str, namespace: str, name: str) -> str:
        resource = KIND_TO_RESOURCE[kind]
        ident = (namespace if resource.namespaced else "", name)
        return str(self.server.objects[resource.name][ident]["metadata"]["resourceVersion"])


@pytest.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``await make_harness(**source_options)`` -> a running :class:`KubeHarness`."""
    harnesses: list[KubeHarness] = []

    async def make(
        *,
        objects: list[dict[str, Any]] | None = None,
        server_options: dict[str, Any] | None = None,
        start: bool = True,
        **options: Any,
    ) -> KubeHarness:
        server = await FakeKubeAPIServer(**(server_options or {})).start()
        for obj in fixture_objects() if objects is None else objects:
            server.put(obj)
        kubeconfig = tmp_path / f"kubeconfig-{len(harnesses)}"
        kubeconfig.write_text(server.kubeconfig())
        store = Store()
        options.setdefault("node_name", "node-a")
        options.setdefault("backoff", (0.02, 0.2))
        connection = await load_connection(kubeconfig)
        source = KubeSource(store, kubeconfig=kubeconfig, connection=connection, **options)
        harness = KubeHarness(server, store, source, tmp_path)
        harnesses.append(harness)
        if start:
            harness.start()
        return harness

    yield make
    for harness in harnesses:
        for task in harness.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await harness.server.stop()
