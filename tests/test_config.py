"""Settings: file < environment < flags; every problem reported at once; documented keys."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from helpers import DEMO_SNAPSHOT, ROOT

from node_services import __version__
from node_services.config import (
    Address,
    ConfigError,
    Settings,
    describe_settings,
    env_name,
    load_settings,
    parse_address,
)


def test_defaults() -> None:
    settings = load_settings(environ={"NODE_NAME": "n1"})
    assert settings == Settings(node_name="n1")
    assert [str(a) for a in settings.dns_listen] == ["0.0.0.0:53"]
    assert str(settings.metadata_listen) == "169.254.169.250:80"


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "cluster_domain: file.local\ndns_ttl: 30\nlog_level: debug\n"
        "upstreams: [127.0.0.53, '[::1]:5353']\n"
    )
    settings = load_settings(
        config_file=config,
        environ={
            "NODE_SERVICES_DNS_TTL": "10",
            "NODE_SERVICES_LOG_LEVEL": "warning",
            "NODE_NAME": "n",
        },
        overrides={"log_level": "error"},
    )
    assert settings.cluster_domain == "file.local"
    assert settings.dns_ttl == 10
    assert settings.log_level == "error"
    assert settings.upstreams == (Address("127.0.0.53", 53), Address("::1", 5353))


def test_cattle_settings_from_the_conventional_environment() -> None:
    settings = load_settings(
        environ={
            "CATTLE_URL": "http://rancher:8080/v2-beta/projects/1a5",
            "CATTLE_ACCESS_KEY": "ak",
            "CATTLE_SECRET_KEY": "sk",
            "NODE_NAME": "n",
        }
    )
    assert (settings.cattle_url, settings.cattle_access_key, settings.cattle_secret_key) == (
        "http://rancher:8080/v2-beta/projects/1a5",
        "ak",
        "sk",
    )


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "dns_listen: 127.0.0.1:99999\n"
        "dns_ttl: five\n"
        "pod_records: sometimes\n"
        "cluster_domain: -bad-.local\n"
        "snapshots: [/nonexistent/snap.yaml]\n"
        "colour: blue\n"
        "cattle_access_key: ak\n"
    )
    with pytest.raises(ConfigError) as error:
        load_settings(config_file=config, environ={"NODE_SERVICES_OVERLAY": "ipsec"})
    assert error.value.problems == [
        f"{config}: unknown key 'colour'",
        f"{config}: dns_listen: '127.0.0.1:99999': port must be a number from 0 to 65535",
        f"{config}: dns_ttl: 'five' is not a whole number of seconds",
        f"{config}: pod_records: 'sometimes' is not one of disabled, insecure, verified",
        f"{config}: cluster_domain: '-bad-.local' is not a valid DNS domain",
        "environment: NODE_SERVICES_OVERLAY: 'ipsec' is not one of none, vxlan, host-gw, wireguard",
        "snapshots: /nonexistent/snap.yaml: no such file",
        "cattle_access_key/cattle_secret_key are set but cattle_url is not",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:53", Address("127.0.0.1", 53)),
        ("[::1]:5353", Address("::1", 5353)),
        ("localhost:80", Address("localhost", 80)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


def test_parse_address_defaults_and_errors() -> None:
    assert parse_address("::1", default_port=53) == Address("::1", 53)
    assert parse_address("10.0.0.1", default_port=53) == Address("10.0.0.1", 53)
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_address("10.0.0.1")
    with pytest.raises(ValueError, match="missing"):
        parse_address("[::1:53")


def test_every_settings_key_is_documented_in_the_reference_and_the_docs() -> None:
    reference = describe_settings()
    docs = (ROOT / "docs" / "configuration.md").read_text()
    for f in fields(Settings):
        assert f"{f.name}  (env {env_name(f.name)}" in reference
        assert f"`{f.name}`" in docs, f"docs/configuration.md lacks {f.name}"
    # each key has a description line under it
    assert reference.count("\n    ") >= len(fields(Settings))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node_services", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin", "NODE_NAME": "n"},
    )


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"snapshots: [{DEMO_SNAPSHOT}]\ndns_listen: 127.0.0.1:5353\n")
    result = cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: ok\n")
    assert "  dns_listen: 127.0.0.1:5353\n" in result.stdout


def test_check_config_lists_every_error_and_fails(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("dns_ttl: -1\noverlay: ipsec\n")
    result = cli("check-config", str(config))
    assert result.returncode == 1
    assert result.stderr == (
        "node-services: invalid configuration:\n"
        f"  {config}: dns_ttl: -1 is not a whole number of seconds\n"
        f"  {config}: overlay: 'ipsec' is not one of none, vxlan, host-gw, wireguard\n"
    )


def test_check_config_validates_the_cattle_settings(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "overlay: host-gw\ncattle_url: http://127.0.0.1:9/v2-beta\ncattle_access_key: ak\n"
        f"cattle_ca_file: {tmp_path / 'ca.pem'}\n"
    )
    result = cli("check-config", str(config))
    assert result.returncode == 1
    assert result.stderr == (
        "node-services: invalid configuration:\n"
        "  cattle_url: 'http://127.0.0.1:9/v2-beta' is not a project-scoped v2-beta URL like "
        "http://rancher:8080/v2-beta/projects/1a5 (as Rancher shows for environment API keys)\n"
        "  cattle_secret_key: missing (set both Cattle API keys, or neither)\n"
        "  cattle_ca_file: set, but cattle_url is not an https:// URL\n"
    )


def test_check_config_reports_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    missing = cli("check-config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1
    assert f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory" in missing.stderr
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    result = cli("check-config", str(listy))
    assert f"{listy}: expected a mapping of settings, got list" in result.stderr


def test_version_flag_and_command() -> None:
    assert cli("--version").stdout == f"node-services {__version__}\n"
    assert cli("version").stdout == f"node-services {__version__}\n"


def test_run_help_names_every_runtime_contract_flag() -> None:
    help_text = cli("run", "--help").stdout
    for flag in (
        "--config", "--snapshot", "--node-name", "--dns-listen", "--metadata-listen",
        "--admin-listen", "--cluster-domain", "--dns-ttl", "--upstream", "--pod-records",
        "--kubeconfig", "--ipam-dir", "--overlay", "--overlay-interface",
    ):  # fmt: skip
        assert flag in help_text


def test_run_with_a_bad_flag_value_exits_2_with_the_reason() -> None:
    result = cli("run", "--dns-ttl", "soon")
    assert result.returncode == 2
    assert "flags: --dns-ttl: 'soon' is not a whole number of seconds" in result.stderr


@pytest.mark.parametrize(
    ("written", "read"),
    [("auto", "auto"), ("on", "on"), ("OFF", "off"), ("true", "on"), ("false", "off")],
)
def test_tx_checksum_offload_reads_a_mode_or_a_boolean(written: str, read: str) -> None:
    settings = load_settings(
        environ={"NODE_NAME": "n", "NODE_SERVICES_OVERLAY_TX_CHECKSUM_OFFLOAD": written}
    )
    assert settings.overlay_tx_checksum_offload == read


def test_tx_checksum_offload_from_a_yaml_boolean_and_a_bad_value(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("overlay_tx_checksum_offload: yes\n")
    settings = load_settings(config_file=config, environ={"NODE_NAME": "n"})
    assert settings.overlay_tx_checksum_offload == "on"
    config.write_text("overlay_tx_checksum_offload: sometimes\n")
    with pytest.raises(ConfigError, match="'sometimes' is not one of auto, on, off"):
        load_settings(config_file=config, environ={"NODE_NAME": "n"})
