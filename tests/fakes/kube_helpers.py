"""Helpers for tests of the Kubernetes source: fixture objects, object builders, waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import yaml
from helpers import FIXTURES

from fakes.kube_apiserver import KIND_TO_RESOURCE


def fixture_objects() -> list[dict[str, Any]]:
    """Every Kubernetes object of tests/fixtures/kube that the API server serves."""
    objects = []
    for path in sorted((FIXTURES / "kube").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not isinstance(document, dict):
                continue
            items = document.get("items") if document.get("kind") == "List" else [document]
            for item in items or []:
                if item.get("kind") in KIND_TO_RESOURCE:
                    objects.append(item)
    return objects


def service(name: str, ip: str, *, namespace: str = "default", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    }


async def wait_until(check: Callable[[], Any], *, within: float = 5.0, what: str = "") -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.01)
