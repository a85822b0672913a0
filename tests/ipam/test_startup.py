"""The plugin starts cheaply: standard library only, no site-packages scan through its launcher,
and none of the daemon's heavy modules."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ipam.cni_driver import Plugin

from node_services.ipam import install

FORBIDDEN = {
    "aiohttp",
    "pyroute2",
    "kubernetes",
    "yaml",
    "prometheus_client",
    "dnslib",
    "uvloop",
    "netaddr",
    "node_services.config",
    "node_services.state",
    "node_services.ipam.reconcile",
    # costly standard modules the plugin path avoids on purpose
    "dataclasses",
    "typing",
    "pathlib",
    "site",
    "json",  # imports re and enum: ~5 ms (node_services.ipam.cnijson uses _json directly)
    "re",
    "enum",
    "sqlite3",  # the package; the plugin uses its C module _sqlite3 (~2 ms less)
    "datetime",
}


ADD_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_IFNAME": "eth0",
    "CNI_NETNS": "/x",
    "CNI_PATH": "/x",
}


def add_config(data_dir: Path) -> bytes:
    config = {"cniVersion": "1.0.0", "name": "n", "ipam": {"subnet": "10.9.0.0/24"}}
    config["ipam"]["dataDir"] = str(data_dir)
    return json.dumps(config).encode()


def imported_modules(installed_plugin: Path, stdin: bytes, env: dict[str, str]) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", str(installed_plugin)],
        input=stdin,
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout
    assert json.loads(proc.stdout)["cniVersion"] == "1.0.0"
    lines = proc.stderr.decode().splitlines()
    return {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}


def test_the_launcher_runs_the_interpreter_with_dash_s(installed_plugin: Path) -> None:
    first_line = installed_plugin.read_text().splitlines()[0]
    assert first_line == f"#!{sys.executable} -S"
    assert os.access(installed_plugin, os.X_OK)


def test_an_add_imports_none_of_the_heavy_modules(installed_plugin: Path, tmp_path: Path) -> None:
    modules = imported_modules(installed_plugin, add_config(tmp_path), ADD_ENV)
    assert "node_services.ipam.cni" in modules
    assert "_sqlite3" in modules
    assert modules & FORBIDDEN == set()


def test_each_command_leaves_no_wal_behind_so_start_up_stays_flat(plugin: Plugin) -> None:
    # A plugin process that exits with the database open leaves its WAL for the next one to
    # replay in full, and the WAL then never restarts: it grew by every command ever run.
    for n in range(40):
        assert plugin.add(f"c{n}").returncode == 0
        if n % 2:
            assert plugin.run("DEL", container=f"c{n}").returncode == 0
    wal = plugin.data_dir / "ipam.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    assert len(plugin.allocations()) == 20


def test_install_writes_the_bytecode_of_every_module_a_command_loads(tmp_path: Path) -> None:
    # A copy of the package without any bytecode, installed as a runtime would run it.
    package = Path(__file__).resolve().parents[2] / "node_services"
    shutil.copytree(package, tmp_path / "node_services", ignore=shutil.ignore_patterns("*.pyc"))
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run(
        [sys.executable, "-m", "node_services.ipam.cni", "--install", str(tmp_path / "bin")],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(tmp_path)},
        check=True,
        capture_output=True,
    )
    launcher = tmp_path / "bin" / "node-services-ipam"
    assert f"sys.path.insert(0, {str(tmp_path)!r})" in launcher.read_text()
    loaded = imported_modules(launcher, add_config(tmp_path / "data"), {**env, **ADD_ENV})
    ours = [name for name in loaded if name.split(".")[0] == "node_services"]
    assert "node_services.ipam.cni" in ours and "node_services.ipam.cnijson" in ours
    for name in ours:
        source = tmp_path.joinpath(*name.split("."))
        source = source / "__init__.py" if source.is_dir() else source.with_suffix(".py")
        assert Path(importlib.util.cache_from_source(str(source))).is_file(), name


def test_the_modules_install_copies_are_exactly_those_an_add_loads(
    installed_plugin: Path, tmp_path: Path
) -> None:
    loaded = imported_modules(installed_plugin, add_config(tmp_path), ADD_ENV)
    ours = {name for name in loaded if name.split(".")[0] == "node_services"}
    listed = {
        module.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for module in install.PLUGIN_MODULES
    }
    assert ours == listed


def test_a_host_install_writes_under_root_and_names_the_host_paths(tmp_path: Path) -> None:
    root = tmp_path / "host"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "node_services.ipam.cni", "--install", "/opt/cni/bin"),
            *("--python", "/usr/bin/python3", "--lib", "/opt/node-services/lib"),
            *("--root", str(root)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "/opt/cni/bin/node-services-ipam\n")
    launcher = (root / "opt/cni/bin/node-services-ipam").read_text()
    assert launcher.splitlines()[0] == "#!/usr/bin/python3 -S"
    assert "sys.path.insert(0, '/opt/node-services/lib')" in launcher
    assert os.access(root / "opt/cni/bin/node-services-ipam", os.X_OK)
    copied = sorted(str(p.relative_to(root / "opt/node-services/lib")) for p in root.rglob("*.py"))
    assert copied == sorted(install.PLUGIN_MODULES)
    assert not list(root.rglob("*.pyc"))  # the host's interpreter keeps its own bytecode
    assert sorted(p.name for p in root.rglob("*") if p.name.endswith(".tmp")) == []


def test_an_install_with_lib_runs_the_copy(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    assert install.install(str(tmp_path / "bin"), lib=str(lib)) == str(
        tmp_path / "bin" / "node-services-ipam"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-v", str(tmp_path / "bin" / "node-services-ipam")],
        input=add_config(tmp_path / "data"),
        env={**ADD_ENV, "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout
    assert json.loads(proc.stdout)["ips"] == [{"address": "10.9.0.2/24", "gateway": "10.9.0.1"}]
    trace = proc.stderr.decode()
    checkout = str(Path(install.__file__).resolve().parents[2])
    for module in install.PLUGIN_MODULES:  # each from the copy's bytecode, none from here
        assert f"{lib / module}" in trace, module
    assert f"{checkout}/node_services" not in trace


def test_install_rejects_relative_paths_and_explains_itself(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node_services.ipam.cni", "--install", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            check=False,
        )

    relative = run("bin")
    assert relative.returncode == 2
    assert "DIR must be an absolute path: bin" in relative.stderr
    assert "lib must be an absolute path: lib" in run("/x/bin", "--lib", "lib").stderr
    assert "--root DIR" in run("--help").stdout
    assert not (tmp_path / "bin").exists()
