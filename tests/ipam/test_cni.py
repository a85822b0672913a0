"""The plugin as a runtime drives it: every command, result shapes per spec version, and the
spec's error code for every error path."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from ipam.cni_driver import Plugin, error_of

from node_services.ipam import cni
from node_services.ipam.store import IPAMStore

ROUTES = [{"dst": "0.0.0.0/0"}]


@pytest.mark.parametrize(
    ("version", "entry"),
    [
        ("0.4.0", {"address": "10.244.7.2/24", "gateway": "10.244.7.1", "version": "4"}),
        ("1.0.0", {"address": "10.244.7.2/24", "gateway": "10.244.7.1"}),
        ("1.1.0", {"address": "10.244.7.2/24", "gateway": "10.244.7.1"}),
    ],
)
def test_add_result_is_shaped_per_version(
    plugin: Plugin, version: str, entry: dict[str, str]
) -> None:
    reply = plugin.add(config=plugin.config(version, routes=ROUTES))
    assert reply.returncode == 0, reply.stdout
    assert reply.json == {"cniVersion": version, "ips": [entry], "routes": ROUTES}


def test_add_of_an_existing_attachment_returns_the_same_address(plugin: Plugin) -> None:
    first = plugin.add("c1")
    assert first.ips == ["10.244.7.2/24"]
    assert plugin.add("c1").json == first.json
    assert plugin.add("c1", ifname="net1").ips == ["10.244.7.3/24"]
    assert plugin.add("c2").ips == ["10.244.7.4/24"]
    assert plugin.allocations() == {
        ("c1", "eth0"): "10.244.7.2",
        ("c1", "net1"): "10.244.7.3",
        ("c2", "eth0"): "10.244.7.4",
    }


def test_del_is_idempotent_and_works_without_netns(plugin: Plugin) -> None:
    assert plugin.add("c1").returncode == 0
    assert plugin.add("c2").returncode == 0
    first = plugin.run("DEL", container="c1", netns="")
    assert (first.returncode, first.stdout) == (0, "")
    again = plugin.run("DEL", container="c1", netns="")
    assert (again.returncode, again.stdout) == (0, "")
    never_added = plugin.run("DEL", container="c9")
    assert (never_added.returncode, never_added.stdout) == (0, "")
    assert plugin.allocations() == {("c2", "eth0"): "10.244.7.3"}
    assert plugin.check_store() == []


def test_del_releases_even_when_the_ipam_ranges_are_now_invalid(plugin: Plugin) -> None:
    assert plugin.add("c1").returncode == 0
    broken = plugin.config(subnet="not-a-cidr")
    assert plugin.run("DEL", broken, container="c1").returncode == 0
    assert plugin.allocations() == {}


def test_check_passes_with_the_reservation_and_fails_without_it(plugin: Plugin) -> None:
    added = plugin.add("c1", config=plugin.config("1.0.0"))
    check = plugin.config("1.0.0")
    check["prevResult"] = added.json
    ok = plugin.run("CHECK", check, container="c1")
    assert (ok.returncode, ok.stdout) == (0, "")

    other = plugin.config("1.0.0")
    other["prevResult"] = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.7.99/24"}]}
    assert error_of(plugin.run("CHECK", other, container="c1")) == (
        102,
        "address 10.244.7.99 of prevResult is not reserved for container c1 interface eth0",
    )

    assert plugin.run("DEL", container="c1").returncode == 0
    assert error_of(plugin.run("CHECK", check, container="c1")) == (
        102,
        "no IP reservation for container c1 interface eth0 in network testnet",
    )


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_releases_every_attachment_not_listed(plugin: Plugin, key: str) -> None:
    for container, ifname in (("c1", "eth0"), ("c2", "eth0"), ("c2", "net1"), ("c3", "eth0")):
        assert plugin.add(container, ifname=ifname).returncode == 0
    other_network = plugin.config(name="othernet", subnet="10.99.0.0/24")
    assert plugin.add("c1", config=other_network).returncode == 0

    gc = plugin.config("1.1.0")
    gc[key] = [{"containerID": "c2", "ifname": "eth0"}, {"containerID": "c3", "ifname": "eth0"}]
    reply = plugin.run("GC", gc, container="", ifname="", netns="")
    assert (reply.returncode, reply.stdout) == (0, "")
    assert plugin.allocations() == {("c2", "eth0"): "10.244.7.3", ("c3", "eth0"): "10.244.7.5"}
    assert plugin.allocations("othernet") == {("c1", "eth0"): "10.99.0.2"}
    assert plugin.check_store() == []


def test_gc_needs_the_attachment_list_and_spec_1_1(plugin: Plugin) -> None:
    assert plugin.add("c1").returncode == 0
    code, msg = error_of(plugin.run("GC", plugin.config("1.1.0"), container=""))
    assert (code, msg) == (
        7,
        "GC needs cni.dev/valid-attachments (a list of {containerID, ifname})",
    )
    old = plugin.config("1.0.0")
    old["cni.dev/valid-attachments"] = []
    assert error_of(plugin.run("GC", old, container="")) == (
        1,
        "config version 1.0.0 does not allow GC",
    )
    assert plugin.allocations() == {("c1", "eth0"): "10.244.7.2"}


def test_status_reports_an_exhausted_pool(plugin: Plugin) -> None:
    config = plugin.config("1.1.0", subnet="10.244.9.0/30")  # one usable address: .2
    ok = plugin.run("STATUS", config, container="", ifname="", netns="")
    assert (ok.returncode, ok.stdout) == (0, "")
    assert plugin.add("c1", config=config).ips == ["10.244.9.2/30"]
    reply = plugin.run("STATUS", config, container="", ifname="", netns="")
    assert error_of(reply) == (50, "IP pool exhausted in network testnet: no free address")
    assert (
        reply.json["details"]
        == "exhausted range sets: 10.244.9.0/30:10.244.9.1-10.244.9.2:10.244.9.1"
    )
    assert plugin.run("DEL", config, container="c1").returncode == 0
    assert plugin.run("STATUS", config, container="").returncode == 0


def test_status_without_node_ranges_is_unavailable(plugin: Plugin) -> None:
    config = plugin.config("1.1.0", range="node")
    assert error_of(plugin.run("STATUS", config, container="")) == (
        50,
        "this node's pod CIDRs are not known yet: no node-services daemon has reconciled this "
        "dataDir",
    )


@pytest.mark.parametrize("stdin", [b"", b'{"cniVersion": "1.0.0"}'])
def test_version_lists_the_supported_versions(plugin: Plugin, stdin: bytes) -> None:
    reply = plugin.run("VERSION", stdin, container="", ifname="", netns="")
    assert reply.returncode == 0
    expected = "1.0.0" if stdin else "1.1.0"
    assert reply.json == {
        "cniVersion": expected,
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


def test_requested_ips_from_cni_args_args_and_runtime_config(plugin: Plugin) -> None:
    assert plugin.add("c1", args="IgnoreUnknown=1;IP=10.244.7.50").ips == ["10.244.7.50/24"]
    by_args = plugin.config()
    by_args["args"] = {"cni": {"ips": ["10.244.7.60"]}}
    assert plugin.add("c2", config=by_args).ips == ["10.244.7.60/24"]
    by_runtime = plugin.config()
    by_runtime["runtimeConfig"] = {"ips": ["10.244.7.70/24"]}
    assert plugin.add("c3", config=by_runtime).ips == ["10.244.7.70/24"]
    # requested addresses do not move the round-robin cursor
    assert plugin.add("c4").ips == ["10.244.7.2/24"]


def test_a_requested_ip_that_is_taken_or_outside_the_ranges_is_refused(plugin: Plugin) -> None:
    assert plugin.add("c1", args="IP=10.244.7.50").returncode == 0
    assert error_of(plugin.add("c2", args="IP=10.244.7.50")) == (
        101,
        "requested address 10.244.7.50 is in use by container c1 interface eth0",
    )
    assert error_of(plugin.add("c2", args="IP=10.1.2.3")) == (
        101,
        "requested IP 10.1.2.3 is in no configured range",
    )
    assert error_of(plugin.add("c2", args="IP=10.244.7.1")) == (
        101,
        "requested address 10.244.7.1 is not in range set "
        "10.244.7.0/24:10.244.7.1-10.244.7.254:10.244.7.1",
    )
    assert plugin.allocations() == {("c1", "eth0"): "10.244.7.50"}


def test_dual_stack_gets_one_address_per_range_set(plugin: Plugin) -> None:
    config = plugin.config(
        "0.4.0",
        ranges=[[{"subnet": "10.244.8.0/24"}], [{"subnet": "fd00:244:8::/64"}]],
    )
    reply = plugin.add("c1", config=config)
    assert reply.json["ips"] == [
        {"address": "10.244.8.2/24", "gateway": "10.244.8.1", "version": "4"},
        {"address": "fd00:244:8::2/64", "gateway": "fd00:244:8::1", "version": "6"},
    ]


def test_host_local_range_start_end_and_gateway_are_honoured(plugin: Plugin) -> None:
    config = plugin.config(
        ranges=[
            [
                {
                    "subnet": "10.244.7.0/24",
                    "rangeStart": "10.244.7.9",
                    "rangeEnd": "10.244.7.11",
                    "gateway": "10.244.7.10",
                }
            ]
        ]
    )
    got = [plugin.add(f"c{i}", config=config) for i in range(3)]
    assert [r.json["ips"] for r in got[:2]] == [
        [{"address": "10.244.7.9/24", "gateway": "10.244.7.10"}],
        [{"address": "10.244.7.11/24", "gateway": "10.244.7.10"}],
    ]
    assert error_of(got[2])[0] == 100


def test_range_node_uses_the_pod_cidrs_the_daemon_persisted(plugin: Plugin) -> None:
    config = plugin.config("1.0.0", range="node")
    assert error_of(plugin.add("c1", config=config)) == (
        11,
        "this node's pod CIDRs are not known yet: no node-services daemon has reconciled this "
        "dataDir",
    )
    store = IPAMStore(plugin.data_dir)
    with store.transaction() as tx:
        tx.set_node_ranges(["10.42.1.0/24", "fd00:42:1::/64"], "node-a")
    store.close()
    assert plugin.add("c1", config=config).json["ips"] == [
        {"address": "10.42.1.2/24", "gateway": "10.42.1.1"},
        {"address": "fd00:42:1::2/64", "gateway": "fd00:42:1::1"},
    ]


def test_range_node_without_ranges_says_whether_the_daemon_runs_or_stopped(
    plugin: Plugin,
) -> None:
    config = plugin.config("1.0.0", range="node")
    reply = plugin.add("c1", config=config)
    assert error_of(reply)[0] == 11
    assert reply.json["details"].startswith(
        f"check that node-services runs on this node with ipam_dir (--ipam-dir) {plugin.data_dir}"
    )
    store = IPAMStore(plugin.data_dir)
    with store.transaction() as tx:  # a daemon whose last pass was 100 s ago, every 10 s
        tx.mark_reconciled("node-a", 10.0, time.time() - 100)
    reply = plugin.add("c1", config=config)
    code, msg = error_of(reply)
    assert code == 11
    assert msg.startswith(
        "this node's pod CIDRs are not known yet: the node-services daemon stopped reconciling "
        "this dataDir 10"  # 100 s, or 101 on a slow machine
    )
    assert msg.endswith("s ago")
    assert reply.json["details"].startswith("its last pass (node node-a) was at 20")
    with store.transaction() as tx:  # a live daemon, but its node has no pod CIDRs
        tx.mark_reconciled("node-a", 10.0, time.time())
    store.close()
    reply = plugin.add("c1", config=config)
    assert error_of(reply) == (
        11,
        "this node's pod CIDRs are not known yet: the node-services daemon has none for node "
        "node-a",
    )
    assert "kubectl get node node-a -o jsonpath='{.spec.podCIDRs}'" in reply.json["details"]
    assert plugin.allocations() == {}


def test_dns_comes_from_resolv_conf(plugin: Plugin, tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# comment\nnameserver 10.43.0.10\nsearch a.svc b.svc\noptions ndots:5\n")
    reply = plugin.add(config=plugin.config(resolvConf=str(resolv)))
    assert reply.json["dns"] == {
        "nameservers": ["10.43.0.10"],
        "search": ["a.svc", "b.svc"],
        "options": ["ndots:5"],
    }


ENV_ERRORS = [
    ({"CNI_COMMAND": None}, "CNI_COMMAND must be one of ADD, DEL, CHECK, VERSION, GC, STATUS"),
    ({"CNI_COMMAND": "FROB"}, "CNI_COMMAND must be one of ADD, DEL, CHECK, VERSION, GC, STATUS"),
    ({"CNI_CONTAINERID": None}, "required environment variables missing"),
    ({"CNI_NETNS": None}, "required environment variables missing"),
    ({"CNI_IFNAME": None}, "required environment variables missing"),
    ({"CNI_PATH": None}, "required environment variables missing"),
    ({"CNI_CONTAINERID": "-bad/id"}, "invalid characters in CNI_CONTAINERID"),
    ({"CNI_CONTAINERID": "ok-but\n"}, "invalid characters in CNI_CONTAINERID"),
    ({"CNI_CONTAINERID": "b\u00e4d"}, "invalid characters in CNI_CONTAINERID"),
    ({"CNI_IFNAME": "a-very-long-ifname0"}, "invalid interface name in CNI_IFNAME"),
    ({"CNI_ARGS": "K8S_POD_NAME"}, "CNI_ARGS: 'K8S_POD_NAME' is not KEY=VALUE"),
]


@pytest.mark.parametrize(("extra", "msg"), ENV_ERRORS)
def test_bad_environment_is_code_4(plugin: Plugin, extra: dict[str, Any], msg: str) -> None:
    assert error_of(plugin.run("ADD", extra=extra)) == (4, msg)
    assert plugin.allocations() == {}


def _config_without(plugin: Plugin, key: str) -> dict[str, Any]:
    config = plugin.config()
    del config[key]
    return config


def _ipam(plugin: Plugin, **changes: Any) -> dict[str, Any]:
    config = plugin.config()
    config["ipam"].update(changes)
    return config


CONFIG_ERRORS = [
    (b"{not json", 6, "network configuration on stdin is not JSON"),
    (b"[1, 2]", 6, "network configuration must be a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, 6, "network configuration on stdin is not JSON"),
    (b'{"a": ' * 3000 + b"1" + b"}" * 3000, 6, "network configuration on stdin is not JSON"),
    ({"cniVersion": "9.9.9"}, 1, "CNI version 9.9.9 is not supported"),
    ({"cniVersion": None}, 7, "cniVersion is required"),
    ({"name": ""}, 7, "network configuration needs a name"),
    ({"ipam": "host-local"}, 7, "network configuration needs an ipam object"),
    *(
        ({"name": bad}, 7, "network name: a letter or digit, then letters, digits, '_', '.' or '-'")
        for bad in ("-net", "pod net", "n\x00", "n\ud800", "n/../x")
    ),
    ({"subnet": "10.0.0.300/24"}, 7, "ipam.subnet: '10.0.0.300/24' is not a CIDR"),
    ({"subnet": "10.0.0.0/31"}, 7, "ipam.subnet: 10.0.0.0/31 is too small (at most /30)"),
    (
        {"rangeStart": "10.9.0.1"},
        7,
        "ipam.rangeStart: 10.9.0.1 is not a usable address of 10.244.7.0/24",
    ),
    ({"gateway": "10.9.0.1"}, 7, "ipam.gateway: 10.9.0.1 is not in 10.244.7.0/24"),
    ({"range": "cluster"}, 7, 'ipam.range: the only value is "node"'),
    ({"routes": [{"gw": "10.0.0.1"}]}, 7, "ipam.routes[0]: needs dst (a CIDR)"),
    ({"dataDir": 5}, 7, "ipam.dataDir must be a directory path"),
    ({"dataDir": "/tmp/ipam\x00data"}, 7, "ipam.dataDir must be a directory path"),
    ({"dataDir": "/tmp/ipam\ud800"}, 7, "ipam.dataDir must be a directory path"),
    ({"resolvConf": ["/etc/resolv.conf"]}, 7, "ipam.resolvConf must be a file path"),
    ({"resolvConf": "/etc/\ud800"}, 7, "ipam.resolvConf must be a file path"),
    *(
        ({"lockTimeout": bad}, 7, "ipam.lockTimeout must be a number of seconds from 0 to 600")
        for bad in (float("nan"), float("inf"), float("-inf"), 1e308, 600.5, -1, "5", True)
    ),
    (
        {"ranges": [[{"subnet": "10.1.0.0/16"}], [{"subnet": "10.1.2.0/24"}]]},
        7,
        "range sets overlap: 10.1.0.0/16 and 10.1.2.0/24",
    ),
]


@pytest.mark.parametrize(("change", "code", "msg"), CONFIG_ERRORS)
def test_bad_configuration_gets_its_spec_code(
    plugin: Plugin, change: bytes | dict[str, Any], code: int, msg: str
) -> None:
    if isinstance(change, bytes):
        config: bytes | dict[str, Any] = change
    else:
        config = plugin.config()
        for key, value in change.items():
            if key in ("cniVersion", "name", "ipam"):
                config[key] = value
            else:
                config["ipam"][key] = value
        config = {k: v for k, v in config.items() if v is not None}
    assert error_of(plugin.run("ADD", config)) == (code, msg)
    assert not (plugin.data_dir / "ipam.db").exists() or plugin.allocations() == {}


def test_check_needs_spec_0_4(plugin: Plugin) -> None:
    assert error_of(plugin.run("CHECK", plugin.config("0.3.1"))) == (
        1,
        "config version 0.3.1 does not allow CHECK",
    )


def test_an_unusable_data_dir_is_an_io_failure(plugin: Plugin, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, msg = error_of(plugin.add(config=plugin.config(dataDir=str(blocker / "dir"))))
    assert (code, msg) == (5, "the IPAM store cannot be used")


def test_environment_bytes_that_are_not_utf8_are_code_4(plugin: Plugin) -> None:
    # os.environ decodes such bytes with surrogateescape; SQLite cannot store the result
    stdin = json.dumps(plugin.config()).encode()
    for key, value, msg in (
        ("CNI_ARGS", "K8S_POD_NAME=p\udcff", "CNI_ARGS is not UTF-8"),
        ("CNI_IFNAME", "eth\udcff", "invalid interface name in CNI_IFNAME"),
    ):
        env = {**plugin.env("ADD"), key: value}
        text, status = cni.respond(env, stdin)
        assert (status, json.loads(text)["code"], json.loads(text)["msg"]) == (1, 4, msg)
    assert not plugin.data_dir.exists()


def test_json_nested_too_deeply_is_a_decoding_failure_not_a_traceback(plugin: Plugin) -> None:
    reply = plugin.run("ADD", b'{"cniVersion": "1.0.0", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert error_of(reply) == (6, "network configuration on stdin is not JSON")
    assert reply.json["details"] == "JSON nested too deeply (arrays or objects ~1000 levels deep)"
    assert reply.json["cniVersion"] == "1.1.0"  # the request's version could not be read
    assert reply.stderr == ""


def test_a_lock_timeout_just_inside_the_range_is_accepted(plugin: Plugin) -> None:
    assert plugin.add("c1", config=plugin.config(lockTimeout=600)).ips == ["10.244.7.2/24"]
    assert plugin.add("c2", config=plugin.config(lockTimeout=0)).ips == ["10.244.7.3/24"]


def test_a_corrupt_database_page_is_an_io_failure(plugin: Plugin) -> None:
    assert plugin.add("c1").returncode == 0
    db = plugin.data_dir / "ipam.db"
    data = bytearray(db.read_bytes())
    assert len(data) > 4096 * 2
    data[4096:] = b"\xab" * (len(data) - 4096)  # every page after the header page
    db.write_bytes(bytes(data))
    for command in ("ADD", "DEL", "CHECK"):
        reply = plugin.run(command, container="c2")
        assert error_of(reply) == (5, "the IPAM store cannot be used"), command
        assert reply.json["details"] == f"{db}: database disk image is malformed"
        assert reply.stderr == ""
    assert db.read_bytes() == bytes(data)  # nothing was written over the evidence


def test_a_store_locked_past_the_timeout_is_try_again_later(plugin: Plugin) -> None:
    assert plugin.add("c1").returncode == 0
    holder = sqlite3.connect(plugin.data_dir / "ipam.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        reply = plugin.add("c2", config=plugin.config(lockTimeout=0.2))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert error_of(reply) == (11, "the IPAM store is busy")
    assert plugin.add("c2").ips == ["10.244.7.3/24"]


def test_error_replies_use_the_request_version(plugin: Plugin) -> None:
    config = plugin.config("0.4.0", subnet="bad")
    assert plugin.run("ADD", config).json["cniVersion"] == "0.4.0"


def test_console_script_runs_the_same_plugin(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "node-services-ipam"
    proc = subprocess.run(
        [str(script)],
        input=b"",
        env={"CNI_COMMAND": "VERSION"},
        capture_output=True,
        check=True,
    )
    assert json.loads(proc.stdout)["supportedVersions"][-1] == "1.1.0"


def test_concurrent_adds_of_one_attachment_get_one_address(plugin: Plugin) -> None:
    # The runtime must not do this, but a retry racing the first ADD must not leak.
    replies: list[Any] = []

    def add() -> None:
        replies.append(plugin.add("same"))

    threads = [threading.Thread(target=add) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in replies] == [0] * 4, [r.stdout for r in replies]
    assert [ip for r in replies for ip in r.ips] == ["10.244.7.2/24"] * 4
    assert plugin.allocations() == {("same", "eth0"): "10.244.7.2"}
