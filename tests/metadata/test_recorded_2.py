"""Every answer rancher-metadata v0.10.4 gave on the second recorded scenario, asked again.

The daemon serves ``cattle-resources.json`` as a snapshot on node worker-a; each of the
14,502 recorded cases is asked from its caller's source address and compared (see
``metadata_recording.py``). Only the differences the README lists are allowed.
"""

from __future__ import annotations

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
