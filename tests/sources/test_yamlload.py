"""The fast YAML loader gives exactly what ``yaml.load_all(..., Loader=CSafeLoader)`` gives.

Exactly: same documents, same types at every level (bool is not int, str is not int), same
key order, NaN where NaN; and the same exception (type and message) for bad input."""

from __future__ import annotations

import datetime
import importlib.util
import io
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import DEMO_SNAPSHOT, FIXTURES, ROOT

from node_services.sources import yamlload
from node_services.sources.errors import InputLimitError
from node_services.sources.yamlload import FastSafeLoader

REFERENCE: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def same(a: Any, b: Any, path: str = "$", pairs: dict[int, int] | None = None) -> None:
    """Assert ``a`` and ``b`` are equal in type and value, recursively (NaN equals NaN), and
    share containers the same way (an alias in ``a`` is an alias in ``b``; cycles too)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} {a!r} != {type(b).__name__} {b!r}"
    if isinstance(a, dict | list):
        pairs = {} if pairs is None else pairs
        if id(a) in pairs:
            assert pairs[id(a)] == id(b), f"{path}: shared in one, not in the other"
            return
        pairs[id(a)] = id(b)
    if isinstance(a, dict):
        assert len(a) == len(b), f"{path}: {len(a)} keys != {len(b)}"
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            same(ka, kb, f"{path} key", pairs)
            same(va, vb, f"{path}[{ka!r}]", pairs)
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}[{i}]", pairs)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{path}: nan != {b!r}"
    elif isinstance(a, datetime.datetime):
        assert (a, a.tzinfo, a.utcoffset()) == (b, b.tzinfo, b.utcoffset()), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def reference(text: str | bytes) -> list[Any]:
    return list(yaml.load_all(text, Loader=REFERENCE))


def recursive(text: str | bytes) -> bool:
    """Whether some document of ``text`` contains itself through an alias (its node graph
    has a cycle): the one kind of document the fast loader refuses and SafeLoader builds."""

    def cyclic(node: Any, path: set[int]) -> bool:
        if not isinstance(node.value, list):
            return False
        if id(node) in path:
            return True
        path.add(id(node))
        children = (
            [p for pair in node.value for p in pair]
            if isinstance(node.value[0:1] and node.value[0], tuple)
            else node.value
        )
        found = any(cyclic(child, path) for child in children)
        path.discard(id(node))
        return found

    return any(cyclic(root, set()) for root in yaml.compose_all(text, Loader=REFERENCE))


def check(text: str | bytes) -> list[Any]:
    """Both loaders on ``text``: same documents, or the same error; except that a document
    containing itself is refused (InputLimitError) where SafeLoader builds a cycle."""
    try:
        list(yamlload.load_all(text))
    except InputLimitError as exc:
        assert "contains it" in str(exc)
        assert recursive(text)
        return []
    except Exception:  # the same error as the reference's, checked below
        pass
    try:
        expected = reference(text)
    except Exception as exc:  # !!int x: ValueError, !!bool x: KeyError, as SafeLoader has it
        with pytest.raises(type(exc)) as raised:
            list(yamlload.load_all(text))
        assert str(raised.value) == str(exc)
        return []
    got = list(yamlload.load_all(text))
    same(got, expected)
    return got


FILES = sorted(p for p in FIXTURES.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
FILES += sorted((ROOT / "demo").rglob("*.yaml"))


def test_the_files_are_there() -> None:
    assert DEMO_SNAPSHOT in FILES
    assert len([p for p in FILES if p.suffix == ".yaml"]) >= 15


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_fixture_and_demo_files(path: Path) -> None:
    docs = check(path.read_bytes())
    assert docs and all(isinstance(d, dict | list) for d in docs)
    with path.open("rb") as stream:  # streamed, as sources.static reads files
        same(list(yamlload.load_all(stream)), reference(path.read_bytes()))


def _snapshot_gen() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_bench_snapshot_gen", ROOT / "bench/snapshot_gen.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_snapshot(tmp_path: Path) -> None:
    gen = _snapshot_gen()
    sizes = gen.Sizes(namespaces=3, nodes=2, services=60, endpoints_per_slice=4, pods=20)
    path = tmp_path / "snapshot.yaml"
    count = gen.write_yaml(path, sizes)
    docs = check(path.read_bytes())
    assert len(docs) == count > 120
    assert {d["kind"] for d in docs} == {"Namespace", "Node", "Service", "EndpointSlice", "Pod"}


CASES = [
    "",
    "---\n",
    "---\n---\n...\n---\nnull\n",
    "# only a comment\n",
    "a: 1\n---\nb: 2\n...\n",
    "%YAML 1.1\n---\na: b\n",
    "%TAG !e! tag:example.com,2000:\n---\na: !!str 1\n",
    # ints, YAML 1.1 style
    "[0, 1, -1, +1, -0, +0, 0x1F, 0X1f, 0o17, 017, 0b101, 1_000, 1:30, -1:30:00, 190:20:30]",
    "[08, 09, 0x, 0b, 0o8, 1__0, _1, 1_, 12e, 0xG, 1:60, 1:5]",
    "[123456789012345678901234567890, -0x_ff, 0b_1]",
    # floats
    "[1.0, 1., .5, -.5, +.5, 1e3, 1.0e3, 1.0e+3, 1.0E-3, 1_000.5, 1:30.5, .inf, -.inf, +.inf]",
    "[.Inf, .INF, .nan, .NaN, .NAN, .NAn, inf, nan, 1e, e3, ., ._, 1.2.3, 0.1_]",
    # bools and nulls
    "[yes, Yes, YES, yEs, no, No, NO, on, On, ON, off, Off, OFF, true, True, TRUE, tRue]",
    "[false, False, FALSE, y, n, Y, N, ~, null, Null, NULL, nUll, '', \"\", ]",
    "a:\nb: ~\nc: null\nd:\n  - \n  -\n",
    # timestamps (SafeLoader builds datetimes from plain ones)
    "[2001-12-14, 2001-12-14t21:59:43.10-05:00, 2001-12-14 21:59:43.10 -5, 2001-12-15T02:59:43Z]",
    "[2001-12-14 21:59:43.10, 2001-1-1, 2002-12-14 1:2:3, '2001-12-14', \"2024-05-14T09:18:25Z\"]",
    "a: 2024-05-14T09:18:25Z\nb: 2024-05-14T09:18:25.123456789+02:30\n",
    # strings that look like something else
    "[-, --, '-1', '0x1F', \"yes\", 'null', '~', 1.2.3.4, 10.0.0.1, ::1, fe80::1, 1-2, +, +a]",
    "[!, '&', '*', <<x, =x, <, =, .git, -foo, 'a''b', \"a\\tb\\u00e9\\x41\", \"\\\"\"]",
    "a: b: c\n",
    "k: a:b\nl: a #comment\nm: 'a #b'\nn: a# b\n",
    # keys of every type
    "1: a\n1.5: b\ntrue: c\n~: d\n2001-01-01: e\nyes: f\n'1': g\n",
    "{1: a, true: b, 1.0: c}",
    "? - a\n: b\n",
    "? {a: 1}\n: b\n",
    "a: 1\na: 2\nb: 3\n",
    # containers
    "a:\n  b:\n    c: [1, {d: e}, [], {}]\n  f: []\n  g: {}\n"
    "h:\n- 1\n- - 2\n  - 3\n- x: y\n  z: w\n",
    "- - - - - deep\n",
    "[[[[[[[[]]]]]]]]",
    "{a: [b, {c: d}], e: f}",
    "- ? complex\n  : key\n",
    # block scalars and multi-line
    "a: |\n  line 1\n  line 2\nb: >\n  folded\n  text\n\n  para\nc: |-\n  strip\nd: |+\n  keep\n\n",
    "a: |2\n    indented\n  b\nb: >-\n  x\n   y\n  z\n",
    "a: plain\n  continued\n  lines\nb: 'single\n  quoted'\nc: \"double\\\n  escaped\"\n",
    'a: "true"\nb: \'123\'\nc: "1:30"\nd: "~"\ne: "nan"\n',
    # explicit tags
    "[!!str 1, !!str true, !!str ~, !!int '10', !!float '1', !!bool yes, !!null '']",
    "a: !!binary aGVsbG8=\nb: !!timestamp 2001-01-01\nc: !!str\n",
    "a: !!map {b: 1}\nc: !!seq [1]\nd: !!set {x, y}\ne: !!omap [a: 1, b: 2]\nf: !!pairs [a: 1]\n",
    "a: !!float 1e3\nb: !!int 0x10\nc: !<tag:yaml.org,2002:str> 5\n",
    "a: ! 12\nb: ! yes\n",
    # anchors, aliases, merge keys
    "a: &x 1\nb: *x\n",
    "a: &x [1, 2]\nb: *x\nc: &y {k: v}\nd: *y\n",
    "base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  y: 3\n",
    "- &a {a: 1}\n- &b {b: 2}\n- <<: [*a, *b]\n  c: 3\n",
    "a: {=: value, b: c}\n",
    "&a a: &b b\n*a : *b\n",
    "- &x !!str 5\n- *x\n",
    # bad input: the same error
    "a: [1, 2\n",
    "a: b\n c: d\n",
    "a: *nope\n",
    "a: !unknown x\n",
    "a: !!int x\n",
    "a: !!float x\n",
    "a: !!bool x\n",
    "? [a]\n: b\n",
    "a: <<\n",
    "<<: 1\n",
    "a: !!map [1]\n",
    "a: !!binary '!!!'\n",
    "\t- x\n",
    "a: 'unterminated\n",
    "---\na: 1\n--- b\n---\n[\n",
]


@pytest.mark.parametrize("text", CASES)
def test_cases(text: str) -> None:
    check(text)
    check(text.encode("utf-8"))


def test_cases_are_not_all_trivial() -> None:
    """The cases cover what they say: many types, datetimes, shared objects, errors."""
    types: set[type] = set()
    errors = 0
    for text in CASES:
        try:
            docs = reference(text)
        except Exception:
            errors += 1
            continue
        stack: list[Any] = list(docs)
        walked: set[int] = set()
        while stack:
            item = stack.pop()
            if id(item) in walked:
                continue
            walked.add(id(item))
            types.add(type(item))
            if isinstance(item, dict):
                stack.extend(item)
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
    assert {str, int, float, bool, type(None), bytes, datetime.date, datetime.datetime} <= types
    assert {dict, list, set} <= types
    assert errors >= 12


def test_aliases_stay_shared_objects() -> None:
    (doc,) = yamlload.load_all("a: &x [1, 2]\nb: *x\nc: &y {k: [*x]}\nd: *y\n")
    assert doc["a"] is doc["b"] is doc["c"]["k"][0]
    assert doc["c"] is doc["d"]


@pytest.mark.parametrize("text", ["a: &r [*r]\n", "- &top\n  x: [1, {y: *top}]\n"])
def test_a_document_containing_itself_is_refused(text: str) -> None:
    assert recursive(text)
    with pytest.raises(InputLimitError, match=r"an alias refers to a node that contains it"):
        list(yamlload.load_all(text))


@pytest.mark.parametrize(
    "text",
    [
        "[" * 101 + "]" * 101,  # the fast path counts
        "[" * 995 + "]" * 995,  # libyaml's limit is 1000; Python's recursion limit is near
        "a: &x [1]\nb: " + "[" * 100 + "*x" + "]" * 100,  # an alias: the node-graph check
        "- " * 101 + "x\n",  # block style
    ],
)
def test_nesting_deeper_than_the_limit_is_refused(text: str) -> None:
    with pytest.raises(InputLimitError, match=r"nested more than 100 levels deep \(at line \d\)"):
        list(yamlload.load_all(text))


def test_nesting_at_the_limit_loads() -> None:
    for text in ("[" * 100 + "]" * 100, "a: &x [1]\nb: " + "[" * 98 + "*x" + "]" * 98):
        (doc,) = yamlload.load_all(text)
        depth = 0
        while isinstance(doc, list | dict):
            depth += 1
            if not doc:
                break
            doc = doc[0] if isinstance(doc, list) else doc["b"]
        assert depth == 100


def billion_laughs(levels: int, fanout: int = 10) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * fanout)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_quickly() -> None:
    text = billion_laughs(9)  # 10^9 strings when expanded; ~900 bytes
    started = time.perf_counter()
    with pytest.raises(InputLimitError, match=r"aliases would expand it by more than 100,000"):
        list(yamlload.load_all(text))
    assert time.perf_counter() - started < 1.0


def test_aliases_within_the_limits_load_shared() -> None:
    (doc,) = yamlload.load_all(billion_laughs(4))  # 10^4 expanded: fine
    assert doc["a3"][0] is doc["a2"]
    assert len(doc["a3"][9][9][9]) == 10


def test_too_many_alias_uses_are_refused() -> None:
    text = "a: &x [1]\nb: [" + ", ".join(["*x"] * 10_001) + "]\n"
    with pytest.raises(InputLimitError, match=r"more than 10,000 alias uses"):
        list(yamlload.load_all(text))
    (doc,) = yamlload.load_all("a: &x [1]\nb: [" + ", ".join(["*x"] * 10_000) + "]\n")
    assert len(doc["b"]) == 10_000
    # aliases of scalars share one str/int: not counted (they cannot grow a document)
    (doc,) = yamlload.load_all("a: &x 1\nb: [" + ", ".join(["*x"] * 20_000) + "]\n")
    assert len(doc["b"]) == 20_000


def test_stream_kinds() -> None:
    text = "a: 1\n---\n- é\n"
    expected = [{"a": 1}, ["é"]]
    for stream in (text, text.encode(), io.StringIO(text), io.BytesIO(text.encode())):
        same(list(yamlload.load_all(stream)), expected)
    utf16 = "\ufeff" + text
    same(list(yamlload.load_all(utf16.encode("utf-16-le"))), expected)


# -- random documents ---------------------------------------------------------------------

PLAIN = [
    "a",
    "web",
    "kube-system",
    "10.0.0.1",
    "fe80::1",
    "1",
    "0",
    "-0",
    "+1",
    "-17",
    "0x1F",
    "0o17",
    "017",
    "08",
    "0b11",
    "1_000",
    "1:30",
    "1:30:45",
    "-1:30",
    "1.5",
    "1.",
    ".5",
    "1e3",
    "1.0e-3",
    "6.8523015e+5",
    ".inf",
    "-.inf",
    ".nan",
    ".NaN",
    "yes",
    "no",
    "on",
    "off",
    "y",
    "n",
    "true",
    "True",
    "TRUE",
    "false",
    "FALSE",
    "null",
    "Null",
    "~",
    "2001-12-14",
    "2001-12-14t21:59:43.10-05:00",
    "2001-12-14 21:59:43.10 -5",
    "2024-05-14T09:18:25Z",
    "2002-12-14",
    "!",
    "&",
    "*",
    "=",
    "<<",
    "a b",
    "foo.bar/baz",
    "http://x/y?a=1&b=2",
    "tcp",
    "TCP",
    "ClusterIP",
    "v1",
    "1.2.3",
    "-",
    "--x",
    "x-",
    "_",
    "é",
    "日本",
    "a'b",
    'a"b',
    "a%b",
    "a@b",
]
WORDS = ["a", "b", "c", "name", "yes", "1", "2", "true", "null", "~", "1.5", "x y", "on"]


class RandomDoc:
    """A random YAML text built from the pieces above, in block and flow style."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.anchors: list[str] = []

    def scalar(self, indent: int, flow: bool) -> str:
        r = self.rng
        choice = r.random()
        word = r.choice(PLAIN)
        if choice < 0.45:
            if (flow and any(c in word for c in ",[]{}")) or word in ("!", "&", "*"):
                return repr(word)
            return word if word not in ("-",) or flow else "'-'"
        if choice < 0.6:
            return "'" + word.replace("'", "''") + "'"
        if choice < 0.72:
            escaped = word.replace("\\", "\\\\").replace('"', '\\"')
            return '"' + escaped + r.choice(["", "\\t", "\\n", "\\u00e9", "\\x41"]) + '"'
        if choice < 0.78:
            tag = r.choice(["!!str", "!!int", "!!float", "!!bool", "!!null", "!"])
            value = r.choice(["1", "0x10", "1.5", "yes", "~", "''", '"7"'])
            return f"{tag} {value}"
        if choice < 0.84 and self.anchors:
            return "*" + r.choice(self.anchors)
        if choice < 0.9 and not flow:
            pad = " " * (indent + 2)
            lines = [
                r.choice(["text", "more  text", "", "x: y", "# not a comment"])
                for _ in range(r.randint(1, 3))
            ]
            body = "\n".join(pad + line if line else "" for line in lines)
            return f"{r.choice(['|', '>', '|-', '>+', '|2'])}\n{body}"
        if choice < 0.95:
            return ""
        return r.choice(["[]", "{}", "[1, yes, ~]", "{a: 1, b: [x]}"])

    def anchor(self) -> str:
        if self.rng.random() < 0.08:
            name = f"a{len(self.anchors)}"
            self.anchors.append(name)
            return f"&{name} "
        return ""

    def key(self) -> str:
        r = self.rng.random()
        word = self.rng.choice(WORDS)
        if r < 0.05:
            return "<<"
        if r < 0.1:
            return f"'{word}'"
        return word

    def node(self, indent: int, depth: int) -> list[str]:
        """Lines of a block node at ``indent`` (its first line's prefix is the caller's)."""
        r = self.rng
        pad = " " * indent
        kind = r.random() if depth < 4 else 1.0
        if kind < 0.35:
            lines = []
            for key in {self.key(): None for _ in range(r.randint(1, 4))}:
                anchor = self.anchor()
                if r.random() < 0.4 and depth < 4:
                    child = self.node(indent + 2, depth + 1)
                    lines.append(f"{pad}{key}: {anchor}".rstrip())
                    lines.extend(child)
                else:
                    lines.append(f"{pad}{key}: {anchor}{self.scalar(indent, False)}".rstrip())
            return lines
        if kind < 0.6:
            lines = []
            inner = indent + 2
            for _ in range(r.randint(1, 4)):
                if r.random() < 0.4 and depth < 4:
                    child = self.node(inner, depth + 1)
                    first = child[0][inner:]
                    lines.append(f"{pad}- {first}")
                    lines.extend(child[1:])
                else:
                    lines.append(f"{pad}- {self.anchor()}{self.scalar(inner, False)}".rstrip())
            return lines
        if kind < 0.7:
            items = ", ".join(self.scalar(0, True) for _ in range(r.randint(0, 4)))
            return [f"{pad}[{items}]"]
        return [f"{pad}{self.anchor()}{self.scalar(indent, False)}"]

    def document(self) -> str:
        docs = []
        for _ in range(self.rng.randint(1, 3)):
            self.anchors = []
            docs.append("\n".join(self.node(0, 0)) + "\n")
        return "---\n".join(docs)


def _random_data(rng: random.Random, depth: int = 0) -> Any:
    """Random Python data for yaml.dump: the emitter's own quoting and styles."""
    r = rng.random()
    if depth < 3 and r < 0.25:
        return {
            _random_data(rng, 3): _random_data(rng, depth + 1) for _ in range(rng.randint(0, 4))
        }
    if depth < 3 and r < 0.45:
        return [_random_data(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return rng.choice(
        [
            rng.choice(PLAIN),
            rng.randint(-(10**20), 10**20),
            rng.random() * 10 ** rng.randint(-5, 20),
            float("inf"),
            float("nan"),
            True,
            False,
            None,
            "multi\nline\n text",
            "  padded ",
            datetime.date(2001, 1, 2),
            datetime.datetime(2001, 1, 2, 3, 4, 5, 678),
            rng.choice(PLAIN) * rng.randint(1, 40),
        ]
    )


def test_random_documents() -> None:
    rng = random.Random(20261127)
    loaded = errors = 0
    for _ in range(400):
        text = RandomDoc(rng).document()
        try:
            reference(text)
            loaded += 1
        except Exception:
            errors += 1
        check(text)
    assert loaded >= 200  # most are valid YAML; the rest must fail the same way
    assert errors >= 5


@pytest.mark.parametrize("flow", [False, True, None])
def test_random_dumps(flow: bool | None) -> None:
    rng = random.Random(7 + (flow is True) + 2 * (flow is None))
    for _ in range(150):
        data = [_random_data(rng) for _ in range(rng.randint(1, 3))]
        text = yaml.safe_dump_all(data, default_flow_style=flow, allow_unicode=rng.random() < 0.5)
        got = check(text)
        assert len(got) == len(data)


def test_loader_is_a_safe_loader() -> None:
    with pytest.raises(yaml.constructor.ConstructorError):
        list(yamlload.load_all("!!python/object/apply:os.system ['true']\n"))
    assert issubclass(FastSafeLoader, REFERENCE)


def test_fast_path_is_taken_for_kubectl_output_and_left_for_merges(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kubectl-shaped files never need SafeConstructor's machinery; merge keys always do."""
    fallbacks: list[Any] = []
    original = yaml.constructor.BaseConstructor.construct_document

    def counted(self: Any, node: Any) -> Any:
        fallbacks.append(node)
        return original(self, node)

    monkeypatch.setattr(yaml.constructor.BaseConstructor, "construct_document", counted)
    for path in FILES:
        list(yamlload.load_all(path.read_bytes()))
    assert fallbacks == []
    same(
        list(yamlload.load_all("a: &b {x: 1}\nc:\n  <<: *b\n  y: 2\n")),
        [{"a": {"x": 1}, "c": {"x": 1, "y": 2}}],
    )
    assert len(fallbacks) == 1


def test_customised_constructors_are_respected() -> None:
    class Upper(FastSafeLoader):  # type: ignore[misc]
        pass

    Upper.add_constructor("tag:yaml.org,2002:str", lambda loader, node: node.value.upper())
    assert yaml.load("a: [b, 1]\n", Loader=Upper) == {"A": ["B", 1]}
    assert list(yamlload.load_all("a: [b, 1]\n")) == [{"a": ["b", 1]}]
