"""Renderers and content negotiation, against rancher-metadata's (Go) output rules."""

from __future__ import annotations

import pytest

from node_services.metadata import render
from node_services.metadata.render import Format


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, Format.TEXT),
        ("", Format.TEXT),
        ("*/*", Format.TEXT),
        ("application/json", Format.JSON),
        ("Application/JSON", Format.JSON),
        ("application/json, text/plain", Format.TEXT),  # a tie: the earlier offer wins
        ("text/plain;q=0.5, application/json", Format.JSON),
        ("application/*", Format.JSON),
        ("text/yaml", Format.YAML),
        ("application/x-yaml;q=0.9, application/json;q=0.1", Format.YAML),
        ("application/json;q=0, */*;q=0.1", Format.TEXT),
        ("image/png", Format.TEXT),
    ],
)
def test_negotiation_follows_gddo_negotiate_content_type(
    accept: str | None, expected: Format
) -> None:
    assert render.negotiate(accept) is expected


def test_text_of_maps_lists_and_scalars() -> None:
    tree = {"b": 1, "a b": {"x": 1}, "x/y": [], "links": None, "c": "v"}
    # keys query-escaped; lines (with their "/") sorted as strings
    assert render.text(tree) == b"a+b/\nb\nc\nlinks\nx%2Fy/\n"
    items = [{"name": "web 1", "uuid": "u"}, {"uuid": "u2"}, {"x": 1}, [1], "s", 3]
    assert render.text(items) == b"0=web+1\n1=u2\n2/\n3/\n4\n5\n"
    assert render.text("web-nginx-1") == b"web-nginx-1"
    assert render.text(None) == b""
    assert render.text(True) == b"true"
    assert render.text(False) == b"false"
    assert render.text(2048) == b"2048"
    assert render.text(2.50) == b"2.5"
    assert render.text({}) == b""
    assert render.text([]) == b""


def test_json_is_compact_sorted_and_escapes_like_go() -> None:
    value = {"b": [1, None, True], "a": "<&> é"}
    assert render.json_body(value) == '{"a":"\\u003c\\u0026\\u003e é","b":[1,null,true]}'.encode()
    assert render.json_body("s3cret") == b'"s3cret"'
    assert render.json_body(None) == b"null"


def test_yaml_quotes_like_yaml_v2() -> None:
    value = {
        "empty": "",
        "index": "1",
        "flag": "yes",
        "port": "80:80/tcp",
        "none": None,
        "list": ["a", "b"],
        "map": {},
        "seq": [],
        "n": 2048,
        "t": True,
    }
    assert render.yaml_body(value) == (
        b'empty: ""\nflag: "yes"\nindex: "1"\nlist:\n- a\n- b\nmap: {}\nn: 2048\nnone: null\n'
        b"port: 80:80/tcp\nseq: []\nt: true\n"
    )
    assert render.yaml_body("node1") == b"node1\n"
    assert render.yaml_body([{"name": "x", "ips": ["1.2.3.4"]}]) == (
        b"- ips:\n  - 1.2.3.4\n  name: x\n"
    )


@pytest.mark.parametrize(
    ("fmt", "body"),
    [
        (Format.TEXT, b"Not found\n"),
        (Format.JSON, b'{"code":404,"message":"Not found","type":"error"}\n'),
        (Format.YAML, b"code: 404\nmessage: Not found\ntype: error\n\n"),
    ],
)
def test_error_bodies(fmt: Format, body: bytes) -> None:
    assert render.error_body("Not found", 404, fmt) == body


def test_go_sprint_is_what_long_poll_values_compare_with() -> None:
    assert render.go_sprint("42") == "42"
    assert render.go_sprint(None) == "<nil>"
    assert render.go_sprint(True) == "true"
    assert render.go_sprint(["a", 1]) == "[a 1]"
    assert render.go_sprint({"b": 1, "a": {"c": None}}) == "map[a:map[c:<nil>] b:1]"


def test_yaml_writes_shared_objects_out_without_anchors() -> None:
    shared = {"name": "c"}
    assert render.yaml_body({"a": [shared], "b": shared}) == b"a:\n- name: c\nb:\n  name: c\n"
