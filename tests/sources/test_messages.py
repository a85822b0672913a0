"""Source error texts name what is in the file: the field written, JSON as JSON."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from node_services.sources.static import EMPTY_MARKER, SnapshotFile, load_file
from node_services.state import Store

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  {field}: {value}
  ports: [{{port: 80}}]
"""


def test_a_bad_cluster_ip_is_reported_at_the_field_the_file_has(tmp_path: Path) -> None:
    path = tmp_path / "snap.yaml"
    path.write_text(SERVICE.format(field="clusterIP", value="banana"))
    assert load_file(path, "t").errors == (
        f"{path}: document 1: Service default/web: spec.clusterIP: 'banana' is not an IP address",
    )
    path.write_text(SERVICE.format(field="clusterIPs", value="[10.43.0.1, banana]"))
    assert load_file(path, "t").errors == (
        f"{path}: document 1: Service default/web: spec.clusterIPs[1]: 'banana' is not an IP "
        "address",
    )


def test_a_truncated_json_file_is_reported_as_json(tmp_path: Path) -> None:
    path = tmp_path / "snap.json"
    path.write_text('{"kind": "List", "apiVersion": "v1", "items": [{"kind": "Namespace"')
    result = load_file(path, "t")
    assert result.errors == (
        f"{path}: not valid JSON: Expecting ',' delimiter: line 1 column 68 (char 67)",
    )
    assert result.reason == "invalid"


def test_broken_yaml_is_still_reported_as_yaml(tmp_path: Path) -> None:
    path = tmp_path / "snap.yaml"
    path.write_text("kind: [broken\n")
    (error,) = load_file(path, "t").errors
    assert error.startswith(f"{path}: not valid YAML: while parsing a flow sequence")


async def test_a_snapshot_loaded_with_no_records_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "snap.yaml"
    path.write_text(f"{EMPTY_MARKER}\n")
    snapshot = SnapshotFile(Store(), path, poll_interval=0)
    with caplog.at_level(logging.WARNING, logger="node_services.sources.static"):
        assert await snapshot.reload()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"snapshot {path}: loaded with 0 records (the file says '{EMPTY_MARKER}'): every "
        "cluster name it fed answers NXDOMAIN"
    ]
