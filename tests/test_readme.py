"""README.md's "Try it" block is true: every command in it, run against a daemon started the
way `make run` starts it (the Makefile's own command, on free ports), answers what its comment
says; and the lines `make run` prints are commands of that block."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, free_port, http_get

README = ROOT / "README.md"
DEFAULTS = {"dns": "127.0.0.1:5353", "metadata": "127.0.0.1:8080", "admin": "127.0.0.1:9254"}

pytestmark = pytest.mark.skipif(
    not (shutil.which("make") and shutil.which("dig") and shutil.which("curl")),
    reason="needs make, dig (Debian bind9-dnsutils) and curl",
)


def try_block() -> list[tuple[str, str]]:
    """(command, expected answer) of each line of README's try-this block."""
    text = README.read_text()
    start = text.index("<!-- try-this:")
    block = text[start:].split("```sh\n", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.splitlines():
        match = re.fullmatch(r"(.+?)\s+# (.+)", line)
        assert match, f"README try-this line without its answer: {line!r}"
        lines.append((match.group(1), match.group(2)))
    return lines


def make_dry_run(**variables: str) -> list[str]:
    """`make -n run` (the recipe, not run), continuation lines joined."""
    result = subprocess.run(
        ["make", "-s", "-n", "run", *(f"{k}={v}" for k, v in variables.items())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.replace("\\\n", " ").splitlines()


@pytest.fixture(scope="module")
def make_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The daemon of `make run` on free loopback ports: its addresses by service."""
    tmp = tmp_path_factory.mktemp("make-run")
    # Another process on this shared machine may take a port between free_port() and the
    # daemon's bind (it then exits 1 naming the listener): start again on new ports.
    for attempt in range(3):
        addresses = {name: f"127.0.0.1:{free_port()}" for name in DEFAULTS}
        log_path = tmp / f"daemon-{attempt}.log"
        proc = _start(addresses, log_path)
        if _wait_ready(proc, f"http://{addresses['admin']}/readyz", log_path):
            break
        assert "cannot start: " in log_path.read_text(), log_path.read_text()
    else:
        raise AssertionError(f"make run's daemon never started:\n{log_path.read_text()}")
    try:
        yield addresses
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _start(addresses: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """The Makefile's own run command (from `make -n run`), on these addresses."""
    (command,) = [
        line
        for line in make_dry_run(
            RUN_DNS=addresses["dns"],
            RUN_METADATA=addresses["metadata"],
            RUN_ADMIN=addresses["admin"],
        )
        if " run --snapshot " in line
    ]
    words = shlex.split(command)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_SERVICES_", "CATTLE_"))}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[0].endswith("/node-services"), words
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "node_services", *words[1:]],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> bool:
    """True once /readyz says ok; False if the daemon exited first."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if http_get(url, timeout=1)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError(f"make run's daemon not ready in 30 s:\n{log_path.read_text()}")


def on_ports(command: str, addresses: dict[str, str]) -> str:
    dns_host, dns_port = addresses["dns"].split(":")
    command = command.replace(DEFAULTS["metadata"], addresses["metadata"])
    command = command.replace(DEFAULTS["admin"], addresses["admin"])
    return command.replace(
        f"@127.0.0.1 -p {DEFAULTS['dns'].split(':')[1]}", f"@{dns_host} -p {dns_port}"
    )


@pytest.mark.parametrize(("command", "answer"), try_block(), ids=lambda v: v[:70])
def test_every_try_this_command_answers_what_the_readme_says(
    make_run: dict[str, str], command: str, answer: str
) -> None:
    result = subprocess.run(
        ["bash", "-c", on_ports(command, make_run)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(line for line in result.stdout.splitlines() if line) == sorted(answer.split(", "))


def test_the_lines_make_run_prints_are_in_the_try_block() -> None:
    commands = {command for command, _ in try_block()}
    printed = [
        line.removeprefix('echo "').removesuffix('"').strip()
        for line in make_dry_run()
        if line.startswith('echo "  ')
    ]
    assert len(printed) >= 3
    for line in printed:
        assert line in commands, f"make run prints {line!r}, which README's Try it lacks"


def test_the_try_block_covers_every_feature() -> None:
    text = " ".join(command for command, _ in try_block())
    for feature in (
        "SRV",  # DNS SRV
        "-x ",  # PTR
        "rancher.internal",  # Rancher names
        "--interface 127.0.0.2",  # metadata self as a workload
        "wait=true",  # long-poll
        "/metrics",  # metrics
    ):
        assert feature in text


def test_readme_run_synopsis_names_every_run_flag() -> None:
    from node_services.cli import build_parser

    synopsis = README.read_text().split("node-services run [", 1)[1].split("```", 1)[0]
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    flags = [s for action in run._actions for s in action.option_strings if s.startswith("--")]
    missing = [flag for flag in flags if flag not in ("--help",) and flag not in synopsis]
    assert missing == []


def test_readme_names_no_internal_issue_or_missing_file() -> None:
    text = README.read_text()
    assert re.search(r"\bissue \d", text) is None
    assert "DESIGN.md" not in text


def test_readme_metric_names_are_the_ones_served(make_run: dict[str, str]) -> None:
    status, body = http_get(f"http://{make_run['admin']}/metrics")
    assert status == 200
    served = set(re.findall(r"^# TYPE (\w+) (\w+)", body, re.M))
    exposed = {name for name, _ in served}  # counters as <name>_total, like their samples
    documented = re.findall(r"^\| `(node_services_dns_\w+)`", README.read_text(), re.M)
    assert len(documented) > 20
    assert [name for name in documented if name not in exposed] == []
