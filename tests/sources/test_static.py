"""Snapshot files: every file shape loads; bad content keeps the last good state; changes reload."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from dnshelpers import dig_short
from helpers import DEMO_SNAPSHOT, FIXTURES, DaemonProcess, free_port, http_get

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


# -- hostile files (issue 9): any failure is a rejection naming the file; nothing blanks ------

NODE = (KUBE / "node.yaml").read_text()
NAMESPACE = (KUBE / "namespace.yaml").read_text()


def billion_laughs(levels: int = 9) -> str:
    lines = ["lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


HOSTILE: dict[str, tuple[str, str, str]] = {
    # name: (file name, content, the error after "<path>: ")
    "deep-json": ("deep.json", "[" * 1000 + "]" * 1000, "document 1: JSON nested more than 100"),
    "deep-json-parseable": (
        "deep2.json",
        '{"kind": "List", "items": [' + "[" * 150 + "]" * 150 + "]}",
        "document 1: JSON nested more than 100 levels deep",
    ),
    "deep-yaml": ("deep.yaml", "- " * 150 + "x\n", "document 1: nested more than 100 levels"),
    "cpu-nan": (
        "nan.yaml",
        NODE.replace('cpu: "4"', 'cpu: "nan"'),
        "document 1: Node node-a: status.capacity.cpu: 'nan' is not a quantity",
    ),
    "cpu-inf": (
        "inf.yaml",
        NODE.replace('cpu: "4"', "cpu: inf"),
        "document 1: Node node-a: status.capacity.cpu: 'inf' is not a quantity",
    ),
    "alias-bomb": (
        "bomb.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  "
        + billion_laughs().replace("\n", "\n  "),
        "document 1: its aliases would expand it by more than 100,000 nodes",
    ),
    "alias-bomb-in-cattle-metadata": (  # the 4.9 GB metadata GET of issue 9
        "cattle-bomb.yaml",
        "type: service\nid: 1s9\nname: lol\nstackId: 1st5\nkind: service\nmetadata:\n  "
        + billion_laughs().replace("\n", "\n  "),
        "document 1: its aliases would expand it by more than 100,000 nodes",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_file_is_a_rejection_naming_the_file_never_an_exception(
    tmp_path: Path, case: str
) -> None:
    name, content, error = HOSTILE[case]
    path = tmp_path / name
    path.write_text(content)
    result = load_file(path, "t")
    assert result.records == ()
    assert len(result.errors) == 1
    assert result.errors[0].startswith(f"{path}: {error}"), result.errors
    assert result.stamp is not None  # judged: not read again until it changes


def test_an_out_of_memory_translation_is_a_rejection_naming_the_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node_services.sources import static

    path = tmp_path / "snap.yaml"
    path.write_text(NAMESPACE + "---\n" + NODE)
    real = static.translate_object

    def exploding(obj: object, source: str) -> object:
        if isinstance(obj, dict) and obj.get("kind") == "Node":
            raise MemoryError
        return real(obj, source)

    monkeypatch.setattr(static, "translate_object", exploding)
    result = load_file(path, "t")
    assert result.errors == (
        f"{path}: document 2: Node node-a: ran out of memory while processing it (MemoryError)",
    )
    assert result.reason == "invalid"


def test_an_exception_anywhere_in_the_load_is_a_rejection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node_services.sources import static

    def broken(stream: object) -> object:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(static, "_documents", broken)
    path = tmp_path / "snap.yaml"
    path.write_text(NAMESPACE)
    result = load_file(path, "t")
    assert result.errors == (f"{path}: nested too deeply to process (RecursionError)",)
    assert result.reason == "limit"
    assert result.stamp == static._stamp(path)  # judged: not parsed again until it changes


EMPTY: dict[str, str] = {
    "zero-bytes": "",
    "comment-only": "# kubectl was interrupted\n\n",
    "document-markers-only": "---\n---\n",
    "empty-json-list": '{"kind": "List", "apiVersion": "v1", "items": []}',
    "empty-yaml-list": "apiVersion: v1\nkind: List\nitems: []\n",
    "only-unused-kinds": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: y}\n",
}


@pytest.mark.parametrize("case", EMPTY)
def test_a_file_with_no_objects_is_refused_without_the_marker(tmp_path: Path, case: str) -> None:
    path = tmp_path / "snap.yaml"
    path.write_text(EMPTY[case])
    result = load_file(path, "t")
    assert result.records == ()
    assert result.reason == "empty"
    assert result.errors == (
        f"{path}: no objects (empty, comment-only, truncated or only unused kinds); refusing "
        "to blank its content: a file meant to be empty says '# node-services: empty' on a "
        "line of its own",
    )
    path.write_text("# node-services: empty\n" + EMPTY[case])
    marked = load_file(path, "t")
    assert (marked.records, marked.errors, marked.reason) == ((), (), "")


async def test_empty_snapshot_keeps_last_good_state_unless_marked_empty(tmp_path: Path) -> None:
    path = tmp_path / "snap.yaml"
    shutil.copy(KUBE / "multi-document.yaml", path)
    store = Store()
    source = SnapshotFile(store, path, poll_interval=0)
    assert await source.reload() is True
    good = store.snapshot
    for content in EMPTY.values():
        path.write_text(content)
        assert await source.reload() is False
        assert store.snapshot is good
    path.write_text("kind: List\n# node-services: empty\nitems: []\n")
    assert await source.reload() is True
    assert len(store.snapshot.services) == 0
    assert store.snapshot.synced[source.name] is True


async def test_hostile_files_never_end_the_polling_task_and_the_next_good_file_loads(
    tmp_path: Path,
) -> None:
    from prometheus_client import CollectorRegistry

    from node_services.sources.guard import Rejections

    path = tmp_path / "snap.yaml"
    shutil.copy(KUBE / "multi-document.yaml", path)
    store = Store()
    registry = CollectorRegistry()
    source = SnapshotFile(store, path, poll_interval=0.01, rejections=Rejections(registry))
    task = asyncio.create_task(source.run())
    try:
        while not source.synced:
            await store.wait_for_change(store.version, timeout=5)
        good = store.snapshot
        contents = [content for _, content, _ in HOSTILE.values()] + list(EMPTY.values())
        for i, content in enumerate(contents, start=1):
            replace_file(path, content)
            for _ in range(500):
                if source.reload_errors == i:
                    break
                await asyncio.sleep(0.01)
            assert source.reload_errors == i, (i, content[:80])
            assert store.snapshot is good
            assert not task.done()
        replace_file(path, NAMESPACE + "---\n" + NODE)
        snapshot = await store.wait_for_change(good.version, timeout=5)
        assert sorted(snapshot.hosts) == ["k8s:Node/node-a"]
        assert len(snapshot.services) == 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    def rejected(reason: str) -> float | None:
        labels = {"source": source.name, "reason": reason}
        return registry.get_sample_value("node_services_source_rejected_loads_total", labels)

    assert (rejected("limit"), rejected("invalid"), rejected("empty")) == (5, 2, len(EMPTY))


async def test_a_failed_read_is_retried_at_the_next_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A transient EMFILE once marked the new content as seen: it never loaded.
    import errno

    path = tmp_path / "snap.yaml"
    path.write_text(NAMESPACE)
    store = Store()
    source = SnapshotFile(store, path, poll_interval=0.02)
    failures: list[int] = []
    real_open = Path.open

    def flaky_open(self: Path, *args: object, **kwargs: object) -> object:
        reading = args[:1] == ("rb",)
        if self == path and reading and source.loads == 1 and len(failures) < 3:
            failures.append(1)
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", flaky_open)
    task = asyncio.create_task(source.run())
    try:
        while not source.synced:
            await store.wait_for_change(store.version, timeout=5)
        version = store.version
        with caplog.at_level(logging.ERROR):
            path.write_text(NAMESPACE + "---\n" + NODE)  # written once, never touched again
            snapshot = await store.wait_for_change(version, timeout=5)
        assert sorted(snapshot.hosts) == ["k8s:Node/node-a"]
        assert len(failures) == 3
        assert source.reload_errors == 3
        # logged once, not once per retry
        assert caplog.text.count("Too many open files") == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_file_changing_while_read_is_not_applied_and_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node_services.sources import static

    path = tmp_path / "snap.yaml"
    path.write_text(NAMESPACE)
    store = Store()
    source = SnapshotFile(store, path, poll_interval=0)
    assert await source.reload() is True
    good = store.snapshot
    real = static._documents

    def writer_still_at_it(stream: object) -> object:
        for i, document in enumerate(real(stream)):  # type: ignore[arg-type]
            if i == 0:  # the writer appends while we read (as `kubectl get ... > file` does)
                with path.open("a") as out:
                    out.write("---\n" + NODE)
            yield document

    path.write_text(NAMESPACE + "---\n")  # a first part: a valid file on its own
    monkeypatch.setattr(static, "_documents", writer_still_at_it)
    result = load_file(path, source.name)
    assert result.reason == "changing"
    assert result.stamp is None
    assert result.errors == (
        f"{path}: changed while being read (still being written?); reading it again",
    )
    path.write_text(NAMESPACE + "---\n")
    assert await source.reload() is False
    assert store.snapshot is good
    assert source._stamp != static._stamp(path)  # so the next poll reads it again
    monkeypatch.setattr(static, "_documents", real)
    assert await source.reload() is True
    assert sorted(store.snapshot.hosts) == ["k8s:Node/node-a"]


# -- the same against a real daemon: dig, metadata and /readyz keep the last good state -------


def replace_file(path: Path, content: str) -> None:
    """Write ``content`` as the README says to: a temporary file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content)
    tmp.replace(path)


def metric(node: DaemonProcess, name: str) -> str | None:
    try:
        return node.metric(name)
    except AssertionError:  # not there (yet)
        return None


def _serving(node: DaemonProcess, metadata: str) -> tuple[list[str], int, str, tuple[int, str]]:
    status, services = http_get(f"{metadata}/latest/services")
    return (
        dig_short(node.dns_port, "frontend.shop.svc.cluster.local"),
        status,
        services,
        node.get("/readyz"),
    )


def _demo_daemon(
    daemon: Callable[..., DaemonProcess], tmp_path: Path, *, poll_interval: str
) -> tuple[Path, DaemonProcess, str]:
    """A daemon serving a copy of the demo snapshot, ready: (the file, it, its metadata URL)."""
    path = tmp_path / "snap.yaml"
    shutil.copy(DEMO_SNAPSHOT, path)
    port = free_port()
    node = daemon(
        "--snapshot",
        str(path),
        "--metadata-listen",
        f"127.0.0.1:{port}",
        env={"NODE_SERVICES_SNAPSHOT_POLL_INTERVAL": poll_interval},
    )
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="readiness")
    return path, node, f"http://127.0.0.1:{port}"


def test_daemon_keeps_serving_through_hostile_and_empty_snapshots(
    daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    path, node, metadata = _demo_daemon(daemon, tmp_path, poll_interval="0.05")
    good = _serving(node, metadata)
    assert good[0] == ["10.43.87.21"]
    assert good[1:3] == (200, "0=kubernetes\n1=kube-dns\n2=cart\n3=frontend\n4=payments\n5=nginx\n")
    assert good[3] == (200, "ok\n")
    errors = f'node_services_source_reload_errors_total{{source="static:{path}"}}'
    cases = [content for _, content, _ in HOSTILE.values()] + list(EMPTY.values())
    for i, content in enumerate(cases, start=1):
        replace_file(path, content)
        node.wait_for(lambda i=i: metric(node, errors) == f"{i}.0", what=f"rejection {i}")
        assert _serving(node, metadata) == good, content[:80]
    text = node.output()
    assert f"snapshot rejected: {path}: document 1: JSON nested more than 100" in text
    assert f"snapshot rejected: {path}: no objects" in text
    assert "Traceback" not in text
    for reason, count in (("limit", 5), ("invalid", 2), ("empty", len(EMPTY))):
        labels = f'reason="{reason}",source="static:{path}"'
        assert node.metric(f"node_services_source_rejected_loads_total{{{labels}}}") == f"{count}.0"
    # the next good file loads: frontend moves
    replace_file(path, DEMO_SNAPSHOT.read_text().replace("10.43.87.21", "10.43.87.22"))
    node.wait_for(
        lambda: dig_short(node.dns_port, "frontend.shop.svc.cluster.local") == ["10.43.87.22"],
        what="the next good file",
    )
    # and an explicitly empty one empties it
    replace_file(path, "# node-services: empty\n")
    node.wait_for(
        lambda: dig_short(node.dns_port, "frontend.shop.svc.cluster.local") == [],
        what="the marked empty file",
    )
    assert node.get("/readyz") == (200, "ok\n")


def test_daemon_answers_while_a_snapshot_is_rewritten_in_place(
    daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    # `kubectl get ... > snapshot.yaml`: the shell truncates the file, kubectl takes its time
    # (about 1 s measured), then writes. The empty file in between must not blank anything.
    path, node, metadata = _demo_daemon(daemon, tmp_path, poll_interval="0.02")
    good = _serving(node, metadata)
    rejected = f'node_services_source_rejected_loads_total{{reason="empty",source="static:{path}"}}'
    with path.open("w") as out:  # truncates, as the shell does
        node.wait_for(lambda: metric(node, rejected) == "1.0", what="the empty file refused")
        for _ in range(10):  # polls keep seeing it empty meanwhile: nothing changes
            assert _serving(node, metadata) == good
            time.sleep(0.03)
        out.write(DEMO_SNAPSHOT.read_text().replace("10.43.87.21", "10.43.87.22"))
    node.wait_for(
        lambda: dig_short(node.dns_port, "frontend.shop.svc.cluster.local") == ["10.43.87.22"],
        what="the complete file",
    )
    assert node.metric(rejected) == "1.0"  # refused once and logged once, not every poll
    assert node.output().count("no objects (empty") == 1


SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(SETPRIV is None or os.geteuid() != 0, reason="needs root and setpriv")
def test_daemon_retries_a_read_that_failed_with_eacces(tmp_path: Path) -> None:
    # A real failed read: the daemon runs as root without CAP_DAC_OVERRIDE/DAC_READ_SEARCH,
    # so a mode-000 file gives EACCES. The new content is written while the file is
    # unreadable; making it readable again changes no stamp (chmod moves only ctime), so only
    # a retry of the failed read can ever load it.
    path = tmp_path / "snap.yaml"
    shutil.copy(DEMO_SNAPSHOT, path)
    admin_port, dns_port, metadata_port = free_port(), free_port(), free_port()
    drop = "-dac_override,-dac_read_search"
    command = [
        str(SETPRIV),
        f"--bounding-set={drop}",
        f"--inh-caps={drop}",
        sys.executable,
        "-m",
        "node_services",
        "run",
        "--snapshot",
        str(path),
        "--admin-listen",
        f"127.0.0.1:{admin_port}",
        "--dns-listen",
        f"127.0.0.1:{dns_port}",
        "--metadata-listen",
        f"127.0.0.1:{metadata_port}",
        "--node-name",
        "node-a",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_SERVICES_", "CATTLE_"))}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    env["NODE_SERVICES_SNAPSHOT_POLL_INTERVAL"] = "0.05"
    log_path = tmp_path / "daemon.log"
    admin = f"http://127.0.0.1:{admin_port}"

    def ready() -> bool:
        try:
            return http_get(admin + "/readyz", timeout=1)[0] == 200
        except OSError:
            return False

    def wait(check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            if check():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}:\n{log_path.read_text()}")

    def frontend() -> list[str]:
        return dig_short(dns_port, "frontend.shop.svc.cluster.local")

    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait(ready, "readiness")
        assert frontend() == ["10.43.87.21"]
        path.chmod(0)
        replace_in_place = DEMO_SNAPSHOT.read_text().replace("10.43.87.21", "10.43.87.22")
        path.write_text(replace_in_place)  # root (this test) may; the daemon may not read it
        wait(lambda: "Permission denied" in log_path.read_text(), "the failed read")
        time.sleep(0.2)  # several polls: each retries, none loads, nothing changes
        assert frontend() == ["10.43.87.21"]
        assert ready()
        assert log_path.read_text().count("Permission denied") == 1  # logged once
        path.chmod(0o644)  # the stamp (inode, mtime, size) is unchanged by this
        wait(lambda: frontend() == ["10.43.87.22"], "the new content after the retry")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
