"""Every answer rancher-metadata v0.10.4 gave on the second recorded scenario, asked again.

The daemon serves ``cattle-resources.json`` as a snapshot on node worker-a; each of the
14,502 recorded cases is asked from its caller's source address and compared (see
``recorded2.py``). Only the differences the README lists are allowed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import recorded2
from metadata_helpers import MetadataDaemon, start_metadata_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetadataDaemon]:
    started = start_metadata_daemon(
        tmp_path_factory.mktemp("recorded2") / "daemon.log",
        "--snapshot",
        str(recorded2.RESOURCES),
        "--node-name",
        recorded2.NODE,
        env=recorded2.ENVIRONMENT,
        ready_timeout=30,
    )
    yield started
    started.process.stop()


def test_every_recorded_answer_matches_but_the_listed_differences(
    daemon: MetadataDaemon,
) -> None:
    port = int(daemon.url.rsplit(":", 1)[1])
    mismatches = recorded2.run(recorded2.Asker(port))
    unexpected = [m for m in mismatches if not recorded2.allowed(m)]
    assert not unexpected, recorded2.summary(unexpected)
