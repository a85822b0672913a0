"""Fixtures for the DNS tests: a fake upstream on 127.0.0.x and daemons on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dnshelpers import FakeUpstream


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream(
        host="127.0.0.2",
        records={
            ("www.example.org.", "A"): ["192.0.2.10"],
            ("www.example.org.", "AAAA"): ["2001:db8::10"],
            ("payments.example.com.", "A"): ["192.0.2.20"],
        },
    ).start()
    yield server
    server.stop()
