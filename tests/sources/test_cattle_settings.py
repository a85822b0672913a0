"""The Cattle settings: accepted as the source needs them, every problem named, the secret
never printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from node_services.config import ConfigError, load_settings, unsupported

URL = "https://rancher.example:8443/v2-beta/projects/1a5"


def make_ca(tmp_path: Path) -> Path:
    """A real self-signed PEM certificate (check-config loads the CA file)."""
    ca, key = tmp_path / "ca.pem", tmp_path / "ca.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=rancher", "-keyout", str(key), "-out", str(ca)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return ca


def test_a_project_url_with_keys_and_a_ca_file(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    settings = load_settings(
        environ={
            "CATTLE_URL": URL,
            "CATTLE_ACCESS_KEY": "AK1",
            "CATTLE_SECRET_KEY": "s3cret",
            "NODE_SERVICES_CATTLE_CA_FILE": str(ca),
        }
    )
    assert (settings.cattle_url, settings.cattle_ca_file) == (URL, ca)
    assert unsupported(settings) == []


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        (
            {"CATTLE_URL": "http://rancher:8080/v1"},
            "cattle_url: 'http://rancher:8080/v1' is the /v1 URL Rancher injects into "
            "agent.role=environment containers; use the project URL "
            "<server>/v2-beta/projects/<id>, like http://rancher:8080/v2-beta/projects/1a5",
        ),
        (
            {"CATTLE_URL": "http://rancher:8080/v2-beta"},
            "cattle_url: 'http://rancher:8080/v2-beta' is not a project-scoped v2-beta URL like "
            "http://rancher:8080/v2-beta/projects/1a5 (as Rancher shows for environment API keys)",
        ),
        (
            {"CATTLE_URL": "http://AK1:s3cret@rancher:8080/v2-beta/projects/1a5"},
            "cattle_url: holds credentials (user:password@host): remove them and set the API "
            "key pair with CATTLE_ACCESS_KEY / CATTLE_SECRET_KEY",
        ),
        (
            {"CATTLE_URL": "http://s3cret@rancher:8080/v2-beta/projects/1a5"},
            "cattle_url: holds credentials (user:password@host): remove them and set the API "
            "key pair with CATTLE_ACCESS_KEY / CATTLE_SECRET_KEY",
        ),
        (
            {"CATTLE_URL": URL, "CATTLE_SECRET_KEY": "s3cret"},
            "cattle_access_key: missing (set both Cattle API keys, or neither)",
        ),
        (
            {"CATTLE_URL": URL, "NODE_SERVICES_CATTLE_CA_FILE": "/nonexistent/ca.pem"},
            "cattle_ca_file: /nonexistent/ca.pem: no such file",
        ),
        (
            {"NODE_SERVICES_CATTLE_CA_FILE": "/etc/hostname"},
            "cattle_ca_file: set, but cattle_url is not an https:// URL",
        ),
    ],
)
def test_problems_are_named(environ: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(environ=environ)
    assert error.value.problems == [problem]
    assert "s3cret" not in str(error.value)


def test_check_config_accepts_them_and_hides_the_secret() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CATTLE_", "NODE_SERVICES_"))}
    env.update(CATTLE_URL=URL, CATTLE_ACCESS_KEY="AK1", CATTLE_SECRET_KEY="s3cret")
    result = subprocess.run(
        [sys.executable, "-m", "node_services", "check-config"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"  cattle_url: {URL}\n" in result.stdout
    assert "  cattle_access_key: AK1\n" in result.stdout
    assert "  cattle_secret_key: (set)\n" in result.stdout
    assert "s3cret" not in result.stdout + result.stderr


def test_a_ca_file_that_is_not_pem_is_named(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    with pytest.raises(ConfigError) as error:
        load_settings(environ={"CATTLE_URL": URL, "NODE_SERVICES_CATTLE_CA_FILE": str(ca)})
    [problem] = error.value.problems
    assert problem.startswith(f"cattle_ca_file: {ca}: not a usable PEM CA bundle (")


def test_check_config_refuses_a_url_with_credentials_without_printing_them() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CATTLE_", "NODE_SERVICES_"))}
    env.update(CATTLE_URL="http://AK1:s3cret@rancher:8080/v2-beta/projects/1a5")
    result = subprocess.run(
        [sys.executable, "-m", "node_services", "check-config"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert result.returncode == 1, result.stderr  # check-config: 1 = invalid configuration
    assert "cattle_url: holds credentials" in result.stderr
    assert "s3cret" not in result.stdout + result.stderr
