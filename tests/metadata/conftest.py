"""Fixtures for the metadata tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from metadata_helpers import Curl, MetadataDaemon, run_curl, start_metadata_daemon


@pytest.fixture(scope="session")
def curl() -> Curl:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (Debian package curl)")
    return run_curl


@pytest.fixture
def metadata_daemon(tmp_path: Path) -> Iterator[Callable[..., MetadataDaemon]]:
    """Factory: metadata_daemon(*args, env=...) starts a daemon; all stop at teardown."""
    started: list[MetadataDaemon] = []

    def start(
        *args: str, env: dict[str, str] | None = None, ready_timeout: float = 10
    ) -> MetadataDaemon:
        daemon = start_metadata_daemon(
            tmp_path / f"daemon-{len(started)}.log", *args, env=env, ready_timeout=ready_timeout
        )
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.process.stop()
