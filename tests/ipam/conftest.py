"""Fixtures of the IPAM tests: the plugin installed by its own --install in a CNI_PATH dir."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ipam.cni_driver import Plugin


@pytest.fixture(scope="session")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin installed once with ``node-services-ipam --install DIR``."""
    directory = tmp_path_factory.mktemp("cni-bin")
    subprocess.run(
        [sys.executable, "-m", "node_services.ipam.cni", "--install", str(directory)],
        check=True,
        capture_output=True,
    )
    return directory / "node-services-ipam"


@pytest.fixture
def plugin(tmp_path: Path, installed_plugin: Path) -> Iterator[Plugin]:
    cni_path = tmp_path / "cni-bin"
    cni_path.mkdir()
    (cni_path / "node-services-ipam").symlink_to(installed_plugin)
    yield Plugin(cni_path=cni_path, data_dir=tmp_path / "ipam-data")
