"""Fixtures shared by every test package."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import DaemonProcess


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
