"""The snapshot loader on random and mutated YAML/JSON files (seeded, bounded): ``load_file``
returns a LoadResult every time (records, or errors saying why), never raises, and a good
file still loads afterwards."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from helpers import DEMO_SNAPSHOT, FIXTURES

from node_services.sources.static import LoadResult, load_file

SEEDS = [
    p.read_bytes()
    for p in sorted((FIXTURES / "kube").glob("*.yaml"))
    + sorted((FIXTURES / "cattle").glob("*.json"))
]
SEEDS.append(DEMO_SNAPSHOT.read_bytes())
SEEDS.append(
    json.dumps(
        {
            "kind": "List",
            "apiVersion": "v1",
            "items": [
                json.loads(p.read_text()) for p in sorted((FIXTURES / "cattle").glob("*.json"))[:3]
            ],
        }
    ).encode()
)
TOKENS = [
    b"[",
    b"]",
    b"{",
    b"}",
    b":",
    b"- ",
    b"---\n",
    b"&a ",
    b"*a",
    b"<<: *a\n",
    b"!!int ",
    b"!!binary ",
    b"!!python/object:os.system ",
    b'"',
    b"'",
    b"#",
    b"\n",
    b"\t",
    b"\x00",
    b"\xff\xfe",
    b"nan",
    b".inf",
    b"-.inf",
    b"1e400",
    b"9" * 5000,
    b"null",
    b"~",
    b"? ",
    b"|\n",
    b">-\n",
    b"\\u0000",
    b"\xe2\x80\xa8",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(9)
        at = rng.randrange(len(out) + 1)
        if choice == 0 and out:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out))] = rng.randrange(256)
        elif choice == 1:  # truncate (a file read while being written)
            del out[at:]
        elif choice == 2:  # a token of YAML/JSON syntax somewhere
            out[at:at] = rng.choice(TOKENS)
        elif choice == 3 and out:  # duplicate a slice (repeated keys, objects, documents)
            start = rng.randrange(len(out))
            out[at:at] = out[start : start + rng.randint(1, 400)]
        elif choice == 4:  # deep nesting
            depth = rng.choice([50, 99, 101, 500, 999, 1001, 5000])
            open_, close = rng.choice(
                [(b"[", b"]"), (b"{a: ", b"}"), (b'{"a":', b"}"), (b"- ", b"")]
            )
            out[at:at] = open_ * depth + b"x" + close * depth
        elif choice == 5:  # an alias bomb
            levels = rng.randint(2, 9)
            bomb = [b"l0: &l0 [a, a, a, a, a, a, a, a, a, a]"]
            bomb += [
                f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]".encode() for i in range(1, levels)
            ]
            out[at:at] = b"\n".join(bomb) + b"\n"
        elif choice == 6:  # quantities and numbers that are not
            out = bytearray(
                out.replace(b'"4"', rng.choice([b'"nan"', b'"inf"', b"1e400", b'"-1"', b'"4Qi"']))
            )
        elif choice == 7:  # drop a slice
            del out[at : at + rng.randint(1, 200)]
        else:  # garbage
            out[at:at] = rng.randbytes(rng.randint(1, 64))
    return bytes(out)


def test_random_and_mutated_files_always_give_a_load_result(tmp_path: Path) -> None:
    rng = random.Random(20261201)
    path = tmp_path / "fuzz.yaml"
    loaded = rejected = 0
    reasons: set[str] = set()
    deadline = time.monotonic() + 8  # bounded in time as well as count (a shared machine)
    for i in range(1500):
        if time.monotonic() > deadline and i >= 300:
            break
        if rng.random() < 0.1:
            data = rng.randbytes(rng.randint(0, 400))
        else:
            data = mutate(rng, rng.choice(SEEDS))
        path.write_bytes(data)
        result = load_file(path, "static:fuzz")  # must not raise
        assert isinstance(result, LoadResult)
        if result.errors:
            rejected += 1
            reasons.add(result.reason)
            assert result.records == ()
            assert result.reason in {"invalid", "limit", "empty"}, result
            assert all(line.startswith(f"{path}: ") for line in result.errors), result.errors
        else:
            loaded += 1
            assert result.records
            assert result.reason == ""
    assert loaded >= 30 and rejected >= 100, (loaded, rejected)
    assert {"invalid", "limit", "empty"} <= reasons
    # and the loader is still fine
    good = load_file(DEMO_SNAPSHOT, "static:fuzz")
    assert good.errors == () and len(good.records) > 10
