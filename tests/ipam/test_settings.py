"""The daemon's IPAM settings and when the reconcile runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import DaemonProcess

from node_services.config import ConfigError, load_settings

Start = Callable[..., DaemonProcess]


def test_ipam_settings_from_yaml_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("ipam: on\nipam_leak_grace: 30\n")  # YAML reads a bare `on` as true
    settings = load_settings(
        config_file=config, environ={"NODE_SERVICES_IPAM_RECONCILE_INTERVAL": "2.5"}
    )
    assert (settings.ipam, settings.ipam_leak_grace, settings.ipam_reconcile_interval) == (
        "on",
        30.0,
        2.5,
    )
    assert load_settings(environ={}).ipam == "auto"
    assert load_settings(environ={}).ipam_leak_grace == 600.0


def test_bad_ipam_settings_are_all_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            environ={
                "NODE_SERVICES_IPAM": "sometimes",
                "NODE_SERVICES_IPAM_LEAK_GRACE": "-1",
                "NODE_SERVICES_IPAM_RECONCILE_INTERVAL": "0",
            }
        )
    assert sorted(caught.value.problems) == [
        "environment: NODE_SERVICES_IPAM: 'sometimes' is not one of auto, on, off",
        "environment: NODE_SERVICES_IPAM_LEAK_GRACE: must not be negative",
        "environment: NODE_SERVICES_IPAM_RECONCILE_INTERVAL: must be positive",
    ]


def test_auto_runs_the_reconcile_only_when_the_ipam_dir_exists(
    daemon: Start, tmp_path: Path
) -> None:
    missing = tmp_path / "not-here"
    node = daemon("--ipam-dir", str(missing))
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="readiness")
    assert "node_services_ipam_" not in node.get("/metrics")[1]
    assert not missing.exists()

    present = tmp_path / "ipam"
    present.mkdir()
    other = daemon("--ipam-dir", str(present))
    other.wait_for(lambda: (present / "ipam.db").exists(), what="the store")
    other.wait_for(
        lambda: "node_services_ipam_node_ranges 0.0" in other.get("/metrics")[1],
        what="ipam metrics",
    )
