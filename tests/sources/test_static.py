"""Snapshot files: every file shape loads; bad content keeps the last good state; changes reload."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import FIXTURES

from node_services.sources.static import SnapshotFile, load_file
from node_services.state import Store

KUBE = FIXTURES / "kube"
CATTLE = FIXTURES / "cattle"


def keys(path: Path) -> list[str]:
    result = load_file(path, "t")
    assert result.errors == ()
    return [r.key for r in result.records]


def test_multi_document_yaml() -> None:
    assert keys(KUBE / "multi-document.yaml") == [
        "k8s:Namespace/default",
        "k8s:Service/default/web",
        "k8s:EndpointSlice/default/web-abc12",
    ]


def test_kind_list_as_kubectl_prints_it() -> None:
    assert keys(KUBE / "list-services.yaml") == [
        "k8s:Service/default/web",
        "k8s:Service/default/db",
    ]


def test_kubectl_json_list(tmp_path: Path) -> None:
    items = [yaml.safe_load((KUBE / n).read_text()) for n in ("node.yaml", "pod.yaml")]
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=4))
    assert keys(path) == ["k8s:Node/node-a", "k8s:Pod/default/web-7d4b9c-abcde"]


def test_cattle_collection_and_resource_list() -> None:
    assert keys(CATTLE / "collection.json") == [
        "cattle:container/1i10",
        "cattle:endpoint/1s3/1i10",
        "cattle:container/1i11",
        "cattle:endpoint/1s3/1i11",
    ]
    scenario = load_file(CATTLE / "recorded-scenario.json", "t")
    services = {r.key: r for r in scenario.records if r.key.startswith("cattle:service/")}
    assert {s.name: s.namespace for s in services.values()} == {  # type: ignore[union-attr]
        "nginx": "Web",
        "mysql": "db",
        "upstream": "Web",
        "alias": "Web",
        "extip": "Web",
    }


def test_mixed_kubernetes_and_cattle_demo_snapshot() -> None:
    result = load_file(FIXTURES.parent.parent / "demo" / "snapshot.yaml", "t")
    assert result.errors == ()
    prefixes = {r.key.split(":")[0] for r in result.records}
    assert prefixes == {"k8s", "cattle"}


def test_unsupported_kinds_are_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg, namespace: default}\n---\n"
        + (KUBE / "namespace.yaml").read_text()
    )
    result = load_file(path, "t")
    assert result.errors == ()
    assert [r.key for r in result.records] == ["k8s:Namespace/default"]
    assert len(result.skipped) == 1
    assert "document 1: ConfigMap default/cfg" in result.skipped[0]


def test_bad_object_is_named_with_file_and_document(tmp_path: Path) -> None:
    service = yaml.safe_load((KUBE / "service-clusterip-dualstack.yaml").read_text())
    service["spec"]["clusterIPs"] = ["10.43.0.10", "banana"]
    path = tmp_path / "bad.yaml"
    path.write_text((KUBE / "namespace.yaml").read_text() + "---\n" + yaml.safe_dump(service))
    result = load_file(path, "t")
    assert result.errors == (
        f"{path}: document 2: Service default/web: spec.clusterIPs[1]: 'banana' is not an IP "
        "address",
    )


def test_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("kind: Service\nmetadata: {name: [unclosed\n")
    [error] = load_file(path, "t").errors
    assert error.startswith(f"{path}: not valid YAML:")
    assert "line 2" in error


def test_duplicate_objects_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    text = (KUBE / "namespace.yaml").read_text()
    path.write_text(text + "---\n" + text)
    assert load_file(path, "t").errors == (f"{path}: k8s:Namespace/default appears more than once",)


async def test_bad_file_keeps_last_good_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "snap.yaml"
    shutil.copy(KUBE / "multi-document.yaml", path)
    store = Store()
    source = SnapshotFile(store, path, poll_interval=0)
    assert await source.reload() is True
    good = store.snapshot
    assert good.synced == {f"static:{path}": True}
    assert len(good.services) == 1

    path.write_text("this: [is not closed\n")
    with caplog.at_level(logging.ERROR):
        assert await source.reload() is False
    assert store.snapshot is good
    assert source.reload_errors == 1
    assert source.last_error.startswith(f"{path}: not valid YAML")
    assert any(str(path) in r.getMessage() for r in caplog.records)

    path.unlink()
    assert await source.reload() is False
    assert store.snapshot is good
    assert source.last_error == f"{path}: cannot read: No such file or directory"


async def test_file_change_is_picked_up_by_polling(tmp_path: Path) -> None:
    path = tmp_path / "snap.yaml"
    shutil.copy(KUBE / "namespace.yaml", path)
    store = Store()
    source = SnapshotFile(store, path, poll_interval=0.02)
    task = asyncio.create_task(source.run())
    try:
        while not source.synced:
            await store.wait_for_change(store.version, timeout=5)
        version = store.version
        path.write_text(
            (KUBE / "namespace.yaml").read_text() + "---\n" + (KUBE / "node.yaml").read_text()
        )
        snapshot = await store.wait_for_change(version, timeout=5)
        assert sorted(snapshot.hosts) == ["k8s:Node/node-a"]
        # a record deleted from the file disappears from the store
        shutil.copy(KUBE / "node.yaml", path)
        snapshot = await store.wait_for_change(snapshot.version, timeout=5)
        assert len(snapshot.stacks) == 0
        assert source.loads == 3
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_the_garbage_collector_is_back_on_after_loads_good_and_bad(tmp_path: Path) -> None:
    import gc

    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [\n")
    assert gc.isenabled()
    load_file(KUBE / "multi-document.yaml", "t")
    load_file(bad, "t")
    assert gc.isenabled()
