"""node_services.ipam.cnijson gives exactly what the json module gives, values and errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node_services.ipam import cnijson

ROOT = Path(__file__).resolve().parents[2]

CONFIG = {
    "cniVersion": "1.1.0",
    "name": "k8s-pod-network",
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": True,
    "mtu": 1450,
    "ipam": {
        "type": "node-services-ipam",
        "ranges": [
            [{"subnet": "10.244.3.0/24", "gateway": "10.244.3.1"}],
            [{"subnet": "fd00::/64"}],
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "/var/lib/cni/networks",
    },
    "args": {"cni": {"ips": ["10.244.3.9"]}},
    "runtimeConfig": {"ips": [], "portMappings": None},
    "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}],
    "weight": 0.25,
    "big": 123456789012345678901234567890,
    "text": 'quote " backslash \\ tab \t nl \n uni \u00e4 \u2603 astral \U0001f600 nul \u0000',
}

VALID = [
    json.dumps(CONFIG).encode(),
    json.dumps(CONFIG, indent=2, ensure_ascii=False).encode(),
    b"  \n\t{}\r\n ",
    b"[]",
    b'"just a string"',
    b"-0.0",
    b"1e400",
    b"NaN",
    b"[Infinity, -Infinity]",
    b'{"a": 1, "a": 2}',  # duplicate keys: the last wins, as in json
    b'"\\ud83d\\ude00 \\u00e4"',
    '{"s": "\u00e4"}'.encode("utf-8-sig"),  # a BOM: json.loads accepts it in bytes
    '{"s": "x"}'.encode("utf-16"),
    '{"s": "x"}'.encode("utf-32-le"),
    '{"s": "\u2603"}',  # str input
]

INVALID = [
    b"",
    b"   ",
    b"{not json",
    b'{"a": 1,}',
    b"[1, 2] extra",
    b'{"a": 1} {"b": 2}',
    b'"unterminated',
    b'"bad escape \\x"',
    b'"control \x01 char"',
    b"\xff\xfe\xfa not utf",
    b"tru",
    b"01",
]


def _outcome(load: Any, data: bytes | str) -> tuple[str, Any]:
    try:
        value = load(data)
    except Exception as exc:
        return ("error", (type(exc), str(exc)))
    return ("value", json.dumps(value, sort_keys=True) if not _has_nan(value) else repr(value))


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return False


@pytest.mark.parametrize("data", VALID + INVALID)
def test_loads_matches_json_exactly(data: bytes | str) -> None:
    assert _outcome(cnijson.loads, data) == _outcome(json.loads, data)


def test_loads_reads_a_real_config_to_the_same_objects() -> None:
    loaded = cnijson.loads(json.dumps(CONFIG).encode())
    assert loaded == CONFIG
    assert type(loaded["big"]) is int and type(loaded["weight"]) is float


RESULTS = [
    CONFIG,
    {
        "cniVersion": "1.0.0",
        "ips": [{"address": "10.244.3.9/24", "gateway": "10.244.3.1"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.3.1"}],
        "dns": {},
    },
    {"cniVersion": "1.1.0", "code": 100, "msg": "pool exhausted", "details": "\u00e4 \n"},
    [1.5, -0.0, 1e300, True, False, None, "", [], {}],
    {"nan": float("nan"), "inf": float("inf")},
]


@pytest.mark.parametrize("value", RESULTS)
def test_dumps_matches_json_exactly(value: Any) -> None:
    assert cnijson.dumps(value) == json.dumps(value)


def test_dumps_refuses_what_json_refuses() -> None:
    with pytest.raises(TypeError, match="Object of type set is not JSON serializable"):
        cnijson.dumps({"x": {1}})
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference detected"):
        cnijson.dumps(loop)


@pytest.mark.parametrize("data", INVALID)
def test_malformed_input_fails_like_json_in_a_process_without_json(data: bytes) -> None:
    # The plugin process has not imported json when it parses: the accelerator's error path
    # then cannot build json's error, and the fallback must still give json's exact one.
    script = (
        "import sys\n"
        "from node_services.ipam import cnijson\n"
        "assert 'json' not in sys.modules\n"
        "try:\n"
        "    cnijson.loads(sys.stdin.buffer.read())\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc, sep='|')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script],
        input=data,
        capture_output=True,
        check=True,
        env={"PYTHONPATH": str(ROOT)},
    )
    kind, error = _outcome(json.loads, data)[1]
    assert proc.stdout.decode().rstrip("\n") == f"{kind.__name__}|{error}"
