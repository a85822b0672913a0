"""The store refuses to start over where a store was in use: a deleted or emptied ``ipam.db``
beside its marker file is an error (code 5) naming the recovery, never a blank store that hands
out addresses running containers hold; a genuinely fresh ``dataDir`` still initialises."""

from __future__ import annotations

import logging
import sqlite3

import pytest
from ipam.cni_driver import Plugin, error_of
from prometheus_client import CollectorRegistry

from node_services.ipam.reconcile import IPAMReconciler
from node_services.ipam.store import MARKER_NAME, IPAMStore
from node_services.state.store import Store

LOST = "the IPAM store was lost: running containers' reservations are unknown"


def lose(plugin: Plugin, how: str) -> None:
    db = plugin.data_dir / "ipam.db"
    if how == "truncated":
        db.write_bytes(b"")
    elif how == "deleted":
        db.unlink()
    else:  # replaced by an empty SQLite database
        db.unlink()
        sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.close()


@pytest.mark.parametrize("how", ["truncated", "deleted", "blank-sqlite"])
def test_a_lost_store_refuses_add_and_names_the_recovery(plugin: Plugin, how: str) -> None:
    assert plugin.add("c1").ips == ["10.244.7.2/24"]
    marker = plugin.data_dir / MARKER_NAME
    assert marker.read_text().startswith("node-services IPAM store initialised 20")
    lose(plugin, how)
    db = plugin.data_dir / "ipam.db"
    before = db.read_bytes() if db.exists() else b""  # (SQLite's open makes a deleted file 0 bytes)

    reply = plugin.add("c2")
    assert error_of(reply) == (5, LOST)
    details = reply.json["details"]
    assert details.startswith(f"{db} is missing or empty (")
    assert f"but {marker} says a store was in use here (node-services IPAM store" in details
    assert "restore ipam.db from a backup" in details
    assert f"delete {marker} and the next command starts an empty store" in details
    assert error_of(plugin.run("CHECK", container="c1"))[0] == 5
    status = plugin.run("STATUS", plugin.config("1.1.0"), container="")
    assert error_of(status) == (50, LOST)
    # DEL has nothing to release and must not block the pod's teardown
    deleted = plugin.run("DEL", container="c1")
    assert (deleted.returncode, deleted.stdout) == (0, "")
    assert "DEL released nothing" in deleted.stderr
    assert db.read_bytes() == before  # left as found, for the operator
    assert sorted(p.name for p in plugin.data_dir.iterdir()) == ["ipam.db", MARKER_NAME]
    assert plugin.add("c3").returncode != 0  # still refused: nothing healed it silently

    # the documented recovery, once no container holds an address: remove the marker
    marker.unlink()
    db.unlink()
    assert plugin.add("c4").ips == ["10.244.7.2/24"]
    assert marker.exists()


def test_a_fresh_data_dir_initialises_and_marks_the_store(plugin: Plugin) -> None:
    assert not plugin.data_dir.exists()
    assert plugin.add("c1").ips == ["10.244.7.2/24"]
    assert sorted(p.name for p in plugin.data_dir.iterdir()) == ["ipam.db", MARKER_NAME]


def test_a_store_made_before_the_marker_existed_gets_one(plugin: Plugin) -> None:
    assert plugin.add("c1").returncode == 0
    (plugin.data_dir / MARKER_NAME).unlink()  # as a store of an earlier version has none
    assert plugin.add("c2").ips == ["10.244.7.3/24"]
    assert (plugin.data_dir / MARKER_NAME).exists()
    lose(plugin, "truncated")
    assert error_of(plugin.add("c3")) == (5, LOST)


def test_concurrent_first_commands_on_a_fresh_dir_all_succeed(plugin: Plugin) -> None:
    # Each may find the database empty; only one creates it, none takes that for a lost store.
    procs = [plugin.popen("ADD", plugin.config(), container=f"c{n}") for n in range(8)]
    outs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 8, outs
    assert sorted(plugin.allocations().values()) == sorted(f"10.244.7.{n}" for n in range(2, 10))


async def test_the_daemon_reports_a_lost_store_once_and_its_recovery(
    plugin: Plugin, caplog: pytest.LogCaptureFixture
) -> None:
    assert plugin.add("c1").returncode == 0
    saved = (plugin.data_dir / "ipam.db").read_bytes()
    lose(plugin, "truncated")
    registry = CollectorRegistry()
    reconciler = IPAMReconciler(Store(), plugin.data_dir, "node-a", registry)
    with caplog.at_level(logging.INFO, logger="node_services.ipam.reconcile"):
        for _ in range(3):
            await reconciler.reconcile_once()
        assert registry.get_sample_value("node_services_ipam_store_lost") == 1
        assert registry.get_sample_value("node_services_ipam_reconcile_errors_total") == 3
        lost = [r for r in caplog.records if "the store was lost" in r.getMessage()]
        assert len(lost) == 1 and lost[0].levelno == logging.ERROR
        assert lost[0].exc_info is None  # a clear line, no traceback
        assert (plugin.data_dir / "ipam.db").read_bytes() == b""  # the daemon did not blank it

        (plugin.data_dir / "ipam.db").write_bytes(saved)  # restored from a backup
        await reconciler.reconcile_once()
    assert registry.get_sample_value("node_services_ipam_store_lost") == 0
    assert any("usable again" in r.getMessage() for r in caplog.records)
    assert plugin.allocations() == {("c1", "eth0"): "10.244.7.2"}


def test_overlapping_pools_of_a_changed_config_keep_exact_free_counts(plugin: Plugin) -> None:
    narrow = plugin.config(ranges=[[{"subnet": "10.244.7.0/24", "rangeEnd": "10.244.7.10"}]])
    wide = plugin.config()  # the whole /24: a second pool over the same addresses
    assert plugin.add("c1", config=narrow).ips == ["10.244.7.2/24"]
    assert plugin.add("c2", config=wide).ips == ["10.244.7.3/24"]
    assert plugin.add("c3", config=narrow).ips == ["10.244.7.4/24"]  # also taken from the wide
    assert plugin.check_store() == []
    assert plugin.run("DEL", narrow, container="c3").returncode == 0
    assert plugin.check_store() == []
    store = IPAMStore(plugin.data_dir)
    with store.transaction() as tx:
        # c1 and c2 hold .2 and .3, inside both pools: each has two addresses fewer free
        assert sorted((p.size, p.free) for p in tx.pool_stats()) == [(9, 7), (253, 251)]
    store.close()
