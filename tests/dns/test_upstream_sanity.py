"""Upstream sanity: upstreams and stub zones are validated by `run` and `check-config` with
the entry at fault named; resolv.conf naming only systemd-resolved's stub falls back to
resolved's own list; no upstream anywhere is an ERROR naming the setting, and the REFUSED
answers it causes are counted."""

from __future__ import annotations

import logging
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.asyncquery
import dns.flags
import dns.message
import pytest
from dnshelpers import FakeUpstream, pod, rcode
from dnsserve import first
from dnsserve import start_from_settings as start
from helpers import free_port

from node_services.config import Address, ConfigError, ForwardZone, load_settings
from node_services.dns.service import resolved_upstreams, upstreams_of

UPSTREAM_NOT_IP = (
    "'banana' is not an IP address (an upstream is IP[:PORT] or [IPv6]:PORT; host names are "
    "not resolved)"
)


def node_services(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it, on loopback ports (the daemon never starts here:
    every case is a configuration it refuses)."""
    ports = []
    if args[0] == "run":
        ports = [
            "--dns-listen",
            f"127.0.0.1:{free_port()}",
            "--admin-listen",
            f"127.0.0.1:{free_port()}",
            "--metadata-listen",
            f"127.0.0.1:{free_port()}",
        ]
    return subprocess.run(
        [sys.executable, "-m", "node_services", *args, "--node-name", "n", *ports],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


BAD_FLAGS = [
    (["--upstream", "banana"], f"flags: --upstream: {UPSTREAM_NOT_IP}"),
    (
        ["--upstream", "127.0.0.1:99999"],
        "flags: --upstream: '127.0.0.1:99999': port must be a number from 1 to 65535",
    ),
    (
        ["--upstream", "127.0.0.1:0"],
        "flags: --upstream: '127.0.0.1:0': port must be a number from 1 to 65535",
    ),
    (
        ["--dns-forward-zone", "consul=banana,127.0.0.1:70000"],
        f"flags: --dns-forward-zone: zone 'consul.': {UPSTREAM_NOT_IP}; zone 'consul.': "
        "'127.0.0.1:70000': port must be a number from 1 to 65535",
    ),
    (
        ["--dns-forward-zone", "consul"],
        "flags: --dns-forward-zone: entry 'consul': expected "
        "ZONE=IP[:PORT][,IP[:PORT]...][,timeout=SECONDS]",
    ),
    (
        ["--dns-forward-zone", "bad..zone=127.0.0.9"],
        "flags: --dns-forward-zone: 'bad..zone' is not a valid DNS zone",
    ),
    (["--dns-forward-zone", "consul="], "flags: --dns-forward-zone: zone 'consul.': no upstreams"),
    (
        ["--dns-forward-zone", "consul=127.0.0.9,timeout=soon"],
        "flags: --dns-forward-zone: zone 'consul.': timeout 'soon' is not a number of seconds",
    ),
    (
        ["--dns-forward-zone", "consul=127.0.0.9,timeout=0"],
        "flags: --dns-forward-zone: zone 'consul.': timeout must be more than 0 and at most 60 "
        "seconds",
    ),
    (
        ["--dns-forward-zone", "consul=127.0.0.9", "--dns-forward-zone", "Consul.=127.0.0.10"],
        "flags: --dns-forward-zone: zone 'consul.' is given twice",
    ),
    (
        ["--dns-forward-zone", "svc.cluster.local=127.0.0.9"],
        "dns_forward_zones: zone 'svc.cluster.local.' is inside the cluster domain "
        "'cluster.local.', which this server answers itself: its names are never forwarded",
    ),
    (
        ["--dns-forward-zone", "rancher.internal=127.0.0.9"],
        "dns_forward_zones: zone 'rancher.internal.' is inside the zone 'rancher.internal.', "
        "which this server answers itself: its names are never forwarded",
    ),
    (
        ["--dns-forward-zone", ".=127.0.0.9", "--upstream", "127.0.0.10"],
        "dns_forward_zones: zone '.' sets the default upstreams, and so does upstreams: set "
        "only one of them",
    ),
]


@pytest.mark.parametrize(("flags", "problem"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_upstreams_stop_run_and_fail_check_config(flags: list[str], problem: str) -> None:
    run = node_services("run", *flags)
    assert run.returncode == 2, run.stderr
    assert run.stderr == f"node-services: invalid configuration:\n  {problem}\n"
    check = node_services("check-config", *flags)
    assert check.returncode == 1, check.stderr
    assert check.stderr == f"node-services: invalid configuration:\n  {problem}\n"


def test_a_bad_stub_zone_in_the_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "dns_forward_zones:\n"
        "  consul: [127.0.0.9:8600]\n"
        "  corp.example: {upstreams: [10.1.0.53], timout: 1}\n"
        "  lab.example: 10.2.0.53:5353 dns.lab.example\n"
    )
    check = node_services("check-config", str(config))
    assert check.returncode == 1
    assert check.stderr == (
        "node-services: invalid configuration:\n"
        f"  {config}: dns_forward_zones: zone 'corp.example.': unknown key 'timout' (expected "
        "upstreams, timeout); zone 'lab.example.': 'dns.lab.example' is not an IP address (an "
        "upstream is IP[:PORT] or [IPv6]:PORT; host names are not resolved)\n"
    )


def test_stub_zones_read_alike_from_yaml_environment_and_flags(tmp_path: Path) -> None:
    expected = (
        ForwardZone("consul.", (Address("127.0.0.9", 8600),)),
        ForwardZone("corp.example.", (Address("10.1.0.53", 53), Address("fd00::53", 5353)), 1.5),
        ForwardZone("10.in-addr.arpa.", (Address("10.0.0.2", 53),)),
        ForwardZone(".", (Address("10.0.0.3", 53),), 0.5),
    )
    config = tmp_path / "config.yaml"
    config.write_text(
        "dns_forward_zones:\n"
        "  Consul.: ['127.0.0.9:8600']\n"
        "  corp.example: {upstreams: [10.1.0.53, '[fd00::53]:5353'], timeout: 1.5}\n"
        "  10.in-addr.arpa: 10.0.0.2\n"
        "  '.': {upstreams: [10.0.0.3], timeout: 0.5}\n"
    )
    environ = {"NODE_NAME": "n"}
    assert load_settings(config_file=config, environ=environ).dns_forward_zones == expected
    text = (
        "consul=127.0.0.9:8600; corp.example=10.1.0.53,[fd00::53]:5353,timeout=1.5;"
        "10.in-addr.arpa.=10.0.0.2;.=10.0.0.3,timeout=0.5"
    )
    env = load_settings(environ={**environ, "NODE_SERVICES_DNS_FORWARD_ZONES": text})
    assert env.dns_forward_zones == expected
    flags = load_settings(environ=environ, overrides={"dns_forward_zones": text.split(";")})
    assert flags.dns_forward_zones == expected
    # what check-config prints is what the environment variable takes back
    printed = ";".join(str(zone) for zone in expected)
    assert printed == (
        "consul.=127.0.0.9:8600;corp.example.=10.1.0.53:53,[fd00::53]:5353,timeout=1.5;"
        "10.in-addr.arpa.=10.0.0.2:53;.=10.0.0.3:53,timeout=0.5"
    )
    again = load_settings(environ={**environ, "NODE_SERVICES_DNS_FORWARD_ZONES": printed})
    assert again.dns_forward_zones == expected
    check = node_services("check-config", str(config))
    assert check.returncode == 0, check.stderr
    assert f"  dns_forward_zones: {printed}\n" in check.stdout


def test_upstream_host_names_are_refused_in_every_layer(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("upstreams: [10.0.0.2, dns.google]\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(
            config_file=config,
            environ={"NODE_NAME": "n", "NODE_SERVICES_UPSTREAMS": "10.0.0.2 resolver.corp"},
        )
    assert caught.value.problems == [
        f"{config}: upstreams: 'dns.google' is not an IP address (an upstream is IP[:PORT] or "
        "[IPv6]:PORT; host names are not resolved)",
        "environment: NODE_SERVICES_UPSTREAMS: 'resolver.corp' is not an IP address (an "
        "upstream is IP[:PORT] or [IPv6]:PORT; host names are not resolved)",
    ]


# -- resolv.conf, systemd-resolved, no upstream at all -----------------------------------


def defaults(tmp_path: Path, resolv: str, resolved: str | None) -> tuple[tuple[str, int], ...]:
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(resolv)
    resolved_conf = tmp_path / "resolved.conf"
    if resolved is not None:
        resolved_conf.write_text(resolved)
    settings = load_settings(environ={"NODE_NAME": "n"})
    return upstreams_of(settings, resolv_conf=resolv_conf, resolved_conf=resolved_conf)


SYSTEMD_STUB = (
    "# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).\n"
    "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.example\n"
)
SYSTEMD_UPLINK = (
    "# This is /run/systemd/resolve/resolv.conf managed by man:systemd-resolved(8).\n"
    "nameserver 10.0.0.2\nnameserver fe80::1%enp1s0\nnameserver 127.0.0.53\nsearch corp.example\n"
)


def test_systemd_resolved_stub_falls_back_to_its_own_upstream_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "node_services.dns.service")
    assert defaults(tmp_path, SYSTEMD_STUB, SYSTEMD_UPLINK) == (("10.0.0.2", 53), ("fe80::1", 53))
    assert (
        f"dns: {tmp_path}/resolv.conf names only the loopback stub 127.0.0.53; forwarding to "
        f"the upstreams of {tmp_path}/resolved.conf (systemd-resolved's): 10.0.0.2:53, "
        "fe80::1:53" in caplog.text
    )
    # a resolv.conf with real nameservers is used as it is, resolved's list is not read
    assert defaults(tmp_path, "nameserver 10.0.0.7\nnameserver 127.0.0.53\n", SYSTEMD_UPLINK) == (
        ("10.0.0.7", 53),
    )
    assert resolved_upstreams(tmp_path / "missing") == ()


NO_UPSTREAM = (
    "dns: no upstream DNS servers: {found}, so names outside the cluster zones are answered "
    "REFUSED (counted in node_services_dns_forward_no_upstream_total). Set the upstreams to "
    "forward to: config key upstreams, environment NODE_SERVICES_UPSTREAMS or flag --upstream "
    "(IP[:PORT])"
)


def test_no_upstream_anywhere_is_an_error_naming_the_setting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert defaults(tmp_path, SYSTEMD_STUB, None) == ()
    found = (
        f"{tmp_path}/resolv.conf names only the loopback stub 127.0.0.53 and "
        f"{tmp_path}/resolved.conf names no other nameserver"
    )
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [NO_UPSTREAM.format(found=found)]
    caplog.clear()
    assert defaults(tmp_path, "search corp.example\n", "nameserver 10.0.0.2\n") == ()
    found = f"{tmp_path}/resolv.conf names no nameserver"
    assert [r.getMessage() for r in caplog.records] == [NO_UPSTREAM.format(found=found)]


@pytest.fixture
def port53_upstream() -> Iterator[FakeUpstream]:
    """A fake upstream on port 53 of a loopback address of its own (resolv.conf files name
    no port); needs root to bind it."""
    import os

    if os.geteuid() != 0:
        pytest.skip("binding port 53 needs root")
    for _ in range(20):
        host = f"127.0.53.{random.randint(2, 250)}"
        try:
            server = FakeUpstream(
                host=host, port=53, records={("www.example.org.", "A"): ["192.0.2.10"]}
            ).start()
        except OSError:
            continue
        yield server
        server.stop()
        return
    pytest.skip("no free loopback address for port 53")


async def test_the_daemon_forwards_to_systemd_resolved_upstreams(
    tmp_path: Path, port53_upstream: FakeUpstream
) -> None:
    uplink = f"nameserver {port53_upstream.host}\nnameserver 127.0.0.53\n"
    s = await start(tmp_path, resolv=SYSTEMD_STUB, resolved=uplink)
    try:
        assert s.server.forwarder is not None
        assert s.server.forwarder.upstreams == ((port53_upstream.host, 53),)
        assert first(await s.query("www.example.org", "A")) == ["192.0.2.10"]
        assert [q for q in port53_upstream.queries if q[2] == "A"] == [
            ("udp", "www.example.org.", "A")
        ]
    finally:
        await s.server.stop()


async def test_no_upstream_refuses_outside_names_and_counts_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = await start(  # and no systemd-resolved list; a pod with a view (autopath on)
        tmp_path, [pod("default", "caller", "127.0.0.9")], resolv=SYSTEMD_STUB, dns_autopath="on"
    )
    try:
        for name in ("www.example.org", "example.com"):
            reply = await s.query(name, "A")
            assert rcode(reply) == "REFUSED"
            assert not reply.flags & dns.flags.RA
        assert rcode(await s.query("nope.rancher.internal", "A")) == "NXDOMAIN"  # ours
        assert s.metric("node_services_dns_forward_no_upstream_total") == 2
        # A pod of this node (it has a view and a per-view answer cache): each ask counts.
        for _ in range(2):
            message = dns.message.make_query("www.example.org", "A")
            reply = await dns.asyncquery.udp(
                message, "127.0.0.1", port=s.port, timeout=3, source="127.0.0.9"
            )
            assert rcode(reply) == "REFUSED"
        assert s.metric("node_services_dns_forward_no_upstream_total") == 4
        assert "dns: no upstream DNS servers: " in caplog.text
        assert "Set the upstreams to forward to: config key upstreams" in caplog.text
    finally:
        await s.server.stop()
