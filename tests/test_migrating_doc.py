"""docs/migrating.md cannot drift from the code: every setting key it names is a key that
`node-services check-config --keys` lists, every YAML example on it passes `check-config`, and
every `node_services_*` metric it names is one a running daemon exports on /metrics."""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import DEMO_SNAPSHOT, ROOT, DaemonProcess, exported_names

DOC = ROOT / "docs" / "migrating.md"
TEXT = DOC.read_text()

Start = Callable[..., DaemonProcess]


def clean_env() -> dict[str, str]:
    """The environment without settings of its own, so only the file (or flag) is checked."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NODE_SERVICES_", "CATTLE_", "KUBERNETES_SERVICE_"))
        and k != "NODE_NAME"
    }


def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node_services", "check-config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(),
        cwd=ROOT,
    )


def setting_keys() -> set[str]:
    """The keys `check-config --keys` lists: each entry starts its line with the key."""
    result = check_config("--keys")
    assert result.returncode == 0, result.stderr
    keys = {line.split()[0] for line in result.stdout.splitlines() if line and line[0] != " "}
    assert {"dns_listen", "upstreams", "pod_records"} <= keys, result.stdout[:500]
    return keys


def named_settings(text: str, keys: set[str]) -> set[str]:
    """Words of ``text`` shaped like our keys: lower-case words joined by `_` whose first word
    starts one of our keys (`dns_...`, `pod_...`, `kube_...`), metric names excepted; CoreDNS's
    own options (`endpoint_pod_names`, `serve_stale`) start otherwise and are not ours."""
    prefixes = {key.split("_")[0] for key in keys if "_" in key}
    words = re.findall(r"(?<![\w.-])[a-z][a-z0-9]*(?:_[a-z0-9]+)+(?![\w-])", text)
    return {w for w in words if w.split("_")[0] in prefixes and not w.startswith("node_services_")}


def near_misses(text: str, keys: set[str]) -> set[str]:
    """Code spans holding one word that is not a key but nearly one (`upstream` for
    `upstreams`): a setting misspelt."""
    spans = set(re.findall(r"`([a-z][a-z0-9_]*)`", text)) - keys
    return {s for s in spans if difflib.get_close_matches(s, keys, n=1, cutoff=0.85)}


def yaml_examples() -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", TEXT, flags=re.S | re.M)


def test_every_setting_the_guide_names_exists() -> None:
    keys = setting_keys()
    named = named_settings(TEXT, keys)
    assert len(named) >= 15, sorted(named)  # the extraction finds what it should
    assert {"dns_ttl", "pod_records", "dns_max_forwards", "shutdown_grace"} <= named
    assert sorted(named - keys) == []
    assert sorted(near_misses(TEXT, keys)) == []


def test_the_checks_catch_a_wrong_name() -> None:
    keys = setting_keys()
    wrong = "set `dns_cache_entries` and `upstream`, not `endpoint_pod_names` or `log`"
    assert named_settings(wrong, keys) == {"dns_cache_entries"}
    assert near_misses(wrong, keys) == {"upstream"}
    assert metric_names("`node_services_dns_x_total` and `coredns_dns_requests_total`") == {
        "node_services_dns_x_total"
    }


@pytest.mark.parametrize(
    "example",
    yaml_examples(),
    ids=lambda block: block.split(":", 1)[0],
)
def test_every_yaml_example_passes_check_config(example: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(example)
    result = check_config(str(config))
    assert result.returncode == 0, f"{example}\n{result.stderr}"
    assert f"{config}: ok" in result.stdout


def test_the_guide_has_its_examples() -> None:
    assert len(yaml_examples()) >= 4


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w])node_services_[a-z0-9_]*[a-z0-9]", text))


def test_every_metric_the_guide_names_is_exported(daemon: Start) -> None:
    named = metric_names(TEXT)
    assert len(named) >= 20, sorted(named)
    node = daemon("--snapshot", str(DEMO_SNAPSHOT), "--upstream", "127.0.0.1:1")
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="ready", timeout=60)
    exported = exported_names(node)
    assert "node_services_dns_requests_total" in exported
    assert sorted(named - exported) == []
