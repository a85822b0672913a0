"""docs/configuration.md is generated from the Settings dataclass: it must match what
`node-services check-config --keys --markdown` prints now, and agree with `--keys`."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields

from helpers import ROOT

from node_services.cli import flag_names
from node_services.config import Settings, env_name, format_default

DOCS = ROOT / "docs" / "configuration.md"


def cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "node_services", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    return result.stdout


def test_configuration_reference_is_not_stale() -> None:
    generated = cli("check-config", "--keys", "--markdown")
    assert DOCS.read_text() == generated, (
        "docs/configuration.md is stale: run `make docs` (it is generated from the Settings "
        "field docstrings in node_services/config.py)"
    )


def test_keys_text_and_the_markdown_reference_agree_on_every_key() -> None:
    text = cli("check-config", "--keys")
    rows = {
        m.group(1): m.groups()
        for m in re.finditer(
            r"^\| `(\w+)` \| `([\w]+)` \| (.*?) \| (.*?) \| ", DOCS.read_text(), re.M
        )
    }
    flags = flag_names()
    assert list(rows) == [f.name for f in fields(Settings)]
    for f in fields(Settings):
        _, env, flag, default = rows[f.name]
        assert env == env_name(f.name)
        assert default.strip("`") == format_default(f.name)
        if f.name in flags:
            name, _, note = flags[f.name].partition(" ")
            assert flag == f"`{name}` {note}".strip()
        else:
            assert flag == "—"
        expected_flag = f", flag {flags[f.name]}" if f.name in flags else ""
        line = f"{f.name}  (env {env}{expected_flag}, default: {format_default(f.name)})\n"
        assert line in text


def test_every_run_flag_that_sets_a_key_is_in_the_reference() -> None:
    help_text = cli("run", "--help")
    for key, flag in flag_names().items():
        assert flag.split(" ")[0] in help_text, key
    docs = DOCS.read_text()
    for flag in ("--dns-query-log", "--dns-forward-timeout", "--log-level", "--ipam-dir"):
        assert f"`{flag}`" in docs
