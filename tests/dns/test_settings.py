"""DNS settings: flags, validation, upstream defaults (resolv.conf minus loopback stubs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from node_services.config import Address, ConfigError, Settings, load_settings
from node_services.dns.service import (
    build_dns,
    nameservers_of,
    search_domains_from_resolv_conf,
    upstreams_of,
)


def test_dns_flags_and_environment() -> None:
    settings = load_settings(
        environ={
            "NODE_NAME": "n",
            "NODE_SERVICES_DNS_CACHE_SIZE": "50",
            "NODE_SERVICES_DNS_ANSWER_CACHE_SIZE": "0",
        },
        overrides={
            "dns_query_log": "true",
            "dns_forward_timeout": "0.5",
            "dns_max_forwards": "7",
        },
    )
    assert settings.dns_query_log is True
    assert settings.dns_forward_timeout == 0.5
    assert settings.dns_cache_size == 50
    assert settings.dns_answer_cache_size == 0
    assert settings.dns_max_forwards == 7
    assert settings.dns_negative_ttl_cap == 300


def test_bad_dns_values_are_reported_together() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            environ={"NODE_NAME": "n"},
            overrides={
                "dns_forward_timeout": "0",
                "dns_max_forwards": "0",
                "dns_cache_size": "lots",
                "dns_answer_cache_size": "-1",
                "dns_query_log": "maybe",
            },
        )
    text = "\n".join(caught.value.problems)
    assert "dns_forward_timeout: must be more than 0 and at most 60 seconds" in text
    assert "dns_max_forwards: must be at least 1" in text
    assert "dns_cache_size: 'lots' is not a whole number" in text
    assert "dns_answer_cache_size: '-1' is not a whole number" in text
    assert "dns_query_log: 'maybe' is not true or false" in text


def test_resolv_conf_without_loopback_stubs(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "# generated\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch example.org\n"
        "nameserver ::1\nnameserver fe80::1%eth0\noptions edns0\n"
    )
    settings = Settings(node_name="n")
    assert upstreams_of(settings, resolv_conf=resolv) == (("10.0.0.2", 53), ("fe80::1", 53))
    assert nameservers_of(resolv) == ("127.0.0.53", "10.0.0.2", "::1", "fe80::1")
    assert nameservers_of(tmp_path / "missing") == ()


def test_own_listen_address_is_never_an_upstream() -> None:
    settings = load_settings(
        environ={"NODE_NAME": "n"},
        overrides={"dns_listen": "127.0.0.5:5300", "upstreams": ["127.0.0.5:5300", "127.0.0.6"]},
    )
    assert settings.upstreams == (Address("127.0.0.5", 5300), Address("127.0.0.6", 53))
    assert upstreams_of(settings) == (("127.0.0.6", 53),)


def test_build_registers_metrics_and_sets_forwarding() -> None:
    from node_services.state.store import Store

    registry = CollectorRegistry()
    settings = load_settings(environ={"NODE_NAME": "n"}, overrides={"upstreams": ["127.0.0.6"]})
    server = build_dns(settings, Store(), registry)
    assert server.forwarder is not None and server.zone.forwarding
    assert registry.get_sample_value("node_services_dns_cache_entries", {"zone": "."}) == 0


def test_busy_dns_address_stops_start_with_the_address_named() -> None:
    import socket
    import subprocess
    import sys

    from helpers import free_port

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "node_services",
                "run",
                "--node-name",
                "n",
                "--dns-listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                f"127.0.0.1:{free_port()}",
                "--metadata-listen",
                f"127.0.0.1:{free_port()}",
                "--upstream",
                "127.0.0.1:1",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert (
        f"cannot start: dns_listen 127.0.0.1:{port}: cannot listen: Address already in use"
        in result.stderr
    )


def test_dns_autopath_setting(tmp_path: Path) -> None:
    assert load_settings(environ={"NODE_NAME": "n"}).dns_autopath == "off"
    on = load_settings(environ={"NODE_NAME": "n", "NODE_SERVICES_DNS_AUTOPATH": "ON"})
    assert on.dns_autopath == "on"
    config = tmp_path / "config.yaml"
    config.write_text("dns_autopath: on\n")  # YAML 1.1 reads a bare on as true
    assert load_settings(config_file=config, environ={"NODE_NAME": "n"}).dns_autopath == "on"
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"NODE_NAME": "n", "NODE_SERVICES_DNS_AUTOPATH": "maybe"})
    assert "NODE_SERVICES_DNS_AUTOPATH: 'maybe' is not one of off, on" in str(caught.value)


def test_host_search_domains_from_resolv_conf(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.0.0.1\ndomain old.example\nsearch corp.example. lab.example\n")
    assert search_domains_from_resolv_conf(resolv) == ("corp.example", "lab.example")
    assert search_domains_from_resolv_conf(tmp_path / "missing") == ()
