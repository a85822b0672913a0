"""Many plugin processes at once, a plugin killed mid-ADD, a pool filled to its last address,
and round robin wrapping around to released addresses."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from ipaddress import ip_address
from pathlib import Path

from ipam.cni_driver import Plugin, error_of

from node_services.ipam.store import IPAMStore


def test_200_parallel_adds_get_200_distinct_addresses(plugin: Plugin) -> None:
    config = plugin.config(subnet="10.244.0.0/23")
    procs = [plugin.popen("ADD", config, container=f"pod-{i}") for i in range(200)]
    addresses = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out, err)
        (entry,) = json.loads(out)["ips"]
        addresses.append(entry["address"])
    assert len(set(addresses)) == 200
    # exactly the first 200 allocatable addresses, each once
    expected = {f"{ip_address('10.244.0.2') + i}/23" for i in range(200)}
    assert set(addresses) == expected
    assert len(plugin.allocations()) == 200
    assert plugin.check_store() == []


def test_a_plugin_killed_in_the_middle_of_add_leaves_the_store_consistent(plugin: Plugin) -> None:
    config = plugin.config(subnet="10.244.4.0/28")
    assert plugin.add("before", config=config).ips == ["10.244.4.2/28"]
    marker = plugin.data_dir.parent / "paused"
    proc = plugin.popen(
        "ADD", config, container="victim", extra={"NODE_SERVICES_IPAM_TEST_PAUSE": str(marker)}
    )
    try:
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the plugin never reached the pause"
            time.sleep(0.01)
        assert marker.read_text() == str(proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the reservation made inside the killed transaction is gone, nothing half-done remains
    assert plugin.allocations() == {("before", "eth0"): "10.244.4.2"}
    assert plugin.check_store() == []
    # and the address the victim had picked is handed out once, not twice
    got = [plugin.add(f"after-{i}", config=config).ips[0] for i in range(3)]
    assert got == ["10.244.4.3/28", "10.244.4.4/28", "10.244.4.5/28"]
    assert plugin.add("victim", config=config).ips == ["10.244.4.6/28"]
    assert plugin.check_store() == []


def test_the_pool_fills_to_its_last_address_then_fails_clearly(plugin: Plugin) -> None:
    config = plugin.config(subnet="10.244.5.0/28")  # .2 .. .14 usable (.1 gateway, .15 last)
    got = [plugin.add(f"c{i}", config=config).ips[0] for i in range(13)]
    assert got == [f"10.244.5.{i}/28" for i in range(2, 15)]
    reply = plugin.add("one-too-many", config=config)
    assert error_of(reply) == (100, "no free IP address in network testnet")
    assert reply.json["details"] == (
        "no free address left in range set 10.244.5.0/28:10.244.5.1-10.244.5.14:10.244.5.1; "
        "release addresses (CNI DEL/GC) or widen the range"
    )
    assert plugin.check_store() == []


def test_round_robin_wraps_around_to_released_addresses(plugin: Plugin) -> None:
    config = plugin.config(subnet="10.244.6.0/29")  # .2 .. .6
    for i in range(5):
        assert plugin.add(f"c{i}", config=config).returncode == 0
    assert plugin.run("DEL", config, container="c3").returncode == 0  # .5
    assert plugin.run("DEL", config, container="c1").returncode == 0  # .3
    # after the last one handed out (.6) the next free one is found by wrapping: .3, then .5
    assert plugin.add("n1", config=config).ips == ["10.244.6.3/29"]
    assert plugin.add("n2", config=config).ips == ["10.244.6.5/29"]
    assert error_of(plugin.add("n3", config=config))[0] == 100
    assert plugin.run("DEL", config, container="c0").returncode == 0  # .2
    assert plugin.add("n3", config=config).ips == ["10.244.6.2/29"]
    assert plugin.check_store() == []


def test_processes_that_open_a_new_store_at_once_all_wait_for_its_creation(tmp_path: Path) -> None:
    # While one connection creates the store (and switches it to WAL), SQLite may answer
    # "database is locked" at once to the others instead of waiting: they must retry, not fail.
    failures: list[str] = []
    for round_ in range(150):
        directory = tmp_path / f"store-{round_}"
        barrier = threading.Barrier(6)

        def open_and_write(
            directory: Path = directory, barrier: threading.Barrier = barrier
        ) -> None:
            barrier.wait()
            store = IPAMStore(directory, timeout=30)
            try:
                with store.transaction():
                    pass
            except Exception as exc:
                failures.append(repr(exc))
            finally:
                store.close()

        threads = [threading.Thread(target=open_and_write) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
