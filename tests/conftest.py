"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import DaemonProcess

# Daemons the tests start by hand stop at SIGTERM without a lame duck (the tests of that set
# shutdown_grace themselves).
os.environ.setdefault("NODE_SERVICES_SHUTDOWN_GRACE", "0")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Factory: daemon(*args, env={...}) starts a daemon; all are stopped at teardown."""
    started: list[DaemonProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        process = DaemonProcess(
            list(args), tmp_path / f"daemon-{len(started)}.log", env=dict(env or {})
        )
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()
