"""Errors a newcomer meets name the real fault: the field, file, variable or listener at fault,
with the documented exit code (2 invalid settings, 1 could not start)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import DEMO_SNAPSHOT, ROOT, DaemonProcess, free_port

from node_services.config import ConfigError, load_settings, unknown_variables


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node_services", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "NODE_NAME": "n", **(env or {})},
    )


def problems_of(config: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_settings(config_file=config, environ={"NODE_NAME": "n", **(environ or {})})
    return error.value.problems


def test_unknown_key_suggests_the_key_meant(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("pod_record: verified\ndns_listn: 127.0.0.1:53\ncolour: blue\n")
    assert problems_of(config) == [
        f"{config}: unknown key 'pod_record' (did you mean 'pod_records'?)",
        f"{config}: unknown key 'dns_listn' (did you mean 'dns_listen'?)",
        f"{config}: unknown key 'colour'",
    ]


def test_a_yaml_boolean_for_a_choice_says_what_yaml_did(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("pod_records: yes\n")
    assert problems_of(config) == [
        f"{config}: pod_records: got the boolean true (YAML reads an unquoted yes/no/on/off "
        "so); expected one of disabled, insecure, verified"
    ]


def test_unknown_variable_is_a_warning_for_run_and_a_problem_for_check_config() -> None:
    environ = {"NODE_SERVICES_POD_RECORD": "verified", "NODE_SERVICES_COLOUR": "blue"}
    assert unknown_variables(environ) == [
        "environment: unknown variable NODE_SERVICES_COLOUR; ignored",
        "environment: unknown variable NODE_SERVICES_POD_RECORD "
        "(did you mean NODE_SERVICES_POD_RECORDS?); ignored",
    ]
    warnings: list[str] = []
    load_settings(environ={"NODE_NAME": "n", **environ}, warnings=warnings)
    assert warnings == unknown_variables(environ)
    result = cli("check-config", env={"NODE_SERVICES_DNS_TLL": "30"})
    assert result.returncode == 1
    assert result.stderr == (
        "node-services: invalid configuration:\n"
        "  environment: unknown variable NODE_SERVICES_DNS_TLL "
        "(did you mean NODE_SERVICES_DNS_TTL?); ignored\n"
    )


def test_run_warns_of_an_unknown_variable_and_runs(
    daemon: Callable[..., DaemonProcess],
) -> None:
    node = daemon("--snapshot", str(DEMO_SNAPSHOT), env={"NODE_SERVICES_DNS_TLL": "30"})
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="readiness")
    assert (
        "WARNING node_services: environment: unknown variable NODE_SERVICES_DNS_TLL "
        "(did you mean NODE_SERVICES_DNS_TTL?); ignored"
    ) in node.output()


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_a_listen_host_that_is_no_ip_address_is_invalid_settings(command: str) -> None:
    result = cli(command, "--dns-listen", "999.1.1.1:53", "--admin-listen", "127.0.0.1:x")
    assert result.returncode == (2 if command == "run" else 1)
    assert result.stderr == (
        "node-services: invalid configuration:\n"
        "  flags: --dns-listen: '999.1.1.1:53': '999.1.1.1' is not an IP address\n"
        "  flags: --admin-listen: '127.0.0.1:x': port must be a number from 0 to 65535\n"
    )


def test_check_config_checks_the_flags_run_takes(tmp_path: Path) -> None:
    result = cli(
        "check-config",
        "--snapshot",
        str(DEMO_SNAPSHOT),
        "--dns-listen",
        "127.0.0.1:5353",
        "--pod-records",
        "verified",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("environment and flags: ok\n")
    assert "  pod_records: verified\n" in result.stdout
    assert "  dns_listen: 127.0.0.1:5353\n" in result.stdout
    config = tmp_path / "c.yaml"
    config.write_text("dns_ttl: 30\n")
    result = cli("check-config", "--config", str(config), "--dns-ttl", "9")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: ok\n")
    assert "  dns_ttl: 9\n" in result.stdout


def test_a_directory_given_as_snapshot_says_so(tmp_path: Path) -> None:
    result = cli("run", "--snapshot", str(tmp_path), "--snapshot", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr == (
        "node-services: invalid configuration:\n"
        f"  snapshots: {tmp_path}: is a directory, not a file\n"
        f"  snapshots: {tmp_path / 'nope.yaml'}: no such file\n"
    )


@pytest.mark.parametrize("listener", ["admin_listen", "dns_listen", "metadata_listen"])
def test_a_listener_that_cannot_bind_is_named_and_exits_1(listener: str) -> None:
    # Another process on this shared machine may take one of the other ports between
    # free_port() and the daemon's bind: then that listener is named instead; try again.
    for _ in range(3):
        ports = {key: free_port() for key in ("admin_listen", "dns_listen", "metadata_listen")}
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
            blocker.bind(("127.0.0.1", ports[listener]))
            blocker.listen()
            result = cli(
                "run",
                "--snapshot",
                str(DEMO_SNAPSHOT),
                *(f"--{key.replace('_', '-')}=127.0.0.1:{port}" for key, port in ports.items()),
                env={"NODE_SERVICES_IPAM": "off"},
            )
        others = [
            key for key in ports if key != listener and f"cannot start: {key} " in result.stderr
        ]
        if not others:
            break
    assert result.returncode == 1, result.stderr
    expected = (
        f"cannot start: {listener} 127.0.0.1:{ports[listener]}: cannot listen: "
        "Address already in use"
    )
    assert expected in result.stderr, result.stderr


def test_run_help_shows_defaults_and_exit_codes() -> None:
    result = cli("run", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--dns-listen HOST:PORT DNS address (default: 0.0.0.0:53)" in text
    assert "--dns-ttl SECONDS TTL of cluster answers (default: 5)" in text
    assert "--node-name NAME this node's name (default: the machine's hostname)" in text
    assert (
        "exit status: 0 stopped cleanly (SIGTERM, SIGINT); 1 could not start (a listener "
        "cannot bind: the message names it and its address); 2 invalid settings (every "
        "problem listed)."
    ) in text


def test_ipam_plugin_help_is_on_stdout_and_succeeds() -> None:
    plugin = [
        sys.executable,
        "-c",
        "import sys; from node_services.ipam.cni import main; sys.exit(main())",
    ]
    helped = subprocess.run(
        [*plugin, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert helped.returncode == 0
    assert helped.stderr == ""
    assert helped.stdout.startswith("usage: node-services-ipam  (a CNI plugin")
    wrong = subprocess.run(
        [*plugin, "--bogus"], capture_output=True, text=True, timeout=30, check=False
    )
    assert wrong.returncode == 2
    assert wrong.stdout == ""
    assert wrong.stderr.startswith("node-services-ipam: unknown argument '--bogus'\nusage: ")


def test_readme_documents_the_exit_codes() -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "exit status: 0 stopped cleanly (SIGTERM, SIGINT); 1 could not start" in readme


def test_check_config_lists_unknown_variables_with_the_other_problems() -> None:
    result = cli("check-config", "--dns-ttl", "soon", env={"NODE_SERVICES_COLOUR": "blue"})
    assert result.returncode == 1
    assert result.stderr == (
        "node-services: invalid configuration:\n"
        "  flags: --dns-ttl: 'soon' is not a whole number of seconds\n"
        "  environment: unknown variable NODE_SERVICES_COLOUR; ignored\n"
    )


def test_readyz_says_why_a_kubernetes_source_has_not_synced(
    daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    # An API server address on loopback where nothing listens: every list fails to connect.
    port = free_port()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: k, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    node = daemon("--kubeconfig", str(kubeconfig))
    node.wait_for(lambda: "last error" in node.get("/readyz")[1], what="a list error", timeout=30)
    status, body = node.get("/readyz")
    assert status == 503
    lines = body.splitlines()
    assert lines[0] == "not ready:"
    resources = ["namespaces", "nodes", "services", "endpointslices", "pods"]
    assert [line.split(" has not synced")[0] for line in lines[1:]] == [
        f"  source kubernetes:{resource}" for resource in resources
    ]
    for line in lines[1:]:
        assert (
            f" has not synced: last error: ClientConnectorError: Cannot connect to host "
            f"127.0.0.1:{port} "
        ) in line, body


def test_check_config_checks_the_daemonsets_arguments() -> None:
    import yaml

    documents = yaml.safe_load_all((ROOT / "deploy" / "daemonset.yaml").read_text())
    (daemonset,) = [d for d in documents if d and d.get("kind") == "DaemonSet"]
    (main,) = [
        c
        for c in daemonset["spec"]["template"]["spec"]["containers"]
        if c["name"] == "node-services"
    ]
    assert main["args"][0] == "run"
    result = cli("check-config", *main["args"][1:])
    assert result.returncode == 0, result.stderr
    assert "  dns_listen: 169.254.169.250:53\n" in result.stdout
    broken = [*main["args"][1:], "--dns-listen", "169.254.169.250"]
    result = cli("check-config", *broken)
    assert result.returncode == 1
    assert "flags: --dns-listen: '169.254.169.250': expected HOST:PORT" in result.stderr


def test_a_daemon_with_no_source_says_so(daemon: Callable[..., DaemonProcess]) -> None:
    node = daemon()
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="readiness")
    node.wait_for(lambda: "no sources" in node.output(), what="the warning")
    assert (
        "WARNING node_services.app: no sources (no snapshot file, no kubeconfig, not in a pod): "
        "the cache stays empty and every cluster name answers NXDOMAIN"
    ) in node.output()


def test_a_yaml_syntax_error_names_line_and_column_but_not_the_text(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text('dns_ttl: 30\ncattle_secret_key: "s3cret-value\n')
    [problem] = problems_of(config)
    assert problem.startswith(f"{config}: not valid YAML: ")
    assert " at line 3, column 1" in problem or " at line 2, column " in problem, problem
    assert "s3cret" not in problem
    config.write_text("dns_ttl: 30\ncattle_secret_key: [s3cret-value\n")
    [problem] = problems_of(config)
    assert "s3cret" not in problem and "line " in problem, problem


def test_kubernetes_service_link_variables_are_not_unknown_settings() -> None:
    environ = {
        "NODE_SERVICES_SERVICE_HOST": "10.43.0.10",
        "NODE_SERVICES_SERVICE_PORT": "9254",
        "NODE_SERVICES_SERVICE_PORT_ADMIN": "9254",
        "NODE_SERVICES_PORT": "tcp://10.43.0.10:9254",
        "NODE_SERVICES_PORT_9254_TCP": "tcp://10.43.0.10:9254",
        "NODE_SERVICES_PORT_9254_TCP_PROTO": "tcp",
        "NODE_SERVICES_PORT_9254_TCP_PORT": "9254",
        "NODE_SERVICES_PORT_9254_TCP_ADDR": "10.43.0.10",
        "NODE_SERVICES_PORT_53_UDP_ADDR": "10.43.0.10",
        "NODE_SERVICES_DNS_TLL": "30",
        "NODE_SERVICES_OVERLAY_VXLN_PORT": "8472",
    }
    assert unknown_variables(environ) == [
        "environment: unknown variable NODE_SERVICES_DNS_TLL "
        "(did you mean NODE_SERVICES_DNS_TTL?); ignored",
        "environment: unknown variable NODE_SERVICES_OVERLAY_VXLN_PORT "
        "(did you mean NODE_SERVICES_OVERLAY_VXLAN_PORT?); ignored",
    ]
    service_links = {k: v for k, v in environ.items() if "TLL" not in k and "VXLN" not in k}
    result = cli("check-config", env=service_links)
    assert result.returncode == 0, result.stderr


# -- several DNS listen addresses ---------------------------------------------------------------


def test_a_second_dns_address_that_cannot_bind_is_the_one_named() -> None:
    for _ in range(3):
        ports = {key: free_port() for key in ("admin_listen", "dns_listen", "metadata_listen")}
        second = free_port("127.0.0.3")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blocker:
            blocker.bind(("127.0.0.3", second))
            result = cli(
                "run",
                "--snapshot",
                str(DEMO_SNAPSHOT),
                *(f"--{key.replace('_', '-')}=127.0.0.1:{port}" for key, port in ports.items()),
                f"--dns-listen=127.0.0.3:{second}",
                env={"NODE_SERVICES_IPAM": "off", "NODE_SERVICES_RUNTIME_DIR": ""},
            )
        if "127.0.0.1" not in result.stderr.partition("cannot start: ")[2].split(": ")[0]:
            break  # else another process took one of the other ports meanwhile: again
    assert result.returncode == 1, result.stderr
    assert (
        f"cannot start: dns_listen 127.0.0.3:{second}: cannot listen: Address already in use\n"
        in result.stderr
    ), result.stderr


def test_a_dns_address_no_interface_holds_says_how_to_add_it() -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: the bind fails, nothing is sent.
    result = cli(
        "run",
        "--snapshot",
        str(DEMO_SNAPSHOT),
        f"--admin-listen=127.0.0.1:{free_port()}",
        f"--metadata-listen=127.0.0.1:{free_port()}",
        f"--dns-listen=127.0.0.1:{free_port()}",
        "--dns-listen=192.0.2.1:53",
        env={"NODE_SERVICES_IPAM": "off", "NODE_SERVICES_RUNTIME_DIR": ""},
    )
    assert result.returncode == 1, result.stderr
    assert (
        "cannot start: dns_listen 192.0.2.1:53: cannot listen: Cannot assign requested address "
        "(no interface of this host holds 192.0.2.1: add it to one, e.g. `ip address add "
        "192.0.2.1/32 dev lo`, or a dummy interface as node-local DNS does)\n"
    ) in result.stderr, result.stderr


def test_dns_listen_lists_are_checked_whole(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("dns_listen: [169.254.20.10:53, 10.96.0.10:53, 169.254.20.10:53]\n")
    assert problems_of(config) == [f"{config}: dns_listen: '169.254.20.10:53' is named twice"]
    config.write_text("dns_listen: [0.0.0.0:53, 10.96.0.10:53]\n")
    assert problems_of(config) == [
        f"{config}: dns_listen: '0.0.0.0:53' and '10.96.0.10:53': a wildcard address takes its "
        "port on every address; name the addresses instead"
    ]
    config.write_text("dns_listen: [10.96.0.10:53, dns.example:53]\n")
    assert problems_of(config) == [
        f"{config}: dns_listen: 'dns.example:53': 'dns.example' is not an IP address"
    ]
    config.write_text("dns_listen: []\n")
    assert problems_of(config) == [f"{config}: dns_listen: expected at least one HOST:PORT"]
    with pytest.raises(ConfigError) as error:
        load_settings(
            environ={"NODE_NAME": "n", "NODE_SERVICES_DNS_LISTEN": "127.0.0.1:53 127.0.0.1:99999"}
        )
    assert error.value.problems == [
        "environment: NODE_SERVICES_DNS_LISTEN: '127.0.0.1:99999': port must be a number from "
        "0 to 65535"
    ]
    # Different ports, or a wildcard of the other family, are fine.
    config.write_text("dns_listen: ['0.0.0.0:53', '127.0.0.1:5353', '[::1]:53']\n")
    assert [
        str(a) for a in load_settings(config_file=config, environ={"NODE_NAME": "n"}).dns_listen
    ] == [
        "0.0.0.0:53",
        "127.0.0.1:5353",
        "[::1]:53",
    ]


def test_check_config_shows_every_dns_address() -> None:
    result = cli(
        "check-config",
        "--snapshot",
        str(DEMO_SNAPSHOT),
        "--dns-listen",
        "169.254.20.10:53",
        "--dns-listen",
        "10.96.0.10:53",
    )
    assert result.returncode == 0, result.stderr
    assert "  dns_listen: 169.254.20.10:53, 10.96.0.10:53\n" in result.stdout


def test_more_dns_addresses_than_one_hand_over_message_carries_are_refused() -> None:
    many = " ".join(f"127.0.1.{i}:53" for i in range(1, 66))
    with pytest.raises(ConfigError) as error:
        load_settings(environ={"NODE_NAME": "n", "NODE_SERVICES_DNS_LISTEN": many})
    assert error.value.problems == [
        "environment: NODE_SERVICES_DNS_LISTEN: 65 addresses: at most 64 (a restart hands every "
        "socket over in one message)"
    ]
