"""The metadata settings: parsing, errors, and the access log switch on a real daemon."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import http_get
from metadata_helpers import MetadataDaemon

from node_services.config import ConfigError, load_settings


def test_metadata_settings_from_the_environment() -> None:
    settings = load_settings(
        environ={
            "NODE_SERVICES_METADATA_TRUSTED_PROXIES": "10.0.0.7, 10.1.0.0/16 fd00::1",
            "NODE_SERVICES_METADATA_ACCESS_LOG": "yes",
            "NODE_SERVICES_METADATA_ENVIRONMENT_NAME": "Prod",
            "NODE_SERVICES_METADATA_ENVIRONMENT_UUID": "1a5",
            "NODE_SERVICES_METADATA_REGION_NAME": "eu",
            "NODE_SERVICES_METADATA_CACHE_BYTES": "1048576",
            "NODE_SERVICES_METADATA_PREPARE_ABOVE": "0",
        },
        check_files=False,
    )
    assert (settings.metadata_cache_bytes, settings.metadata_prepare_above) == (1048576, 0)
    assert settings.metadata_trusted_proxies == ("10.0.0.7/32", "10.1.0.0/16", "fd00::1/128")
    assert settings.metadata_access_log is True
    assert (
        settings.metadata_environment_name,
        settings.metadata_environment_uuid,
        settings.metadata_region_name,
    ) == ("Prod", "1a5", "eu")
    defaults = load_settings(environ={}, check_files=False)
    assert defaults.metadata_trusted_proxies == ()
    assert defaults.metadata_access_log is False
    assert (defaults.metadata_cache_bytes, defaults.metadata_prepare_above) == (32 << 20, 5000)
    assert (defaults.metadata_environment_name, defaults.metadata_region_name) == (
        "Default",
        "local",
    )


def test_bad_metadata_settings_are_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            environ={
                "NODE_SERVICES_METADATA_TRUSTED_PROXIES": "10.0.0.7,proxy.example",
                "NODE_SERVICES_METADATA_ACCESS_LOG": "sometimes",
                "NODE_SERVICES_METADATA_CACHE_BYTES": "32M",
                "NODE_SERVICES_METADATA_PREPARE_ABOVE": "-1",
            },
            check_files=False,
        )
    assert caught.value.problems == [
        "environment: NODE_SERVICES_METADATA_TRUSTED_PROXIES: 'proxy.example' is not an IP "
        "address or CIDR",
        "environment: NODE_SERVICES_METADATA_ACCESS_LOG: 'sometimes' is not true or false",
        "environment: NODE_SERVICES_METADATA_CACHE_BYTES: '32M' is not a whole number",
        "environment: NODE_SERVICES_METADATA_PREPARE_ABOVE: '-1' is not a whole number",
    ]


def test_the_access_log_is_off_by_default_and_on_when_set(
    metadata_daemon: Callable[..., MetadataDaemon],
) -> None:
    quiet = metadata_daemon()
    loud = metadata_daemon(env={"NODE_SERVICES_METADATA_ACCESS_LOG": "true"})
    for daemon in (quiet, loud):
        assert http_get(daemon.url + "/latest/region_name") == (200, "local")
    loud.process.wait_for(
        lambda: '"GET /latest/region_name HTTP/1.1" 200' in loud.process.output(),
        what="the access log line",
    )
    assert "/latest/region_name" not in quiet.process.output()
