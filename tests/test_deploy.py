"""deploy/ and the Dockerfile: the manifests are what the Kubernetes API takes (read into the
official client's models and back without losing a field), and every command in them is one
this build accepts, run where it can be (the plugin install into a directory, the address
setup in a network namespace of the test's)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, network_namespace
from kubernetes.client import ApiClient

from node_services import __version__
from node_services.cli import _overrides, build_parser
from node_services.config import load_settings
from node_services.ipam import install

DEPLOY = ROOT / "deploy"


def documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def daemonset() -> dict[str, Any]:
    (doc,) = documents("daemonset.yaml")
    return doc


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = daemonset()["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    spec = pod_spec()
    (found,) = [c for c in spec["containers"] + spec["initContainers"] if c["name"] == name]
    return found


MODELS = {
    "DaemonSet": "V1DaemonSet",
    "ServiceAccount": "V1ServiceAccount",
    "ClusterRole": "V1ClusterRole",
    "ClusterRoleBinding": "V1ClusterRoleBinding",
}


@pytest.mark.parametrize("name", ["daemonset.yaml", "rbac.yaml"])
def test_manifests_survive_the_official_client_models_unchanged(name: str) -> None:
    client = ApiClient()
    for doc in documents(name):
        model = client.deserialize(json.dumps(doc), MODELS[doc["kind"]], "application/json")
        # A misspelt or misplaced field would be dropped here, a wrong type would fail.
        assert client.sanitize_for_serialization(model) == doc


def test_the_daemon_arguments_are_valid_settings_matching_the_probes_and_volumes() -> None:
    main = container("node-services")
    args = build_parser().parse_args(main["args"])
    assert args.command == "run"
    env = {e["name"]: "node-1" for e in main["env"] if e.get("valueFrom")}
    assert main["env"][0]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    settings = load_settings(environ=env, overrides=_overrides(args))
    assert settings.node_name == "node-1"
    assert [a.host for a in settings.dns_listen] == [settings.metadata_listen.host]
    assert settings.metadata_listen.host == "169.254.169.250"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert main[probe]["httpGet"] == {"path": path, "port": settings.admin_listen.port}
    assert settings.admin_listen.host == "0.0.0.0"  # the kubelet probes the node's address
    mounts = [m["mountPath"] for m in main["volumeMounts"]]
    assert any(str(settings.ipam_dir).startswith(m + "/") for m in mounts)
    assert pod_spec()["hostNetwork"] is True


def test_the_service_account_is_the_one_rbac_yaml_binds() -> None:
    by_kind = {doc["kind"]: doc for doc in documents("rbac.yaml")}
    account = by_kind["ServiceAccount"]["metadata"]
    assert pod_spec()["serviceAccountName"] == account["name"]
    assert daemonset()["metadata"]["namespace"] == account["namespace"]
    assert by_kind["ClusterRoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]


def test_the_cluster_role_allows_every_request_the_daemon_makes() -> None:
    """Lists and watches of what the cache mirrors, the node GET + annotation PATCH, and the
    PATCH of nodes/status that sets NetworkUnavailable (a subresource needs its own rule)."""
    (role,) = [doc for doc in documents("rbac.yaml") if doc["kind"] == "ClusterRole"]
    allowed = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {
        ("", r, v) for r in ("namespaces", "nodes", "services", "pods") for v in ("list", "watch")
    }
    needed |= {("discovery.k8s.io", "endpointslices", v) for v in ("list", "watch")}
    needed |= {("", "nodes", "get"), ("", "nodes", "patch"), ("", "nodes/status", "patch")}
    assert needed <= allowed
    assert ("", "nodes/status", "update") not in allowed  # a patch is enough: least privilege


def test_the_plugin_install_command_writes_into_the_mounted_host_directories(
    tmp_path: Path,
) -> None:
    init = container("install-cni-plugin")
    command = init["command"]
    assert command[:2] == ["node-services-ipam", "--install"]
    root = command[command.index("--root") + 1]
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod_spec()["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in init["volumeMounts"]}
    # Each place the installer writes is a mount of the very host path the launcher names.
    directory, lib = command[2], command[command.index("--lib") + 1]
    for host_path in (directory, lib):
        assert mounted[root + host_path] == host_path
    # The same command, with the test's directory as the root.
    argv = [*command[2:]]
    argv[argv.index("--root") + 1] = str(tmp_path)
    assert install.main(argv) == 0
    launcher = (tmp_path / directory.lstrip("/") / "node-services-ipam").read_text()
    assert launcher.startswith("#!/usr/bin/python3 -S\n")
    assert f"sys.path.insert(0, {lib!r})" in launcher
    for module in install.PLUGIN_MODULES:
        assert (tmp_path / lib.lstrip("/") / module).is_file()


@pytest.fixture
def netns() -> Iterator[str]:
    with network_namespace("deploy") as name:
        yield name


def test_the_address_init_container_can_run_again(netns: str) -> None:
    command = container("metadata-address")["command"]
    for _ in range(2):  # a restarted pod runs it again
        subprocess.run(["ip", "netns", "exec", netns, *command], check=True)
    shown = subprocess.run(
        ["ip", "netns", "exec", netns, "ip", "-4", "-o", "address", "show", "dev", "lo"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.count("169.254.169.250/32") == 1


def test_the_dockerfile_installs_this_project_and_runs_its_command() -> None:
    # No container engine runs here: check what the Dockerfile relies on instead.
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM python:(\d+)\.(\d+)-", text, re.M)
    assert base is not None
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"])
    assert required is not None
    assert tuple(map(int, base.groups())) >= tuple(map(int, required.groups()))
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), source
    assert project["readme"] == "README.md" and "README.md" in text  # the build reads it
    assert 'ENTRYPOINT ["node-services"]' in text and "node-services" in project["scripts"]
    images = {c["image"] for c in pod_spec()["containers"] + pod_spec()["initContainers"]}
    assert images == {f"node-services:{__version__}"}
    assert "iproute2" in text  # the metadata-address init container runs ip


def test_an_update_starts_the_new_pod_beside_the_old_one_sharing_the_hand_over_dir() -> None:
    strategy = daemonset()["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    main = container("node-services")
    settings = load_settings(
        environ={"NODE_NAME": "n"}, overrides=_overrides(build_parser().parse_args(main["args"]))
    )
    (mount,) = [m for m in main["volumeMounts"] if m["mountPath"] == str(settings.runtime_dir)]
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert volumes[mount["name"]]["hostPath"] == {
        "path": "/run/node-services",
        "type": "DirectoryOrCreate",
    }
    # The lame duck and the drain fit in the termination grace period.
    assert pod_spec()["terminationGracePeriodSeconds"] > settings.shutdown_grace + 10


def test_both_pods_of_an_update_share_wireguard_gos_sockets_and_get_the_tun_device() -> None:
    from node_services.overlay import uapi

    main = container("node-services")
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]]["hostPath"] for m in main["volumeMounts"]}
    # the directory the daemon looks for a running wireguard-go in, the host's
    assert mounted[str(uapi.SOCKET_DIR)] == {"path": "/run/wireguard", "type": "DirectoryOrCreate"}
    assert mounted["/dev/net/tun"] == {"path": "/dev/net/tun", "type": "CharDevice"}
    assert "NET_ADMIN" in main["securityContext"]["capabilities"]["add"]


def commented(marker: str) -> list[str]:
    """The commented-out YAML lines of daemonset.yaml from the one holding ``marker`` on,
    uncommented (the node-local DNS variant the README shows)."""
    lines = (DEPLOY / "daemonset.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    indent = lines[start].index("#")
    block = []
    for line in lines[start:]:
        if not line.strip().startswith("#") or line.index("#") != indent:
            break
        text = line[indent + 2 :]
        if block and not text.startswith(("- ", " ")):
            break  # the next comment, not YAML
        block.append(text)
    return block


def test_the_node_local_dns_variant_serves_both_addresses_in_a_namespace(
    netns: str, tmp_path: Path
) -> None:
    if shutil.which("dig") is None:
        pytest.skip("dig is not installed (Debian: bind9-dnsutils)")
    (init,) = yaml.safe_load("\n".join(commented("- name: node-local-dns-addresses")))
    args = yaml.safe_load("\n".join(commented("# - --dns-listen")))
    wanted = ["--dns-listen", "169.254.20.10:53", "--dns-listen", "10.96.0.10:53"]
    assert args == wanted
    for _ in range(2):  # a restarted pod runs it again
        subprocess.run(["ip", "netns", "exec", netns, *init["command"]], check=True)
    shown = subprocess.run(
        ["ip", "-n", netns, "-4", "-o", "address", "show", "dev", "lo"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    addresses = [line.split()[3] for line in shown.splitlines()]
    assert addresses == ["127.0.0.1/8", "169.254.20.10/32", "10.96.0.10/32"]
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [
            *("ip", "netns", "exec", netns, sys.executable, "-m", "node_services", "run"),
            *("--node-name", "node-a", "--snapshot", str(ROOT / "demo" / "snapshot.yaml")),
            *wanted,
            *("--metadata-listen", "127.0.0.1:8080", "--admin-listen", "127.0.0.1:9254"),
            *("--upstream", "127.0.0.1:1", "--ipam-dir", str(tmp_path / "ipam")),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "NODE_SERVICES_RUNTIME_DIR": "", "NODE_SERVICES_SHUTDOWN_GRACE": "0"},
    )
    try:
        name = "kubernetes.default.svc.cluster.local"
        deadline = time.monotonic() + 30
        for server in ("169.254.20.10", "10.96.0.10"):
            for transport in ("+notcp", "+tcp"):
                while True:
                    answer = subprocess.run(
                        [
                            *("ip", "netns", "exec", netns, "dig", "+short", "+tries=1"),
                            *("+time=2", transport, f"@{server}", name),
                        ],
                        capture_output=True,
                        text=True,
                        timeout=30,
                        check=False,
                    ).stdout.split()
                    if answer == ["10.43.0.1"]:
                        break
                    assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
                    assert time.monotonic() < deadline, (server, transport, answer)
                    time.sleep(0.2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
    assert daemon.returncode == 0, (tmp_path / "daemon.log").read_text()
